#!/usr/bin/env python
"""Speed and memory of HOPE against a same-size `LlamaForCausalLM`, measured in one run.

Rows: Llama (transformers, SDPA, SwiGLU), HOPE (self-modifying, default CMS), the same HOPE with its
memories' chunk steps and decoding step through `torch.compile` (`hope-compiled`), HOPE-attention,
HOPE with linear memory, and HOPE with its CMS width shrunk until its parameter count matches
Llama's (`hope-matched`). Columns: parameters; training tokens/s (forward + backward + AdamW,
batch 1) at T=2048 and T=8192 in fp32 and bf16 autocast; prefill tokens/s (T=2048, no grad; for
HOPE also with the per-token reference loop, and the fast/reference ratio); decode ms/token at
contexts 512, 4K and 16K; peak RSS of the T=8192 fp32 training step.

Every cell runs in its own subprocess (so peak RSS is per cell and nothing warms another):
one warm-up, then `--repeats` timed repeats; the table shows the median and the spread
(min-max) is in the JSON, with the warm-up's seconds (`warmup_s`: for `hope-compiled` the compile).
Ratios are against the Llama row of the same run.

A second table, "linear-memory recurrence: ours vs fla naive chunk", times the recurrence of the
`hope-linear` row's main memory alone (batch 1, `heads` problems of head_dim x head_dim, chunk
`memory_chunk_size`, float32, T=2048 and 8192, forward under no_grad and forward + backward)
in two implementations fed the same inputs: ours (`dgd_chunk.ChunkSolve` chunk after chunk: the
per-token reads `reads(q)` and the end state `end()`) and flash-linear-attention's pure-torch
chunked reference `fla.ops.gated_delta_rule.naive.naive_chunk_gated_delta_rule` (its outputs and
final state), through the mapping `dgd_fla.gated_delta_inputs` (inside fla's timed region). The
two end states are checked to agree (float32, 1e-4 relative) before anything is timed. Without
fla installed the section is skipped with a note.

    python scripts/bench_speed.py                      # d=256, 4 layers, 4 heads, vocab 8192
    python scripts/bench_speed.py --size d=512,layers=8,heads=8 --quick
    python scripts/bench_speed.py --peer               # adds PyPI nested-learning 0.2.0 if it installs
    python scripts/bench_speed.py --only-recurrence --quick   # the recurrence table alone, T=2048

Writes `--out`/bench_speed.json and decode_latency.png (decode ms/token against context, log x),
and `--out`/bench_recurrence.json for the recurrence table (`--only-recurrence` writes only that).
"""

from __future__ import annotations

import argparse
import json
import math
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

ROWS = ("llama", "hope", "hope-compiled", "hope-attention", "hope-linear", "hope-matched")
DECODE_CONTEXTS = (512, 4096, 16384)
RECURRENCE_ROWS = ("ours", "fla")  # HOPE's ChunkSolve, fla's naive_chunk_gated_delta_rule
RECURRENCE_LENGTHS = (2048, 8192)
RECURRENCE_MODES = ("fwd", "fwd+bwd")
RECURRENCE_TOLERANCE = 1e-4  # relative gap allowed between the two end states (float32)


