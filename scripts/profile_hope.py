#!/usr/bin/env python
"""Where HOPE's time goes: torch.profiler op counts and self times, per chunk, against Llama.

For each row (the models of `bench_speed.py`: llama, hope, hope-attention, hope-linear,
hope-matched) and each task it profiles one call after a warm-up, on one thread:

- `train:T:fp32|bf16`: forward + backward of a batch of one T-token sequence;
- `decode:C`: one single-token decode step after a C-token prefill.

It reports the number of operator calls (top-level aten ops, so a `linear` counts once, not as
its `addmm` too), the calls per chunk (T / `chunk_size` for training), the self CPU time, and the
share of that time spent in matrix products (mm/bmm/addmm/baddbmm/matmul/triangular solve/SDPA);
the rest is per-op overhead, elementwise work and copies. The top operators by self time follow.

    python scripts/profile_hope.py                          # d=256, 4 layers, T=2048, decode @4096
    python scripts/profile_hope.py --rows hope --tasks train:512:fp32 --size d=128,layers=2

Writes `--out`/profile.json (every op of every cell) and profile.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import ROWS, build_model, parse_size  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
              "aten::linalg_solve_triangular", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_attention_math", "aten::_linalg_solve_ex")


def profile_cell(row: str, task: str, size: Dict[str, int]) -> dict:
    """Profile one (row, task) cell; returns counts, times and the per-op table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hope_hf.models.hope.hf_compat import CACHE_NAME, output_cache

    torch.set_num_threads(1)
    model = build_model(row, size)
    vocab = size["vocab"]
    gen = torch.Generator().manual_seed(1)
    kind, length, *rest = task.split(":")
    length = int(length)
    ids = torch.randint(0, vocab, (1, length), generator=gen)

    if kind == "train":
        model.train()
        bf16 = rest and rest[0] == "bf16"

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
    elif kind == "decode":
        model.eval()
        with torch.no_grad():
            cache = output_cache(model(input_ids=ids, use_cache=True))
        token = ids[:, -1:]
        states = [cache]

        def step():
            with torch.no_grad():
                states[0] = output_cache(model(input_ids=token, **{CACHE_NAME: states[0]}, use_cache=True))
    else:
        raise ValueError(f"task must be train:T:fp32|bf16 or decode:C, got {task!r}")

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    # Top-level ops only: an op called from inside another aten op (addmm inside linear) is its work.
    top_level = [e for e in prof.events() if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    top_counts: Dict[str, int] = {}
    for e in top_level:
        if e.name.startswith("aten::"):
            top_counts[e.name] = top_counts.get(e.name, 0) + 1
    ops = [{"name": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3}
           for e in events if e.key.startswith("aten::")]
    ops.sort(key=lambda o: -o["self_ms"])
    total_ms = sum(o["self_ms"] for o in ops)
    matmul_ms = sum(o["self_ms"] for o in ops if o["name"] in MATMUL_OPS)
    config = model.config
    chunk = getattr(config, "chunk_size", None)
    chunks = -(-length // chunk) if (kind == "train" and chunk) else None  # a last partial chunk counts
    calls = sum(top_counts.values())
    return {
        "row": row, "task": task, "params": sum(p.numel() for p in model.parameters()),
        "top_level_calls": calls, "chunks": chunks, "calls_per_chunk": calls / chunks if chunks else None,
        "self_ms": total_ms, "matmul_ms": matmul_ms, "matmul_share": matmul_ms / total_ms if total_ms else None,
        "ops": ops,
    }


def format_tables(cells: List[dict], top: int) -> str:
    lines = ["| model | task | top-level op calls | chunks | calls/chunk | self ms | in matmuls |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        per_chunk = "-" if c["calls_per_chunk"] is None else f"{c['calls_per_chunk']:.0f}"
        lines.append(f"| {c['row']} | {c['task']} | {c['top_level_calls']:,} | {c['chunks'] or '-'} | {per_chunk} | "
                     f"{c['self_ms']:.1f} | {100 * c['matmul_share']:.0f}% |")
    for c in cells:
        lines += ["", f"**{c['row']} {c['task']}**: top {top} ops by self time", "",
                  "| op | calls | self ms | share |", "|---|---|---|---|"]
        for o in c["ops"][:top]:
            lines.append(f"| {o['name']} | {o['calls']:,} | {o['self_ms']:.2f} | {100 * o['self_ms'] / c['self_ms']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="llama,hope", help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--tasks", default="train:2048:fp32,train:2048:bf16,decode:4096",
                        help="comma-separated train:T:fp32|bf16 and decode:C cells")
    parser.add_argument("--size", default="", help="e.g. d=256,layers=4,heads=4,vocab=8192 (the default)")
    parser.add_argument("--top", type=int, default=15, help="ops listed per cell")
    parser.add_argument("--out", default="runs/profile")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; accepted: {list(ROWS)}")
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if not (t.startswith("train:") and t.count(":") == 2 or t.startswith("decode:"))]
    if bad:
        raise SystemExit(f"--tasks: expected train:T:fp32|bf16 or decode:C, got {bad}")
    size = parse_size(args.size)

    from tqdm.auto import tqdm

    cells = [profile_cell(row, task, size) for row, task in tqdm([(r, t) for r in rows for t in tasks], desc="cells")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps({"size": size, "cells": cells}, indent=1))
    table = format_tables(cells, args.top)
    (out / "profile.md").write_text(table + "\n")
    print(table.split("\n\n")[0])
    print(f"\nwrote {out / 'profile.json'} and {out / 'profile.md'}")
    return cells


if __name__ == "__main__":
    main()
