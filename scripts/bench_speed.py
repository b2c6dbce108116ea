#!/usr/bin/env python
"""Speed and memory of HOPE against a same-size `LlamaForCausalLM`, measured in one run.

Rows: Llama (transformers, SDPA, SwiGLU), HOPE (self-modifying, default CMS), HOPE-attention,
HOPE with linear memory, and HOPE with its CMS width shrunk until its parameter count matches
Llama's (`hope-matched`). Columns: parameters; training tokens/s (forward + backward + AdamW,
batch 1) at T=2048 and T=8192 in fp32 and bf16 autocast; prefill tokens/s (T=2048, no grad; for
HOPE also with the per-token reference loop, and the fast/reference ratio); decode ms/token at
contexts 512, 4K and 16K; peak RSS of the T=8192 fp32 training step.

Every cell runs in its own subprocess (so peak RSS is per cell and nothing warms another):
one warm-up, then `--repeats` timed repeats; the table shows the median and the spread
(min-max) is in the JSON. Ratios are against the Llama row of the same run.

    python scripts/bench_speed.py                      # d=256, 4 layers, 4 heads, vocab 8192
    python scripts/bench_speed.py --size d=512,layers=8,heads=8 --quick
    python scripts/bench_speed.py --peer               # adds PyPI nested-learning 0.2.0 if it installs

Writes `--out`/bench_speed.json and decode_latency.png (decode ms/token against context, log x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ("llama", "hope", "hope-attention", "hope-linear", "hope-matched")
DECODE_CONTEXTS = (512, 4096, 16384)


# --- one cell, in a child process ----------------------------------------------------------------
def build_model(row: str, size: Dict[str, int]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hope_hf import HopeConfig, HopeForCausalLM

    torch.manual_seed(0)
    d, layers, heads, vocab = size["d"], size["layers"], size["heads"], size["vocab"]
    hope_kwargs = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_heads=heads)
    if row == "llama":
        intermediate = HopeConfig(**hope_kwargs).cms_hidden_size  # the same SwiGLU width as one CMS level
        config = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             tie_word_embeddings=True, attn_implementation="sdpa")
        return LlamaForCausalLM(config)
    if row == "hope":
        return HopeForCausalLM(HopeConfig(**hope_kwargs))
    if row == "hope-attention":
        return HopeForCausalLM(HopeConfig(mixer="attention", **hope_kwargs))
    if row == "hope-linear":
        return HopeForCausalLM(HopeConfig(memory_type="linear", **hope_kwargs))
    if row == "hope-matched":
        return HopeForCausalLM(HopeConfig(cms_intermediate_size=matched_cms_width(size), **hope_kwargs))
    raise ValueError(f"row must be one of {list(ROWS)}, got {row!r}")


def matched_cms_width(size: Dict[str, int]) -> int:
    """The CMS width (multiple of 32) at which HOPE has about as many parameters as Llama."""
    from hope_hf import HopeConfig, HopeForCausalLM

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def count(model) -> int:
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        llama = count(build_model("llama", size))
        best = None
        for width in range(32, 4096, 32):
            config = HopeConfig(vocab_size=size["vocab"], hidden_size=size["d"], num_hidden_layers=size["layers"],
                                num_heads=size["heads"], cms_intermediate_size=width)
            gap = abs(count(HopeForCausalLM(config)) - llama)
            if best is None or gap < best[0]:
                best = (gap, width)
    return best[1]


def run_cell(cell: dict) -> dict:
    import torch

    row, task, size = cell["row"], cell["task"], cell["size"]
    from hope_hf.models.hope.hf_compat import CACHE_NAME, output_cache

    repeats = cell["repeats"]
    model = build_model(row, size)
    params = sum(p.numel() for p in model.parameters())
    vocab = size["vocab"]
    gen = torch.Generator().manual_seed(1)
    times: List[float] = []
    result = {"row": row, "task": task, "params": params}
    if task.startswith("train"):
        _, length, dtype = task.split(":")
        length = int(length)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        result["flops_per_token"] = counted_flops(model, ids, dtype == "bf16") / length
        for step in range(repeats + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step > 0:
                times.append(time.perf_counter() - start)
        result["tokens_per_s"] = [length / t for t in times]
    elif task.startswith("prefill"):
        _, length, implementation = task.split(":")
        length = int(length)
        model.eval()
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        from hope_hf import scan_implementation

        with torch.no_grad(), scan_implementation(model, implementation) if row != "llama" else _nothing():
            for step in range(repeats + 1):
                start = time.perf_counter()
                model(input_ids=ids, use_cache=True)
                if step > 0:
                    times.append(time.perf_counter() - start)
        result["tokens_per_s"] = [length / t for t in times]
    elif task.startswith("decode"):
        context = int(task.split(":")[1])
        model.eval()
        ids = torch.randint(0, vocab, (1, context), generator=gen)
        steps = cell["decode_steps"]
        with torch.no_grad():
            cache = output_cache(model(input_ids=ids, use_cache=True))
            token = ids[:, -1:]
            per_token = []
            for step in range(steps + 2):
                start = time.perf_counter()
                out = model(input_ids=token, **{CACHE_NAME: cache}, use_cache=True)
                cache = output_cache(out)
                token = out.logits[:, -1:].argmax(-1)
                if step >= 2:  # two warm-up steps
                    per_token.append((time.perf_counter() - start) * 1e3)
        result["ms_per_token"] = per_token
    else:
        raise ValueError(f"unknown task {task!r}")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def counted_flops(model, ids, bf16: bool) -> float:
    """FLOPs of one forward + backward as torch's FlopCounterMode counts them (matrix products and
    attention; elementwise work and triangular solves are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- the driver ------------------------------------------------------------------------------------