# --- one cell, in a child process ----------------------------------------------------------------
def build_model(row: str, size: Dict[str, int], compile: bool = False, **hope_overrides):
    """One bench row's model; `compile` turns on `compile_chunks` and `compile_decoding` for every HOPE row
    (`hope-compiled` always has them); `hope_overrides` are further `HopeConfig` values for the HOPE rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hope_hf import HopeConfig, HopeForCausalLM

    torch.manual_seed(0)
    d, layers, heads, vocab = size["d"], size["layers"], size["heads"], size["vocab"]
    compiled = compile or row == "hope-compiled"
    hope_kwargs = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_heads=heads,
                       compile_chunks=compiled, compile_decoding=compiled, **hope_overrides)
    if row == "llama":
        intermediate = HopeConfig(**hope_kwargs).cms_hidden_size  # the same SwiGLU width as one CMS level
        config = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             tie_word_embeddings=True, attn_implementation="sdpa")
        return LlamaForCausalLM(config)
    if row in ("hope", "hope-compiled"):
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


def train_step_seconds(model, ids, optimizer, bf16: bool = False) -> float:
    """Seconds of one training step on `ids` [B, T]: forward (under bf16 autocast if asked), backward, optimizer."""
    import torch

    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run_cell(cell: dict) -> dict:
    import torch

    row, task, size = cell["row"], cell["task"], cell["size"]
    if task.startswith("recurrence"):
        return run_recurrence_cell(cell)
    from hope_hf.models.hope.hf_compat import CACHE_NAME, output_cache

    repeats = cell["repeats"]
    model = build_model(row, size, cell.get("compile", False))
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
        for step in range(repeats + 1):
            times.append(train_step_seconds(model, ids, optimizer, bf16=dtype == "bf16"))
        result["warmup_s"], times = times[0], times[1:]
        result["tokens_per_s"] = [length / t for t in times]
        # Counted after the timed steps: a first call under FlopCounterMode (a dispatch mode) makes
        # Dynamo skip the compiled steps of `hope-compiled` for the rest of the process.
        result["flops_per_token"] = counted_flops(model, ids, dtype == "bf16") / length
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
                times.append(time.perf_counter() - start)
        result["warmup_s"], times = times[0], times[1:]
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


# --- the linear-memory recurrence alone: ours against fla's naive chunk ---------------------------
def recurrence_problem(size: Dict[str, int], length: int, requires_grad: bool = False) -> dict:
    """The main memory of the `hope-linear` row as a bare recurrence: batch 1, `heads` problems of
    W [head_dim, head_dim], `length` tokens, float32. Unit keys and queries, writes per unit eta of
    size ~1, eta and alpha drawn around the config's initial values (`eta_max * sigmoid`, `sigmoid`),
    W_0 ~ memory_init_range. Same seed in every cell, so every cell solves the same problem."""
    import torch

    from hope_hf import HopeConfig
    from hope_hf.models.hope.primitives import l2norm

    config = HopeConfig(memory_type="linear", vocab_size=size["vocab"], hidden_size=size["d"],
                        num_hidden_layers=size["layers"], num_heads=size["heads"])
    problems, dim = config.num_heads, config.head_dim  # batch 1: one problem per head
    gen = torch.Generator().manual_seed(2)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    tensors = {
        "weight": config.memory_init_range * torch.randn(problems, dim, dim, generator=gen),
        "unit": l2norm(torch.randn(problems, length, dim, generator=gen), 1e-6),
        "write_per_eta": torch.randn(problems, length, dim, generator=gen),
        "eta": config.eta_max * torch.sigmoid(logit(config.eta_init) + torch.randn(problems, length, generator=gen)),
        "log_alpha": torch.nn.functional.logsigmoid(logit(config.alpha_init) + torch.randn(problems, length, generator=gen)),
        "q": l2norm(torch.randn(problems, length, dim, generator=gen), 1e-6),
    }
    for tensor in tensors.values():
        tensor.requires_grad_(requires_grad)
    return {"tensors": tensors, "chunk": config.memory_chunk_size, "heads": problems, "head_dim": dim}


def ours_recurrence(tensors: dict, chunk: int):
    """HOPE's chunked linear-memory recurrence: `ChunkSolve` chunk after chunk, the reads
    `W_{t-1} q_t` of every token and the end state. Returns (reads [N, T, D], W_T [N, O, I])."""
    import torch

    from hope_hf.models.hope.dgd_chunk import ChunkSolve

    weight, length = tensors["weight"], tensors["unit"].shape[-2]
    reads = []
    for begin in range(0, length, chunk):
        piece = slice(begin, begin + chunk)
        solve = ChunkSolve(weight, tensors["unit"][:, piece], tensors["write_per_eta"][:, piece],
                           tensors["eta"][:, piece], tensors["log_alpha"][:, piece])
        reads.append(solve.reads(tensors["q"][:, piece]))
        weight = solve.end()
    return torch.cat(reads, dim=1), weight


def fla_recurrence(tensors: dict, chunk: int):
    """fla's `naive_chunk_gated_delta_rule` on the same inputs, mapped by `gated_delta_inputs`
    (the mapping is part of the timed work). Its outputs are `W_t q_t` (token t's own write
    included), ours `W_{t-1} q_t`: the same work, not the same numbers. Returns (outputs [N, T, D],
    W_T [N, O, I])."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Triton is not supported on current platform" on CPU
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule

    from hope_hf.models.hope.dgd_fla import gated_delta_inputs

    k, v, g, beta, h0 = gated_delta_inputs(tensors["weight"], tensors["unit"], tensors["write_per_eta"],
                                           tensors["eta"], tensors["log_alpha"])
    q = tensors["q"].transpose(0, 1).unsqueeze(0)  # [1, T, N, D]
    out, final = naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk, scale=1.0, initial_state=h0,
                                              output_final_state=True)
    return out.squeeze(0).transpose(0, 1), final.squeeze(0).transpose(-1, -2)


