#!/usr/bin/env python
"""Synthetic suites: HOPE vs a same-size Transformer (Llama), same data, same budget.

Subcommands (each writes `<suite>.json`, `<suite>.csv` and `<suite>.png` into `--out`)::

    python scripts/synthetic.py formal   # formal-language recognition: train on short strings, test on longer
    python scripts/synthetic.py mqar     # multi-query associative recall at several numbers of key-value pairs
    python scripts/synthetic.py niah     # needle in a haystack of Paul Graham essays, several context lengths
    python scripts/synthetic.py position # language modelling on the essays: loss against token position
    python scripts/synthetic.py all      # the four, one after the other
    python scripts/synthetic.py mqar --lrs 1e-3 3e-3 1e-2 --seeds 0 1   # the sweep (issue 12; also formal):
        # every model at every learning rate and seed (same batches per seed), accuracy every
        # --eval-every steps; the best learning rate per model (mean over seeds) is reported with both
        # seeds, at equal steps and at equal training wall-clock, in `<suite>_sweep.{json,csv}` and
        # `<suite>_steps.png` / `<suite>_clock.png` (accuracy vs step / vs seconds, one line per model)

For every task both models are built with the same vocabulary, width, depth, heads and parameter count
(`hope_hf.experiments.hope_and_llama`) and trained by the same loop (`hope_hf.experiments.train_model`:
AdamW, warm-up + cosine, the same seeded batches). HOPE's configuration comes from the `HopeConfig`
flags (`--hidden_size`, `--chunk_size`, `--cms_chunk_sizes`, ...; defaults below).

* formal: Parity, (aa)*, (abab)*, a^n b^n, a^n b^n c^n, Shuffle-2, Dyck-2 (`hope_hf.data.synthetic`);
  balanced member / near-miss examples; accuracy of the yes/no token on held-out strings of the training
  lengths and on longer strings. The paper reports HOPE 100% on all seven, a Transformer 46% on parity.
* mqar: key-value pairs then queries (Zoology layout); accuracy over all answer tokens.
* position: trained on `--block-size`-token blocks of Paul Graham essays (BPE trained on the training
  essays), then the mean next-token loss in log-spaced position bins over the longest held-out essays,
  read up to `--eval-length` tokens. A model that uses its context has a loss that falls with position;
  `fall_within` = loss at positions 16-31 minus 128-255 (inside the training length), `fall_beyond` =
  loss at 128-255 minus 512-1023 (past it).
* niah: trained on needle prompts with haystacks of `--train-context` tokens, tested at each
  `--test-contexts` length and `--depths`; a hit is greedy decoding writing the whole number
  (teacher-forced arg-max on every answer token).
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

from hope_hf import HopeConfig  # noqa: E402
from hope_hf.experiments import (  # noqa: E402
    TrainBudget,
    evaluate_accuracy,
    hope_and_llama,
    plot_grouped_bars,
    plot_lines,
    train_model,
    write_table,
)
from hope_hf.training import add_config_arguments, config_overrides, count_parameters  # noqa: E402

SUITES = ("formal", "mqar", "niah", "position")
#: HOPE's defaults for the synthetic suites (override with the HopeConfig flags).
#: (Since issue 12 the main memory is read at the per-token state, so the model's default chunk sizes
#: 16/64 recall on short prompts; before, the suites used 8/8 so that a 64-token prompt could read anything.)
HOPE_DEFAULTS = dict(hidden_size=64, num_hidden_layers=2, num_heads=4, cms_chunk_sizes=[8, None])
#: Per-suite default budgets (override with --steps / --batch-size / --lr).
SUITE_BUDGETS = {"formal": dict(steps=300, batch_size=32, lr=3e-3), "mqar": dict(steps=300, batch_size=32, lr=3e-3),
                 "niah": dict(steps=300, batch_size=16, lr=3e-3), "position": dict(steps=300, batch_size=16, lr=3e-3)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=[*SUITES, "all"])
    parser.add_argument("--out", default="runs/synthetic", help="output folder")
    parser.add_argument("--models", nargs="+", default=["HOPE", "Llama"], choices=["HOPE", "Llama"])
    parser.add_argument("--steps", type=int, help="training steps per model and task (default: per suite)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: per suite)")
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate (default: per suite)")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock cap of each training run")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="sweep: learning rates per model (the best one, by mean accuracy over seeds, is reported)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="sweep: seeds (model init and batches)")
    parser.add_argument("--eval-every", type=int, default=100, help="sweep: steps between accuracy evaluations")
    parser.add_argument("--dump-nonfinite", action="store_true",
                        help="sweep: at a run's first non-finite gradient, save its weights and batch to "
                             "<out>/nonfinite_<model>_lr<lr>_seed<seed>.pt (to replay the backward alone)")
    formal = parser.add_argument_group("formal")
    formal.add_argument("--languages", nargs="+", default=None, help="default: all seven")
    formal.add_argument("--num-train", type=int, default=4000, help="training strings per language")
    formal.add_argument("--num-test", type=int, default=400, help="test strings per length range")
    formal.add_argument("--train-lengths", type=int, nargs=2, default=[1, 40], metavar=("MIN", "MAX"))
    formal.add_argument("--test-lengths", type=int, nargs=2, default=[41, 80], metavar=("MIN", "MAX"))
    mqar = parser.add_argument_group("mqar")
    mqar.add_argument("--kv-pairs", type=int, nargs="+", default=[4, 8, 16], help="one training run per value")
    mqar.add_argument("--mqar-seq-len", type=int, default=64)
    mqar.add_argument("--mqar-vocab", type=int, default=128)
    mqar.add_argument("--mqar-train", type=int, default=8000, help="training sequences")
    niah = parser.add_argument_group("niah")
    niah.add_argument("--train-context", type=int, nargs=2, default=[64, 192], metavar=("MIN", "MAX"),
                      help="haystack lengths (tokens) of the training prompts")
    niah.add_argument("--test-contexts", type=int, nargs="+", default=[128, 256, 512, 1024])
    niah.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    niah.add_argument("--niah-train", type=int, default=2000, help="training prompts")
    niah.add_argument("--niah-per-cell", type=int, default=4, help="test prompts per (context, depth)")
    niah.add_argument("--niah-vocab", type=int, default=2048, help="BPE vocabulary trained on the essays")
    position = parser.add_argument_group("position")
    position.add_argument("--block-size", type=int, default=256, help="tokens per training block")
    position.add_argument("--eval-length", type=int, default=1024, help="tokens read of each held-out essay")
    position.add_argument("--eval-documents", type=int, default=16, help="held-out essays (the longest)")
    position.add_argument("--essay-vocab", type=int, default=2048, help="BPE vocabulary trained on the essays")
    config_names = add_config_arguments(parser)
    parser.set_defaults(config_names=config_names, **HOPE_DEFAULTS)
    return parser


def hope_config(args: argparse.Namespace, vocab_size: int, pad_token_id: int) -> HopeConfig:
    return HopeConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, **config_overrides(args, args.config_names))


def budget_for(suite: str, args: argparse.Namespace) -> TrainBudget:
    given = {k: getattr(args, k) for k in ("steps", "batch_size", "lr") if getattr(args, k) is not None}
    return TrainBudget(**{**SUITE_BUDGETS[suite], **given}, seed=args.seed, bf16=args.bf16, minutes=args.minutes)


def sweep(args: argparse.Namespace, config: HopeConfig, max_positions: int, train_set, collate, budget: TrainBudget,
          evaluations: dict[str, Callable[[torch.nn.Module], float]], task: dict[str, Any], out: Path,
          stem: str) -> list[dict[str, Any]]:
    """Every model of `args.models` at every `args.lrs` and `args.seeds` (a seed fixes the init and the batches,
    so all models see the same batches). The first entry of `evaluations` (`name: model -> accuracy`) is the
    metric that picks the learning rate; it is evaluated every `args.eval_every` steps, the others at the end.
    Writes one row per run (with its curve: step, training seconds without evaluation, first metric) and one
    summary row per model: the best learning rate by the first metric's mean over seeds, every metric's mean
    and per-seed values at that rate, and the first metric at equal wall-clock (the shortest best-lr run's
    training time; the last evaluation before it). Returns the summary."""
    from dataclasses import replace

    primary, evaluate = next(iter(evaluations.items()))

    runs = []
    for seed in args.seeds:
        for lr in args.lrs:
            for name, model in hope_and_llama(config, max_positions, seed=seed).items():
                if name not in args.models:
                    continue
                # step 0 (the untrained model) anchors the curve, so equal wall-clock has a value before step 1
                curve, clock = [(0, 0.0, round(evaluate(model), 4))], {"start": time.perf_counter(), "evaluating": 0.0}
                model.train()

                def on_step(step, m, curve=curve, clock=clock):
                    if step % args.eval_every and step != budget.steps:
                        return
                    trained = time.perf_counter() - clock["start"] - clock["evaluating"]
                    began = time.perf_counter()
                    curve.append((step, round(trained, 2), round(evaluate(m), 4)))
                    m.train()
                    clock["evaluating"] += time.perf_counter() - began

                run_budget = replace(budget, lr=lr, seed=seed)
                dump = out / f"nonfinite_{name}_lr{lr}_seed{seed}.pt" if args.dump_nonfinite else None
                summary = train_model(model, train_set, collate, run_budget, desc=f"{name} lr={lr} seed={seed}",
                                      on_step=on_step, nonfinite_dump=dump)
                if curve[-1][0] != summary["steps"]:  # diverged or cut short: evaluate where it stopped
                    curve.append((summary["steps"], round(time.perf_counter() - clock["start"] - clock["evaluating"], 2),
                                  round(evaluate(model), 4)))
                others = {metric: round(fn(model), 4) for metric, fn in evaluations.items() if metric != primary}
                row = {**task, "model": name, "lr": lr, "seed": seed, "parameters": count_parameters(model),
                       "steps": summary["steps"], "train_seconds": curve[-1][1], primary: curve[-1][2], **others,
                       "final_train_loss": round(summary["final_train_loss"], 4),
                       "diverged_at_step": summary["diverged_at_step"], "skipped_steps": summary["skipped_steps"],
                       "curve": curve}
                print("  " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("curve", "skipped_steps"))
                      + f", skipped_steps={len(summary['skipped_steps'])}", flush=True)
                runs.append(row)
                write_table(out, f"{stem}_runs", runs, {"task": task, "budget": budget, "command": " ".join(sys.argv)})
    best = {}
    for name in args.models:
        mine = [r for r in runs if r["model"] == name]
        mean = {lr: sum(r[primary] for r in mine if r["lr"] == lr) / len(args.seeds) for lr in args.lrs}
        best[name] = max(args.lrs, key=lambda lr: mean[lr])
    chosen = {name: [r for r in runs if r["model"] == name and r["lr"] == best[name]] for name in args.models}
    budget_clock = min(r["train_seconds"] for rows in chosen.values() for r in rows)

    def at_clock(curve):
        return [acc for _, seconds, acc in curve if seconds <= budget_clock][-1]  # step 0 is at 0 s

    summary = []
    for name, rows in chosen.items():
        per_metric = {}
        for metric in evaluations:
            values = [r[metric] for r in rows]
            per_metric |= {f"{metric}_mean": round(sum(values) / len(values), 4), f"{metric}_seeds": values}
        clocked = [at_clock(r["curve"]) for r in rows]
        summary.append({**task, "model": name, "best_lr": best[name], "steps": rows[0]["steps"], **per_metric,
                        "equal_clock_seconds": budget_clock,
                        f"{primary}_at_equal_clock_mean": round(sum(clocked) / len(clocked), 4),
                        f"{primary}_at_equal_clock_seeds": clocked,
                        "train_seconds_mean": round(sum(r["train_seconds"] for r in rows) / len(rows), 1)})
        print("  best: " + ", ".join(f"{k}={v}" for k, v in summary[-1].items()), flush=True)

    def mean_curve(rows, axis):
        points = list(zip(*[r["curve"] for r in rows]))
        return ([sum(p[axis] for p in pts) / len(pts) for pts in points],
                [sum(p[2] for p in pts) / len(pts) for pts in points])

    label = " ".join(f"{k}={v}" for k, v in task.items())
    plot_lines(out / f"{stem}_steps.png", {f"{n} (lr {best[n]:g})": mean_curve(rows, 0) for n, rows in chosen.items()},
               xlabel="training step", ylabel=f"{primary} (mean over seeds)", title=f"{stem} {label}: accuracy vs step")
    plot_lines(out / f"{stem}_clock.png", {f"{n} (lr {best[n]:g})": mean_curve(rows, 1) for n, rows in chosen.items()},
               xlabel="training seconds (1 CPU thread, evaluation excluded)", ylabel=f"{primary} (mean over seeds)",
               title=f"{stem} {label}: accuracy vs wall-clock")
    write_table(out, f"{stem}_sweep", summary, {"task": task, "budget": budget, "lrs": args.lrs, "seeds": args.seeds,
                                                 "command": " ".join(sys.argv), "hope_config": config.to_diff_dict()})
    return summary


def compare(args: argparse.Namespace, config: HopeConfig, max_positions: int, train_set, collate, budget: TrainBudget,
            evaluations: dict[str, Callable[[torch.nn.Module], float]], task: dict[str, Any]) -> list[dict[str, Any]]:
    """Train each model of `args.models` on `train_set` with `budget`; one row per model with `task`'s fields,
    the training summary and every entry of `evaluations` (`name: model -> accuracy`). If `budget.minutes`
    cuts the first model's run short, the next ones stop at the same step (same batches, same schedule)."""
    rows, stop_at = [], None
    for name, model in hope_and_llama(config, max_positions, seed=args.seed).items():
        if name not in args.models:
            continue
        label = " ".join(f"{k}={v}" for k, v in task.items())
        summary = train_model(model, train_set, collate, budget, desc=f"{name} {label}", stop_at=stop_at)
        if summary["diverged_at_step"] is None:  # a diverged run does not shorten the others
            stop_at = stop_at or summary["steps"]
        row = {**task, "model": name, "parameters": count_parameters(model), "steps": summary["steps"],
               "seconds": summary["seconds"], "final_train_loss": round(summary["final_train_loss"], 4),
               "diverged_at_step": summary["diverged_at_step"], "skipped_steps": len(summary["skipped_steps"])}
        for metric, evaluate in evaluations.items():
            value = evaluate(model)  # a number, or a mapping of several (`{metric}_{key}` columns)
            row.update({f"{metric}_{k}": round(v, 4) for k, v in value.items()} if isinstance(value, dict)
                       else {metric: round(value, 4)})
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def run_formal(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from hope_hf.data.synthetic import (FORMAL_LANGUAGES, FORMAL_VOCAB, PAD_ID, FormalLanguageDataset,
                                        formal_language_accuracy, formal_language_collate)

    languages = args.languages or list(FORMAL_LANGUAGES)
    unknown = sorted(set(languages) - set(FORMAL_LANGUAGES))
    if unknown:
        raise SystemExit(f"--languages: unknown {unknown}; choose from {list(FORMAL_LANGUAGES)}")
    budget = budget_for("formal", args)
    config = hope_config(args, len(FORMAL_VOCAB), PAD_ID)
    (short_min, short_max), (long_min, long_max) = args.train_lengths, args.test_lengths
    rows = []
    for language in languages:
        # Seeded by the language's place in FORMAL_LANGUAGES, not in --languages: a subset run reproduces
        # the full suite's data for those languages.
        seed = args.seed + 1000 * list(FORMAL_LANGUAGES).index(language)
        train = FormalLanguageDataset.generate(language, args.num_train, short_min, short_max, seed=seed)
        short = FormalLanguageDataset.generate(language, args.num_test, short_min, short_max, seed=seed + 1)
        long = FormalLanguageDataset.generate(language, args.num_test, long_min, long_max, seed=seed + 2)
        score = functools.partial(evaluate_accuracy, collate=formal_language_collate, accuracy=formal_language_accuracy,
                                  bf16=args.bf16)
        print(f"{language}: train lengths {short_min}-{short_max}, test {long_min}-{long_max}", flush=True)
        # held-out strings of the training lengths pick a sweep's learning rate; longer strings are the test
        evaluations = {"acc_train_lengths": lambda m, short=short: score(m, short),
                       "acc_longer": lambda m, long=long: score(m, long)}
        if args.lrs:
            rows += sweep(args, config, long_max + 3, train, formal_language_collate, budget, evaluations,
                          {"language": language}, out, f"formal_{language}")
            continue
        rows += compare(args, config, long_max + 3, train, formal_language_collate, budget, evaluations,
                        {"language": language})
    key = "acc_longer_mean" if args.lrs else "acc_longer"
    plot_grouped_bars(out / "formal.png", languages,
                      {m: [r[key] for r in rows if r["model"] == m] for m in args.models},
                      ylabel=f"accuracy on lengths {long_min}-{long_max}", reference=0.5,
                      title=f"Formal languages: trained on lengths {short_min}-{short_max}, {budget.steps} steps")
    return rows


def run_mqar(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from hope_hf.data import generate_mqar, masked_next_token_accuracy, pad_collate
    from hope_hf.data.synthetic import FILLER_ID

    budget = budget_for("mqar", args)
    config = hope_config(args, args.mqar_vocab, FILLER_ID)
    collate = functools.partial(pad_collate, pad_token_id=FILLER_ID)
    rows = []
    for pairs in args.kv_pairs:
        common = dict(vocab_size=args.mqar_vocab, seq_len=args.mqar_seq_len, num_kv_pairs=pairs)
        train = generate_mqar(args.mqar_train, seed=args.seed, **common)
        test = generate_mqar(500, seed=args.seed + 1, **common)
        print(f"MQAR: {pairs} key-value pairs, sequences of {args.mqar_seq_len} tokens", flush=True)
        if args.lrs:
            rows += sweep(args, config, args.mqar_seq_len, train, collate, budget,
                          {"accuracy": lambda m: evaluate_accuracy(m, test, collate, masked_next_token_accuracy,
                                                                   bf16=args.bf16)},
                          {"kv_pairs": pairs}, out, f"mqar{pairs}")
            continue
        rows += compare(args, config, args.mqar_seq_len, train, collate, budget,
                        {"accuracy": lambda m: evaluate_accuracy(m, test, collate, masked_next_token_accuracy,
                                                                 bf16=args.bf16)},
                        {"kv_pairs": pairs})
    key = "accuracy_mean" if args.lrs else "accuracy"
    plot_grouped_bars(out / "mqar.png", [f"{p} pairs" for p in args.kv_pairs],
                      {m: [r[key] for r in rows if r["model"] == m] for m in args.models},
                      ylabel="recall accuracy", reference=2 / args.mqar_vocab,
                      title=f"MQAR, {args.mqar_seq_len} tokens, {budget.steps} steps")
    return rows


def run_niah(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from hope_hf.data import (encode_niah_example, load_paul_graham_essays, make_niah_example, pad_collate,
                              sequence_exact_match, split_text, train_bpe_tokenizer)

    budget = budget_for("niah", args)
    # haystacks of the test prompts come from essays the models never saw in training
    train_essays, test_essays = split_text(load_paul_graham_essays(), val_fraction=0.2, seed=args.seed)
    tokenizer = train_bpe_tokenizer(train_essays, vocab_size=args.niah_vocab)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    train = [encode_niah_example(make_niah_example(train_essays, context_tokens=rng.randint(*args.train_context),
                                                   depth_fraction=rng.random(), tokenizer=tokenizer, seed=i),
                                 tokenizer) for i in range(args.niah_train)]
    tests = {(length, depth): [encode_niah_example(make_niah_example(
        test_essays, context_tokens=length, depth_fraction=depth, tokenizer=tokenizer, seed=10_000 * k + j), tokenizer)
        for j in range(args.niah_per_cell)]
        for k, (length, depth) in enumerate((n, d) for n in args.test_contexts for d in args.depths)}
    print(f"NIAH: {len(train)} training prompts ({args.train_context[0]}-{args.train_context[1]} haystack tokens), "
          f"{sum(map(len, tests.values()))} test prompts, built in {time.perf_counter() - start:.0f} s", flush=True)
    collate = functools.partial(pad_collate, pad_token_id=tokenizer.pad_token_id)
    config = hope_config(args, len(tokenizer), tokenizer.pad_token_id)
    max_positions = max(len(e["input_ids"]) for cell in tests.values() for e in cell)

    def hits(model, length) -> float:
        cells = [tests[(length, d)] for d in args.depths]
        return evaluate_accuracy(model, [e for cell in cells for e in cell], collate, sequence_exact_match,
                                 batch_size=8, per="example", bf16=args.bf16)

    evaluations = {f"acc_{n}": functools.partial(lambda model, n: hits(model, n), n=n) for n in args.test_contexts}
    rows = compare(args, config, max_positions, train, collate, budget, evaluations, {"task": "niah"})
    plot_lines(out / "niah.png", {r["model"]: (args.test_contexts, [r[f"acc_{n}"] for n in args.test_contexts])
                                  for r in rows},
               xlabel="context length (tokens)", ylabel="needle retrieved (exact match)", logx=True,
               title=f"NIAH on Paul Graham essays, trained on {args.train_context[0]}-{args.train_context[1]} "
                     f"tokens, {budget.steps} steps")
    return rows


def run_position(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from hope_hf.data import load_paul_graham_essays, pad_collate, split_text, tokenize_and_chunk, train_bpe_tokenizer
    from hope_hf.training import loss_by_position

    budget = budget_for("position", args)
    train_essays, test_essays = split_text(load_paul_graham_essays(), val_fraction=0.2, seed=args.seed)
    tokenizer = train_bpe_tokenizer(train_essays, vocab_size=args.essay_vocab)
    train = tokenize_and_chunk(train_essays, tokenizer, args.block_size)
    documents = [torch.as_tensor(tokenizer(essay, add_special_tokens=False)["input_ids"])
                 for essay in sorted(test_essays, key=len, reverse=True)[:args.eval_documents]]
    print(f"position: {len(train)} training blocks of {args.block_size} tokens; {len(documents)} held-out essays "
          f"read up to {args.eval_length} tokens", flush=True)
    collate = functools.partial(pad_collate, pad_token_id=tokenizer.pad_token_id)
    config = hope_config(args, len(tokenizer), tokenizer.pad_token_id)

    def by_position(model) -> dict[str, float]:
        binned = {f"{a}-{b}": value for a, b, value in loss_by_position(model, documents, args.eval_length).binned()}
        falls = {"fall_within": ("16-31", "128-255"), "fall_beyond": ("128-255", "512-1023")}
        return {**{name: binned[a] - binned[b] for name, (a, b) in falls.items() if a in binned and b in binned},
                **binned}

    rows = compare(args, config, args.eval_length, train, collate, budget, {"loss": by_position}, {"task": "position"})
    bins = [key[len("loss_"):] for key in rows[0] if key.startswith("loss_") and "-" in key]
    centres = [(int(a) * int(b)) ** 0.5 for a, b in (key.split("-") for key in bins)]
    plot_lines(out / "position.png", {r["model"]: (centres, [r[f"loss_{key}"] for key in bins]) for r in rows},
               xlabel="token position (log-spaced bins)", ylabel="mean next-token loss", logx=True,
               title=f"Held-out essays: loss vs position, trained on {args.block_size}-token blocks, {budget.steps} steps")
    return rows


RUNNERS = {"formal": run_formal, "mqar": run_mqar, "niah": run_niah, "position": run_position}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, list[dict[str, Any]]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lrs and not args.seeds:
        args.seeds = [args.seed]
    if args.lrs and args.suite not in ("mqar", "formal"):
        parser.error("--lrs (the sweep) is implemented for the mqar and formal suites")
    try:
        hope_config(args, 16, 0)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for suite in SUITES if args.suite == "all" else [args.suite]:
        rows = RUNNERS[suite](args, out)
        meta = {"suite": suite, "budget": budget_for(suite, args), "command": " ".join(sys.argv),
                "hope_config": config_overrides(args, args.config_names)}
        json_path, _ = write_table(out, suite, rows, meta)
        print(f"{suite}: wrote {json_path}, {json_path.with_suffix('.csv')}, {json_path.with_suffix('.png')}")
        results[suite] = rows
    return results


if __name__ == "__main__":
    main()