def parse_size(text: str) -> Dict[str, int]:
    size = {"d": 256, "layers": 4, "heads": 4, "vocab": 8192}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in size or not value.isdigit():
            raise SystemExit(f"--size: expected comma-separated d=,layers=,heads=,vocab= ints, got {part!r}")
        size[key] = int(value)
    return size


def spawn(cell: dict, timeout: float, python: str = sys.executable, script: Optional[Path] = None) -> dict:
    """Run one cell (`script --cell JSON`, this file by default) in a fresh interpreter: per-cell
    peak RSS, and no cell warms another."""
    command = [python, str(script or Path(__file__).resolve()), "--cell", json.dumps(cell)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": cell["row"], "task": cell["task"], "error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"row": cell["row"], "task": cell["task"], "error": (done.stderr or done.stdout).strip()[-400:]}
    return json.loads(lines[-1])


def median(values: Optional[List[float]]) -> Optional[float]:
    return statistics.median(values) if values else None


def cells_for(rows, quick: bool, contexts, reference_prefill: bool) -> List[str]:
    tasks = ["train:2048:fp32", "train:2048:bf16"]
    if not quick:
        tasks += ["train:8192:fp32", "train:8192:bf16"]
    tasks += ["prefill:2048:chunked"] + [f"decode:{c}" for c in contexts]
    per_row = {}
    for row in rows:
        per_row[row] = list(tasks)
        if reference_prefill and row != "llama":
            per_row[row].append("prefill:512:reference")
    return per_row