RECURRENCES = {"ours": ours_recurrence, "fla": fla_recurrence}


def fla_naive_missing() -> Optional[str]:
    """Why fla's naive gated delta rule cannot be imported (None: it can)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule  # noqa: F401
    except Exception as error:  # ImportError, or fla failing to initialise
        return f"{type(error).__name__}: {error}"
    return None


def check_recurrences_agree(size: Dict[str, int], length: int) -> dict:
    """Both recurrences on one problem (float32, no grad): the relative gap of their end states
    (max |ours - fla| / max |fla|), which must be under RECURRENCE_TOLERANCE for the timings to
    compare the same computation."""
    import torch

    problem = recurrence_problem(size, length)
    with torch.no_grad():
        _, ours = ours_recurrence(problem["tensors"], problem["chunk"])
        _, fla = fla_recurrence(problem["tensors"], problem["chunk"])
        gap = ((ours - fla).abs().max() / fla.abs().max()).item()
        moved = ((ours - problem["tensors"]["weight"]).abs().max() / ours.abs().max()).item()
    return {"length": length, "relative_gap": gap, "tolerance": RECURRENCE_TOLERANCE,
            "state_moved": moved, "ok": gap < RECURRENCE_TOLERANCE and moved > 1e-2}


def run_recurrence_cell(cell: dict) -> dict:
    """One recurrence cell, task `recurrence:<T>:<fwd|fwd+bwd>`: one warm-up, `repeats` timed runs
    (forward under no_grad, or forward + backward of sum(outputs) + sum(end state) into every
    input), and the FLOPs of one run as FlopCounterMode counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    row, task = cell["row"], cell["task"]
    _, length, mode = task.split(":")
    length, backward = int(length), mode == "fwd+bwd"
    problem = recurrence_problem(cell["size"], length, requires_grad=backward)
    tensors, chunk, recurrence = problem["tensors"], problem["chunk"], RECURRENCES[row]

    def once() -> None:
        with torch.set_grad_enabled(backward):
            out, end = recurrence(tensors, chunk)
            if backward:
                (out.sum() + end.sum()).backward()
                for tensor in tensors.values():
                    tensor.grad = None

    counter = FlopCounterMode(display=False)
    with counter:
        once()
    times: List[float] = []
    for step in range(cell["repeats"] + 1):
        start = time.perf_counter()
        once()
        if step > 0:
            times.append(time.perf_counter() - start)
    return {"row": row, "task": task, "tokens_per_s": [length / t for t in times],
            "flops_per_token": float(counter.get_total_flops()) / length,
            "heads": problem["heads"], "head_dim": problem["head_dim"], "chunk": chunk,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_recurrence(size: Dict[str, int], lengths: List[int], args) -> dict:
    """The recurrence section: skipped (with a note) without fla or when the two end states do not
    agree; otherwise every (T, mode) cell for both rows, task-major, each in its own subprocess."""
    from tqdm.auto import tqdm

    missing = fla_naive_missing()
    if missing is not None:
        print(f"\nlinear-memory recurrence vs fla naive chunk: skipped, flash-linear-attention is not "
              f"importable ({missing}); pip install flash-linear-attention to add it", flush=True)
        return {"skipped": f"fla not importable: {missing}"}
    check = check_recurrences_agree(size, min(lengths))
    tqdm.write(f"recurrence check at T={check['length']}: end states' relative gap {check['relative_gap']:.2e} "
               f"(tolerance {RECURRENCE_TOLERANCE:.0e}), state moved {check['state_moved']:.2f}")
    if not check["ok"]:
        print("linear-memory recurrence vs fla naive chunk: skipped, the two end states do not agree", flush=True)
        return {"skipped": "end states disagree", "check": check}
    results: Dict[str, Dict[str, dict]] = {row: {} for row in RECURRENCE_ROWS}
    tasks = [f"recurrence:{length}:{mode}" for length in lengths for mode in RECURRENCE_MODES]
    cells = [(row, task) for task in tasks for row in RECURRENCE_ROWS]
    for row, task in tqdm(cells, desc="recurrence"):
        cell = {"row": row, "task": task, "size": size, "repeats": args.repeats}
        results[row][task] = spawn(cell, args.timeout)
        if "error" in results[row][task]:
            tqdm.write(f"{row} {task}: {results[row][task]['error']}")
    table = format_recurrence_table(results, tasks)
    return {"check": check, "results": results, "table": table}


def format_recurrence_table(results: Dict[str, Dict[str, dict]], tasks: List[str]) -> str:
    def value(row, task, key="tokens_per_s"):
        cell = results.get(row, {}).get(task, {})
        return None if "error" in cell else (median(cell.get(key)) if key == "tokens_per_s" else cell.get(key))

    def fmt(x, digits=0):
        return "-" if x is None else f"{x:,.{digits}f}"

    def gflops(row, task):
        speed, flops = value(row, task), value(row, task, "flops_per_token")
        return None if speed is None or not flops else flops * speed / 1e9

    shape = next((c for row in results.values() for c in row.values() if "head_dim" in c), {})
    lines = [f"linear-memory recurrence: ours vs fla naive chunk (batch 1, {shape.get('heads', '?')} heads x "
             f"head_dim {shape.get('head_dim', '?')}, chunk {shape.get('chunk', '?')}, float32)", ""]
    header = ["T", "mode", "ours tok/s", "fla tok/s", "ratio", "ours GFLOP/s", "fla GFLOP/s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        _, length, mode = task.split(":")
        ours, fla = value("ours", task), value("fla", task)
        ratio = f"{ours / fla:.2f}x" if ours and fla else "-"
        lines.append("| " + " | ".join([length, mode, fmt(ours), fmt(fla), ratio, fmt(gflops("ours", task), 1),
                                         fmt(gflops("fla", task), 1)]) + " |")
    lines.append("")
    lines.append("ours: HOPE's `dgd_chunk.ChunkSolve` chunk after chunk (per-token reads + end state); fla: "
                 "`fla.ops.gated_delta_rule.naive.naive_chunk_gated_delta_rule` on `dgd_fla.gated_delta_inputs` "
                 "(outputs + final state). ratio = ours tok/s / fla tok/s (above 1: ours is faster). fwd runs "
                 "under no_grad; fwd+bwd backpropagates sum(outputs) + sum(end state) into every input. "
                 "GFLOP/s = FlopCounterMode FLOPs per token x tok/s, each side its own count (matrix products "
                 "only: our triangular solve and fla's forward-substitution loop are not counted).")
    return "\n".join(lines)


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


def cells_for(rows, quick: bool, contexts, reference_prefill: bool, only_decode: bool = False) -> Dict[str, List[str]]:
    if only_decode:
        return {row: [f"decode:{c}" for c in contexts] for row in rows}
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
    parser.add_argument("--quick", action="store_true", help="skip the T=8192 cells (training; in bench_speed also the recurrence table)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per cell")
    parser.add_argument("--cell", help=argparse.SUPPRESS)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-loop prefill cells")
    parser.add_argument("--only-decode", action="store_true", help="only the decode cells (and no recurrence table)")
    parser.add_argument("--compile", action="store_true",
                        help="every HOPE row with compile_chunks and compile_decoding (torch.compile; the warm-up compiles)")
    parser.add_argument("--peer", action="store_true", help="also try PyPI nested-learning==0.2.0")
    parser.add_argument("--only-recurrence", action="store_true",
                        help="run only the linear-memory recurrence table (ours vs fla naive chunk), no model rows")
    parser.add_argument("--no-recurrence", action="store_true", help="skip the linear-memory recurrence table")
    parser.add_argument("--recurrence-lengths", default=",".join(map(str, RECURRENCE_LENGTHS)),
                        help="sequence lengths of the recurrence table (--quick keeps those under 8192)")
    parser.add_argument("--out", default="runs/bench_speed")
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return {}
    if args.only_recurrence and args.no_recurrence:
        raise SystemExit("--only-recurrence and --no-recurrence exclude each other")

    from tqdm.auto import tqdm

    size = parse_size(args.size)
    lengths = [int(t) for t in args.recurrence_lengths.split(",") if t]
    if args.quick:
        lengths = [t for t in lengths if t < 8192] or lengths[:1]
    out = Path(args.out)
    if args.only_recurrence:
        load_before = os.getloadavg()
        recurrence = run_recurrence(size, lengths, args)
        print(f"\nsize: {size}, threads: {_threads()}, repeats: {args.repeats}, "
              f"load average before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
        if "table" in recurrence:
            print(recurrence["table"])
        record = {"size": size, "recurrence": recurrence, "torch_threads": _threads(), "cpu": _cpu_name(),
                  "load_average": {"before": load_before, "after": os.getloadavg()}}
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_recurrence.json").write_text(json.dumps(record, indent=1))
        print(f"wrote {out / 'bench_recurrence.json'}")
        return record
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; accepted: {list(ROWS)}")
    if "llama" not in rows:
        rows.insert(0, "llama")  # ratios need it
    contexts = [int(c) for c in args.contexts.split(",") if c]
    plan = cells_for(rows, args.quick, contexts, not args.no_reference, args.only_decode)
    results: Dict[str, Dict[str, dict]] = {row: {} for row in rows}
    # Task-major order: the rows of one column are measured one after another, so a change of
    # machine load during the run affects a ratio's two sides alike.
    tasks = list(dict.fromkeys(task for row in rows for task in plan[row]))
    cells = [(row, task) for task in tasks for row in rows if task in plan[row]]
    load_before = os.getloadavg()
    for row, task in tqdm(cells, desc="bench_speed"):
        cell = {"row": row, "task": task, "size": size, "repeats": args.repeats, "decode_steps": args.decode_steps,
                "compile": args.compile}
        results[row][task] = spawn(cell, args.timeout)
        if "error" in results[row][task]:
            tqdm.write(f"{row} {task}: {results[row][task]['error']}")
    peer = None
    if args.peer:
        peer = run_peer(results, rows, size, args, contexts)
    recurrence = None if args.no_recurrence or args.only_decode else run_recurrence(size, lengths, args)
    table = format_table(results, rows, contexts)
    print(f"\nsize: {size}, threads: {_threads()}, repeats: {args.repeats}, "
          f"load average before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(table)
    if recurrence is not None and "table" in recurrence:
        print()
        print(recurrence["table"])
    out.mkdir(parents=True, exist_ok=True)
    record = {"size": size, "compile": args.compile, "rows": rows, "contexts": contexts, "results": results, "table": table, "peer": peer,
              "recurrence": recurrence, "torch_threads": _threads(), "cpu": _cpu_name(),
              "load_average": {"before": load_before, "after": os.getloadavg()}}
    (out / "bench_speed.json").write_text(json.dumps(record, indent=1))
    written = [out / "bench_speed.json", out / "decode_latency.png"]
    if recurrence is not None:
        (out / "bench_recurrence.json").write_text(json.dumps({"size": size, "recurrence": recurrence}, indent=1))
        written.append(out / "bench_recurrence.json")
    plot(results, rows, contexts, out / "decode_latency.png")
    print(f"wrote {', '.join(map(str, written))}")
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
