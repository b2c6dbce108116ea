#!/usr/bin/env python
"""Benchmark the optimizers of `hope_hf.optim` on a small byte-level language model.

The same model (a tiny Llama from `transformers` and/or a HOPE model of the same width and
depth) is trained from the same initialisation on the same batches of the built-in text
(Shakespeare, `hope_hf.data`) for a fixed number of steps with each optimizer. Written to
`--out`:

* `results.json`: the configuration, and per run the train / validation loss curves,
  final losses and wall time;
* `results.csv`: one row per (model, optimizer): final train loss (mean of the last 10
  steps), final validation loss, wall time, parameter count;
* `loss_curves.png`: train loss (smoothed) and validation loss per optimizer, one panel per
  model.

Tokenisation is byte-level (vocabulary 256), so the script needs no tokenizer download.

Example (CPU, 2 cores: about 40 s per optimizer and model)::

    python scripts/bench_optimizers.py --model both --steps 300 --out runs/bench_optimizers

HOPE runs need `hope_hf.HopeForCausalLM`; without it the script says so and runs Llama only.
With both models, Llama's MLP width is set so that both have the same parameter count.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from hope_hf.training import OPTIMIZERS, RECOMMENDED_LR, build_optimizer  # noqa: E402

VOCAB = 256
ALL_OPTIMIZERS = OPTIMIZERS
DEFAULT_OPTIMIZERS = ALL_OPTIMIZERS

#: Learning rates of the matrix rule (AdamW's lr for "adamw"); override with --lr NAME=VALUE.
#: Picked from {1e-5 ... 0.1} by the final train loss of 120-step runs of the default Llama
#: (hidden 128, 4 layers, batch 16 x 128 bytes, seed 0); the AdamW fallback uses --adamw-lr.
#: They are `hope_hf.training.RECOMMENDED_LR`, which the training scripts' `--optimizer` also uses.
DEFAULT_LR: dict[str, float] = dict(RECOMMENDED_LR)


# --------------------------------------------------------------------------- data
def load_text(text_file: Optional[str], max_chars: int) -> tuple[str, str]:
    """Return (text, description): `--text-file` if given, else the built-in Shakespeare."""
    if text_file:
        text = Path(text_file).read_text(encoding="utf-8", errors="replace")
        return text[:max_chars], f"file {text_file}"
    try:
        try:
            from hope_hf.data import load_shakespeare_text  # type: ignore[attr-defined]
        except ImportError:
            from hope_hf.data.corpora import load_shakespeare_text
        return load_shakespeare_text(max_chars=max_chars), "Shakespeare (hope_hf.data)"
    except (ImportError, FileNotFoundError, ValueError) as err:
        raise SystemExit(
            f"The built-in text is unavailable ({type(err).__name__}: {err}).\n"
            "Pass a UTF-8 text file with --text-file PATH instead."
        ) from err


class ByteBatches:
    """Random crops of a byte stream; the same seed gives every optimizer the same batches."""

    def __init__(self, text: str, seq_len: int, batch_size: int, val_fraction: float = 0.1) -> None:
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        n_val = max(seq_len + 1, int(len(data) * val_fraction))
        if len(data) - n_val < 2 * (seq_len + 1):
            raise SystemExit(f"Text too short ({len(data)} bytes) for --seq-len {seq_len}")
        self.train, self.val = data[:-n_val], data[-n_val:]
        self.seq_len, self.batch_size = seq_len, batch_size

    def _crops(self, data: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        return torch.stack([data[s : s + self.seq_len] for s in starts.tolist()])

    def train_batches(self, steps: int, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(self.train) - self.seq_len, (steps, self.batch_size), generator=g)
        return [self._crops(self.train, s) for s in starts]

    def val_batches(self, n_batches: int) -> list[torch.Tensor]:
        # Evenly spaced, non-random windows: the validation set is identical for every run.
        stride = max(1, (len(self.val) - self.seq_len) // (n_batches * self.batch_size))
        starts = torch.arange(0, n_batches * self.batch_size) * stride
        starts = starts.clamp_max(len(self.val) - self.seq_len)
        return [self._crops(self.val, s) for s in starts.view(n_batches, self.batch_size)]


# --------------------------------------------------------------------------- models
def llama_config(args: argparse.Namespace, intermediate_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )


def make_llama(args: argparse.Namespace, intermediate_size: int) -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(args, intermediate_size))


def hope_classes() -> Optional[tuple[Any, Any]]:
    try:
        from hope_hf import HopeConfig, HopeForCausalLM  # type: ignore[attr-defined]
    except ImportError as err:
        print(f"[bench] HOPE model unavailable ({err}); skipping HOPE. (hope_hf.HopeForCausalLM is needed.)")
        return None
    return HopeConfig, HopeForCausalLM


def make_hope(args: argparse.Namespace) -> nn.Module:
    classes = hope_classes()
    assert classes is not None
    HopeConfig, HopeForCausalLM = classes
    config = HopeConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_heads=args.heads,
        cms_chunk_sizes=args.hope_cms_chunk_sizes,
        tie_word_embeddings=True,
    )
    return HopeForCausalLM(config)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_llama_intermediate(args: argparse.Namespace, target: int) -> int:
    """The Llama MLP width that gives `target` parameters (the count is linear in it)."""
    p1 = count_params(make_llama(args, 64))
    p2 = count_params(make_llama(args, 128))
    per_unit = (p2 - p1) / 64
    return max(8, int(round(64 + (target - p1) / per_unit)))


# --------------------------------------------------------------------------- optimizers
def make_optimizer(name: str, model: nn.Module, lr: float, adamw_lr: float) -> torch.optim.Optimizer:
    """Build optimizer `name` with `hope_hf.training.build_optimizer` (the one the training scripts use):
    matrix rule at `lr` on 2-D hidden weights, AdamW at `adamw_lr` on the rest, no weight decay."""
    return build_optimizer(name, model, lr, adamw_lr=adamw_lr)


def lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10%: the same schedule for every optimizer."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


# --------------------------------------------------------------------------- training
def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(lm_loss(model, b).item() for b in batches) / len(batches)
    model.train()
    return loss


def run_one(
    args: argparse.Namespace,
    model_kind: str,
    build_model: Callable[[], nn.Module],
    optimizer_name: str,
    data: ByteBatches,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)  # the same initialisation for every optimizer
    model = build_model()
    model.train()
    lr = args.lr.get(optimizer_name, DEFAULT_LR[optimizer_name])
    opt = make_optimizer(optimizer_name, model, lr, args.adamw_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps))
    train_batches = data.train_batches(args.steps, args.seed)
    val_batches = data.val_batches(args.val_batches)
    train_curve: list[float] = []
    val_curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    bar = tqdm(train_batches, desc=f"{model_kind}/{optimizer_name}", leave=False, dynamic_ncols=True)
    for step, ids in enumerate(bar, start=1):
        loss = lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        value = loss.item()
        train_curve.append(value)
        if not math.isfinite(value):
            print(f"[bench] {model_kind}/{optimizer_name}: loss diverged at step {step}")
            break
        if step % args.eval_every == 0 or step == args.steps:
            val_curve.append((step, evaluate(model, val_batches)))
            bar.set_postfix(loss=f"{value:.3f}", val=f"{val_curve[-1][1]:.3f}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
    wall = time.perf_counter() - start
    tail = train_curve[-10:]
    return {
        "model": model_kind,
        "optimizer": optimizer_name,
        "lr": lr,
        "params": count_params(model),
        "steps": len(train_curve),
        "final_train_loss": sum(tail) / len(tail),
        "final_val_loss": val_curve[-1][1] if val_curve else float("nan"),
        "wall_time_s": wall,
        "train_curve": train_curve,
        "val_curve": val_curve,
    }


# --------------------------------------------------------------------------- output
def write_outputs(out: Path, config: dict[str, Any], results: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config, "runs": results}, indent=2))
    fields = ["model", "optimizer", "lr", "params", "steps", "final_train_loss", "final_val_loss", "wall_time_s"]
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in results:
            writer.writerow({k: r[k] for k in fields})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for i, r in enumerate(x for x in results if x["model"] == kind):
            color = f"C{i}"
            curve = torch.tensor(r["train_curve"])
            k = max(1, min(20, len(curve) // 10))
            smooth = curve.unfold(0, k, 1).mean(1) if len(curve) >= k else curve
            ax.plot(range(k, k + len(smooth)), smooth.tolist(), color=color, label=f"{r['optimizer']} (train)")
            if r["val_curve"]:
                xs, ys = zip(*r["val_curve"])
                ax.plot(xs, ys, "o--", color=color, markersize=3, alpha=0.8)
        ax.set_title(f"{kind} ({results[0]['steps']} steps; dashed: validation)")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)


def print_table(results: list[dict[str, Any]]) -> None:
    header = f"{'model':<7} {'optimizer':<16} {'lr':>8} {'params':>9} {'train':>7} {'val':>7} {'wall s':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['model']:<7} {r['optimizer']:<16} {r['lr']:>8.2g} {r['params']:>9,d} "
            f"{r['final_train_loss']:>7.3f} {r['final_val_loss']:>7.3f} {r['wall_time_s']:>8.1f}"
        )


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("llama", "hope", "both"), default="both")
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                   help=f"comma-separated subset of {','.join(ALL_OPTIMIZERS)}")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hope-cms-chunk-sizes", default="16,64,none",
                   help="CMS levels of the HOPE model, e.g. 16,64,none")
    p.add_argument("--no-match-params", action="store_true",
                   help="keep Llama's default MLP width instead of matching HOPE's parameter count")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE",
                   help="override an optimizer's learning rate (repeatable)")
    p.add_argument("--adamw-lr", type=float, default=3e-3, help="lr of the AdamW fallback of the matrix optimizers")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--max-chars", type=int, default=2_000_000)
    p.add_argument("--text-file", default=None, help="train on this UTF-8 file instead of the built-in text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/bench_optimizers")
    args = p.parse_args(argv)

    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [o for o in args.optimizers if o not in ALL_OPTIMIZERS]
    if unknown:
        p.error(f"unknown optimizers {unknown}; choose from {ALL_OPTIMIZERS}")
    lrs = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in ALL_OPTIMIZERS or not value:
            p.error(f"--lr expects NAME=VALUE with NAME in {ALL_OPTIMIZERS}, got {item!r}")
        lrs[name] = float(value)
    args.lr = lrs
    args.hope_cms_chunk_sizes = [None if c.strip().lower() == "none" else int(c) for c in args.hope_cms_chunk_sizes.split(",")]
    for name in ("steps", "batch_size", "seq_len", "eval_every", "val_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    text, source = load_text(args.text_file, args.max_chars)
    data = ByteBatches(text, args.seq_len, args.batch_size)
    print(f"[bench] text: {source}, {len(data.train):,} train / {len(data.val):,} val bytes")

    builders: dict[str, Callable[[], nn.Module]] = {}
    want_hope = args.model in ("hope", "both")
    hope_ok = want_hope and hope_classes() is not None
    if hope_ok:
        builders["hope"] = lambda: make_hope(args)
    if args.model in ("llama", "both"):
        intermediate = -(-int(args.hidden_size * 8 / 3) // 32) * 32
        if hope_ok and not args.no_match_params:
            torch.manual_seed(args.seed)
            intermediate = matched_llama_intermediate(args, count_params(make_hope(args)))
        builders["llama"] = lambda: make_llama(args, intermediate)
        print(f"[bench] llama: intermediate_size={intermediate}")
    if not builders:
        raise SystemExit("[bench] nothing to run (HOPE unavailable and --model hope)")

    results = []
    for kind, build in builders.items():
        for name in args.optimizers:
            r = run_one(args, kind, build, name, data)
            print(
                f"[bench] {kind:<5} {name:<16} train {r['final_train_loss']:.3f}  val {r['final_val_loss']:.3f}"
                f"  {r['wall_time_s']:.1f}s"
            )
            results.append(r)

    config = {k: v for k, v in vars(args).items()}
    config.update(text_source=source, torch=torch.__version__, threads=torch.get_num_threads(),
                  default_lr=DEFAULT_LR)
    out = Path(args.out)
    write_outputs(out, config, results)
    print()
    print_table(results)
    print(f"\n[bench] wrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'loss_curves.png'}")
    return results


if __name__ == "__main__":
    main()