def format_table(results: Dict[str, Dict[str, dict]], rows, contexts) -> str:
    def value(row, task, key="tokens_per_s"):
        cell = results.get(row, {}).get(task, {})
        return median(cell.get(key)) if "error" not in cell else None

    def fmt(x, digits=0):
        return "-" if x is None else f"{x:,.{digits}f}"

    def ratio(row, task, key="tokens_per_s", invert=False):
        mine, base = value(row, task, key), value("llama", task, key)
        if mine is None or base is None or row == "llama":
            return ""
        return f" ({(base / mine if invert else mine / base):.2f}x)"

    def achieved_gflops(row, task):
        """Counted FLOPs per token x tokens/s: how much of the time goes into counted arithmetic."""
        cell = results.get(row, {}).get(task, {})
        speed, flops = value(row, task), cell.get("flops_per_token")
        return None if speed is None or not flops else flops * speed / 1e9

    def flop_ratio(row, task):
        mine, base = achieved_gflops(row, task), achieved_gflops("llama", task)
        return "" if mine is None or not base or row == "llama" else f" ({mine / base:.2f}x)"

    header = ["model", "params"]
    train_tasks = [t for t in ("train:2048:fp32", "train:2048:bf16", "train:8192:fp32", "train:8192:bf16")
                   if any(t in results.get(r, {}) for r in rows)]
    header += [f"train tok/s {t.split(':')[1]} {t.split(':')[2]}" for t in train_tasks]
    header += [f"GFLOP/s {t.split(':')[1]} {t.split(':')[2]}" for t in train_tasks]
    header += ["prefill tok/s 2048", "fast/ref prefill"]
    header += [f"decode ms @{c}" for c in contexts]
    header += ["peak RSS MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        params = next((c.get("params") for c in results.get(row, {}).values() if "params" in c), None)
        cols = [row, fmt(params)]
        cols += [fmt(value(row, t)) + ratio(row, t) for t in train_tasks]
        cols += [fmt(achieved_gflops(row, t), 1) + flop_ratio(row, t) for t in train_tasks]
        cols.append(fmt(value(row, "prefill:2048:chunked")) + ratio(row, "prefill:2048:chunked"))
        fast, ref = value(row, "prefill:2048:chunked"), value(row, "prefill:512:reference")
        cols.append(f"{fast / ref:.0f}x" if fast and ref else "-")
        cols += [fmt(value(row, f"decode:{c}", "ms_per_token"), 2) + ratio(row, f"decode:{c}", "ms_per_token", invert=True)
                 for c in contexts]
        rss_task = "train:8192:fp32" if "train:8192:fp32" in results.get(row, {}) else "train:2048:fp32"
        rss = results.get(row, {}).get(rss_task, {}).get("peak_rss_mb")
        cols.append(fmt(rss))
        lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
    lines.append("Ratios in parentheses are against Llama (higher is better for tok/s; for decode, Llama ms / "
                 "model ms). Decode is flat in context when the 16K cell is within 1.1x of the 512 cell. "
                 "GFLOP/s (FLOP efficiency) = FLOPs per token counted by torch's FlopCounterMode (matrix "
                 "products and attention, forward + backward) x training tokens/s: a model whose time goes "
                 "into arithmetic reaches Llama's rate (1x); per-op overhead lowers it.")
    return "\n".join(lines)


def plot(results, rows, contexts, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ys = [median(results.get(row, {}).get(f"decode:{c}", {}).get("ms_per_token")) for c in contexts]
        points = [(c, y) for c, y in zip(contexts, ys) if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=row)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / token")
    ax.set_title("Decode latency against context")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_cell_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that pick and time the cells, shared with `peer_nested_learning.py` (its rows must be
    measured in the same cells)."""
    parser.add_argument("--size", default="", help="e.g. d=256,layers=4,heads=4,vocab=8192 (the default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per cell, after one warm-up (median reported)")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--contexts", default=",".join(map(str, DECODE_CONTEXTS)))
    parser.add_argument("--quick", action="store_true", help="skip the T=8192 training cells")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per cell")
    parser.add_argument("--cell", help=argparse.SUPPRESS)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-loop prefill cells")
    parser.add_argument("--peer", action="store_true", help="also try PyPI nested-learning==0.2.0")
    parser.add_argument("--out", default="runs/bench_speed")
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return {}

    from tqdm.auto import tqdm

    size = parse_size(args.size)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; accepted: {list(ROWS)}")
    if "llama" not in rows:
        rows.insert(0, "llama")  # ratios need it
    contexts = [int(c) for c in args.contexts.split(",") if c]
    plan = cells_for(rows, args.quick, contexts, not args.no_reference)
    results: Dict[str, Dict[str, dict]] = {row: {} for row in rows}
    # Task-major order: the rows of one column are measured one after another, so a change of
    # machine load during the run affects a ratio's two sides alike.
    tasks = list(dict.fromkeys(task for row in rows for task in plan[row]))
    cells = [(row, task) for task in tasks for row in rows if task in plan[row]]
    load_before = os.getloadavg()
    for row, task in tqdm(cells, desc="bench_speed"):
        cell = {"row": row, "task": task, "size": size, "repeats": args.repeats, "decode_steps": args.decode_steps}
        results[row][task] = spawn(cell, args.timeout)
        if "error" in results[row][task]:
            tqdm.write(f"{row} {task}: {results[row][task]['error']}")
    peer = None
    if args.peer:
        peer = run_peer(results, rows, size, args, contexts)
    table = format_table(results, rows, contexts)
    print(f"\nsize: {size}, threads: {_threads()}, repeats: {args.repeats}, "
          f"load average before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"size": size, "rows": rows, "contexts": contexts, "results": results, "table": table, "peer": peer,
              "torch_threads": _threads(), "cpu": _cpu_name(), "load_average": {"before": load_before,
                                                                                 "after": os.getloadavg()}}
    (out / "bench_speed.json").write_text(json.dumps(record, indent=1))
    plot(results, rows, contexts, out / "decode_latency.png")
    print(f"wrote {out / 'bench_speed.json'} and {out / 'decode_latency.png'}")
    return record


PEER = "nested-learning==0.2.0"
PEER_VENV = ROOT / "runs" / "peer-venv"


def run_peer(results: Dict[str, Dict[str, dict]], rows: List[str], size, args, contexts) -> dict:
    """Install PyPI nested-learning 0.2.0 into its own venv (`runs/peer-venv`: it pins other
    versions of our dependencies) and run the same cells through `scripts/peer_nested_learning.py`.
    Adds a "peer" row; returns what happened."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_VENV} with torch==2.13.0 and {PEER} ...", flush=True)
        steps = ([sys.executable, "-m", "venv", str(PEER_VENV)],
                 [str(python), "-m", "pip", "install", "-q", "torch==2.13.0"],
                 [str(python), "-m", "pip", "install", "-q", PEER, "tqdm"])
        for command in steps:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                return {"installed": False, "command": " ".join(command), "error": (done.stderr or done.stdout)[-400:]}
    script = ROOT / "scripts" / "peer_nested_learning.py"
    rows.append("peer")
    results["peer"] = {}
    from tqdm.auto import tqdm

    tasks = [t for t in cells_for(["peer"], args.quick, contexts, reference_prefill=False)["peer"]]
    for task in tqdm(tasks, desc="peer"):
        if task.startswith("decode"):  # its hope_selfmod variant keeps no decoding state
            results["peer"][task] = {"row": "peer", "task": task, "error": "unsupported by nested-learning 0.2.0"}
            continue
        cell = {"row": "peer", "task": task, "size": size, "repeats": args.repeats, "decode_steps": args.decode_steps}
        results["peer"][task] = spawn(cell, args.timeout, python=str(python), script=script)
    return {"installed": True, "package": PEER, "venv": str(PEER_VENV),
            "note": "hope_selfmod trained with its paper-faithful online step; its prefill is a static forward"}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
