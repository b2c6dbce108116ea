"""The shared machinery of the experiment scripts (`scripts/synthetic.py`, `scripts/eval_ppl.py`):
HOPE vs a same-size Llama built side by side, one seeded training loop that gives every model the same
batches and the same budget, accuracy over a dataset, and results written as JSON + CSV + PNG.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .models.hope.configuration_hope import HopeConfig
from .training import count_parameters, matched_llama_config

__all__ = [
    "TrainBudget",
    "evaluate_accuracy",
    "hope_and_llama",
    "plot_grouped_bars",
    "plot_lines",
    "train_model",
    "write_table",
]


@dataclass
class TrainBudget:
    """What every model of a comparison gets: the same steps, batches (`seed`), optimizer and schedule.

    `minutes` (optional) stops a run early after that much wall time; the row then records fewer steps.
    """

    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool = False
    minutes: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainBudget.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainBudget.lr must be positive, got {self.lr!r}")


def hope_and_llama(hope_config: HopeConfig, max_position_embeddings: int, seed: int = 0) -> dict[str, nn.Module]:
    """`{"HOPE": HopeForCausalLM(hope_config), "Llama": LlamaForCausalLM}` with the same vocabulary, width,
    depth, heads and parameter count (the Llama's MLP width is solved for; see `matched_llama_config`).
    Both are initialised from `seed`."""
    from transformers import LlamaForCausalLM

    from .models.hope.modeling_hope import HopeForCausalLM

    torch.manual_seed(seed)
    hope = HopeForCausalLM(hope_config)
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(matched_llama_config(hope_config, count_parameters(hope), max_position_embeddings))
    return {"HOPE": hope, "Llama": llama}


def _lr_factor(step: int, budget: TrainBudget) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < budget.warmup_steps:
        return (step + 1) / budget.warmup_steps
    progress = (step - budget.warmup_steps) / max(1, budget.steps - budget.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_model(
    model: nn.Module,
    dataset: Dataset,
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]],
    budget: TrainBudget,
    desc: str = "training",
    on_step: Optional[Callable[[int, nn.Module], None]] = None,
    stop_at: Optional[int] = None,
    nonfinite_dump: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Train `model` on random batches of `dataset` (`{"input_ids", "labels", "attention_mask"}` items) with
    AdamW for `budget.steps` steps. The batches depend only on `budget.seed`, so two models trained with the
    same budget see the same examples in the same order.

    Args:
        on_step: called as `on_step(step, model)` after each optimizer step (e.g. periodic evaluation).
        stop_at: stop after this many steps without changing the schedule (set by `budget.steps`): a model
            compared with a run that `budget.minutes` cut short gets exactly the same batches and learning rates.
        nonfinite_dump: at the first skipped update (see below), `torch.save` `{"step", "batch", "state_dict"}`
            (the weights it was computed at, the batch it was computed on) to this file, so that the failing
            backward can be replayed alone (e.g. under `torch.autograd.detect_anomaly`).

    Returns:
        `{"steps", "seconds", "final_train_loss" (mean of the last 10% of steps), "diverged_at_step", "losses",
        "skipped_steps"}`; a non-finite loss stops the run before its update (the model keeps the weights of the
        last finite step) and is recorded in `diverged_at_step` (None if it never happened). A finite loss whose
        gradient is not finite skips that update (AdamW would carry the NaN into every weight, and clipping
        cannot bound it): `skipped_steps` lists each such step with its gradient norm and the first
        parameters whose gradient was not finite; the learning-rate schedule goes on as if it had been taken.
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=budget.lr, betas=(0.9, 0.95),
                                  weight_decay=budget.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, budget))
    generator = torch.Generator().manual_seed(budget.seed)
    losses: list[float] = []
    diverged_at: Optional[int] = None
    skipped: list[dict[str, Any]] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(budget.steps), desc=desc, dynamic_ncols=True, leave=False)
    for step in bar:
        indices = torch.randint(0, len(dataset), (budget.batch_size,), generator=generator).tolist()
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in indices]).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=budget.bf16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False).loss
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if not math.isfinite(losses[-1]):
            # Report the divergence rather than train on NaN. Checked before the update, so the model keeps
            # its last finite weights and its evaluation shows what it had learned.
            diverged_at = step + 1
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), budget.max_grad_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:
            bad = [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            skipped.append({"step": step + 1, "grad_norm": float(grad_norm), "parameters": bad[:8]})
            if nonfinite_dump is not None and len(skipped) == 1:
                dump = Path(nonfinite_dump)
                dump.parent.mkdir(parents=True, exist_ok=True)
                partial = dump.with_name(dump.name + ".partial")  # renamed when complete: no half-written dump
                torch.save({"step": step + 1, "batch": {k: v.cpu() for k, v in batch.items()},
                            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, partial)
                partial.replace(dump)
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if on_step is not None:
            on_step(step + 1, model)
        if budget.minutes is not None and time.perf_counter() - start > 60 * budget.minutes:
            break
        if stop_at is not None and step + 1 >= stop_at:
            break
    bar.close()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": len(losses), "seconds": round(time.perf_counter() - start, 1),
            "final_train_loss": sum(tail) / len(tail), "diverged_at_step": diverged_at, "losses": losses,
            "skipped_steps": skipped}


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]],
    accuracy: Callable[[torch.Tensor, torch.Tensor], float],
    batch_size: int = 64,
    *,
    per: str = "position",
    bf16: bool = False,
) -> float:
    """Mean of `accuracy(logits, labels)` over `dataset` in batches, weighted by the number of labelled
    positions of each batch (`per="position"`: the accuracy over all labelled positions) or by the number of
    examples (`per="example"`: for an accuracy that scores whole examples, e.g. exact match)."""
    if per not in ("position", "example"):
        raise ValueError(f"per must be 'position' or 'example', got {per!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, weight = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in range(start, min(start + batch_size,
                                                                                            len(dataset)))]).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labelled = batch["labels"] != -100
        count = int(labelled.sum()) if per == "position" else int(labelled.any(dim=1).sum())
        total += accuracy(logits.float(), batch["labels"]) * count
        weight += count
    model.train(was_training)
    return total / max(weight, 1)


# ----------------------------------------------------------------------------- results


def write_table(out_dir: str | Path, stem: str, rows: Sequence[Mapping[str, Any]],
                meta: Optional[Mapping[str, Any]] = None) -> tuple[Path, Path]:
    """Write `rows` as `<stem>.csv` and `{"meta": meta, "rows": rows}` as `<stem>.json` in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    json_path.write_text(json.dumps({"meta": dict(meta or {}), "rows": list(rows)}, indent=2, default=_jsonable))
    columns = list(dict.fromkeys(key for row in rows for key in row if not isinstance(row[key], (list, dict))))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def _jsonable(value: Any) -> Any:
    if isinstance(value, TrainBudget):
        return asdict(value)
    if isinstance(value, (Path, torch.dtype)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grouped_bars(path: str | Path, groups: Sequence[str], series: Mapping[str, Sequence[float]], *,
                      ylabel: str, title: str, reference: Optional[float] = None) -> Path:
    """One group of bars per entry of `groups` (e.g. languages), one bar per series (e.g. models)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(series))), 4))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        positions = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(positions, values, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label=f"chance ({reference:g})")
    if all(0.0 <= v <= 1.0 for values in series.values() for v in values):
        ax.set_ylim(0.0, 1.1)  # accuracies: the full scale, room for the labels
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_lines(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
               ylabel: str, title: str, logx: bool = False) -> Path:
    """One line per entry of `series` (`label: (x, y)`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
