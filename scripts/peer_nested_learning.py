#!/usr/bin/env python
"""The PyPI package `nested-learning` 0.2.0 (another HOPE implementation) as a peer row for
`scripts/bench_speed.py`, at the same size and on the same cells.

It must run in its own virtual environment (its pins, e.g. `datasets<3` and
`huggingface-hub<1`, clash with hope-hf's), never in `.venv`:

    python3 -m venv /tmp/nlvenv
    /tmp/nlvenv/bin/pip install torch==2.13.0          # first, so no CUDA build is pulled
    /tmp/nlvenv/bin/pip install nested-learning==0.2.0
    OMP_NUM_THREADS=1 /tmp/nlvenv/bin/python scripts/peer_nested_learning.py --quick

Each cell runs in its own subprocess (one warm-up, then `--repeats` timed repeats) and prints
one JSON line in the format of `bench_speed.run_cell` (row, task, params, tokens_per_s or
ms_per_token, peak_rss_mb), plus `variant` and `train_mode`. `--cell '<json>'` runs one cell,
taking the same dict as `bench_speed.py --cell`, so bench_speed can spawn it with this venv's
python. All lines are also written to `--out` (JSON list).

What the peer computes (read from its source, `nested_learning/model.py`, `hope/block.py`,
`titan/self_modifying.py`, `training.py`):
- `block_variant="hope_selfmod"` (used here by default, the closest to our default `hope`):
  per block `x -> CMS(M_memory(l2norm(W_q conv4(x))))`: no residual and no norm around the
  mixer; the CMS levels are residual `x + MLP(LayerNorm(x))` (GELU, width 4d); LayerNorm and a
  tied head at the end. Self-modifying Titans: memories `M_k, M_v, M_eta, M_alpha, M_memory`
  are 2-layer residual MLPs on the full width (hidden d, no heads; `heads` is unused), one DGD
  step per token with gradients at the chunk-start state, `W2 <- W2 (alpha I - eta k k^T) -
  eta g2`, `W1 <- alpha W1 - eta g1`, `eta = 1e-3 softplus(M_eta)`, `alpha = sigmoid(M_alpha)`.
- Its memories (self-modifying and CMS) change only in an explicit second pass under
  `torch.no_grad()` that needs a teach signal (the gradient of the LM loss w.r.t. each block's
  output), i.e. labels; no gradient flows through the updates ("two_pass_stopgrad_updates").
  The CMS update is a step on that teach signal, not a label-free objective. The
  differentiable forward, inference and `model(tokens)` read a static state: for
  `hope_selfmod` the logits at t then depend only on tokens t-3L..t (the L stacked convs;
  checked in float64).
- It has no incremental decoding for `hope_selfmod` (no conv tail, no memory state across
  calls without labels); `hope_attention` / `hope_hybrid` have a KV cache (post-norm softmax
  attention, then CMS), and `peer_decode_step` matches the full forward for them.

`--train-mode online` (the default) is its paper-faithful training step on one sequence
(configs `pilot_paper_faithful.yaml` + `pilot.yaml`: fast state per sequence, per-layer teach
signals, boundary-target chunks of the fastest CMS period): per chunk, forward + CE +
backward, then the no-grad update pass; one AdamW step at the end. `--train-mode plain` is
the bench's loop exactly (forward + CE + backward + AdamW) on the static network.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # torch is imported lazily: the driver process only spawns cells
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import add_cell_arguments, cells_for, parse_size, spawn  # noqa: E402  (stdlib-only at import time)

PEER_PACKAGE = "nested-learning"
PEER_VERSION = "0.2.0"
VARIANTS = ("hope_selfmod", "hope_attention", "hope_hybrid")
TRAIN_MODES = ("online", "plain")
# Our defaults (HopeConfig): chunk_size 16, memory_chunk_size 64, cms_chunk_sizes [16, 256, None].
# The peer has no static CMS level: a level whose update period is never reached is one.
STATIC_PERIOD = 2**31 - 1
DEFAULT_CMS_PERIODS = (16, 256, STATIC_PERIOD)


def _check_version() -> None:
    from importlib.metadata import version

    found = version(PEER_PACKAGE)
    if found != PEER_VERSION:
        raise RuntimeError(f"{PEER_PACKAGE}=={PEER_VERSION} is required, found {found}; this wrapper reads its private "
                           "training helpers, which may differ in other versions")


def build_peer_model(size: Dict[str, int], variant: str = "hope_selfmod", chunk_size: int = 16,
                     memory_chunk_size: int = 64,
                     cms_periods: Sequence[int] = DEFAULT_CMS_PERIODS) -> "torch.nn.Module":
    """The peer's `HOPEModel` at width `d`, depth `layers`, `heads` heads and `vocab` tokens.

    Args:
        size: {"d", "layers", "heads", "vocab"} ints, as `bench_speed.parse_size` returns.
        variant: one of `VARIANTS` (the peer's `block_variant`).
        chunk_size, memory_chunk_size: self-modifying update chunks (ours: `chunk_size`,
            `memory_chunk_size`); used by `hope_selfmod` only.
        cms_periods: one CMS level per entry, fastest first (ours: `cms_chunk_sizes`).
    """
    _check_version()
    import torch
    from nested_learning.levels import LevelSpec
    from nested_learning.model import HOPEModel, ModelConfig

    missing = [k for k in ("d", "layers", "heads", "vocab") if not isinstance(size.get(k), int)]
    if missing:
        raise ValueError(f"size must map d, layers, heads, vocab to ints; missing or not int: {missing}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    if not cms_periods or any(int(p) <= 0 for p in cms_periods):
        raise ValueError(f"cms_periods must be a non-empty list of positive ints, got {list(cms_periods)!r}")
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=size["vocab"], dim=size["d"], num_layers=size["layers"], heads=size["heads"],
        titan_level=LevelSpec(name="titan", update_period=chunk_size),  # hope_hybrid only
        cms_levels=[LevelSpec(name=f"cms_{i}", update_period=int(p)) for i, p in enumerate(cms_periods)],
        # As in pilot_paper_faithful.yaml. It also gives the "static" level one update from the
        # buffered sequence at its end (then the fast state is dropped): one extra MLP pass.
        cms_flush_partial_at_end=True,
        self_mod_chunk_size=chunk_size, self_mod_chunk_size_memory=memory_chunk_size,
        block_variant=variant,
    )
    return HOPEModel(config)


def _variant(model: "torch.nn.Module") -> str:
    return str(model.config.block_variant)


def peer_forward(model: "torch.nn.Module", input_ids: "torch.Tensor") -> "torch.Tensor":
    """Logits `[B, T, vocab]` of `input_ids` `[B, T]`: the peer's plain forward (static memories)."""
    return model(input_ids)


def peer_prefill(model: "torch.nn.Module", input_ids: "torch.Tensor") -> Tuple["torch.Tensor", Any]:
    """Logits `[B, T, vocab]` and the decode state (None for `hope_selfmod`).

    The state is (fast state, attention KV cache): in 0.2.0 the attention blocks return their
    KV cache only when they are also given a fast state (without one, `return_attention_cache`
    fails to unpack). The fast state is not advanced without a teach signal.
    """
    if _variant(model) == "hope_selfmod":
        return model(input_ids), None
    fast_state = model.init_fast_state()
    logits, cache = model(input_ids, fast_state=fast_state, attention_cache=model.init_attention_cache(),
                          return_attention_cache=True)
    return logits, (fast_state, cache)


def peer_decode_step(model: "torch.nn.Module", token: "torch.Tensor", state: Any) -> Tuple["torch.Tensor", Any]:
    """One decode step: `token` `[B, 1]`, `state` from `peer_prefill` -> (logits `[B, 1, vocab]`, state).

    Only the attention variants have incremental state (a KV cache per block). `hope_selfmod`
    has none in nested-learning 0.2.0: its causal conv is recomputed from the call's own tokens
    (zero-padded) and its memories do not move without a label-driven teach signal, so one
    token at a time would silently compute something else than the full sequence.
    """
    if _variant(model) == "hope_selfmod":
        raise ValueError("peer_decode_step: nested-learning 0.2.0 'hope_selfmod' has no incremental decoding state; "
                         f"use one of {[v for v in VARIANTS if v != 'hope_selfmod']}")
    if state is None:
        raise ValueError("peer_decode_step: state must be the (fast_state, cache) returned by peer_prefill, got None")
    fast_state, cache = state
    logits, cache = model(token, fast_state=fast_state, attention_cache=cache, return_attention_cache=True)
    return logits, (fast_state, cache)


def peer_train_step(model: "torch.nn.Module", optimizer: "torch.optim.Optimizer", input_ids: "torch.Tensor", *,
                    mode: str, autocast_dtype: Optional["torch.dtype"] = None) -> float:
    """One training step on `input_ids` `[1, T]`; returns the mean next-token loss.

    mode "online": the peer's paper-faithful two-pass step (see the module docstring), the
    forward under autocast and the no-grad update pass outside it, as in its `training.py`.
    mode "plain": forward + CE + backward + AdamW on the static network.
    """
    import torch
    import torch.nn.functional as F
    from nested_learning.training import (
        _compute_layer_teach_signals,
        _infer_online_chunk_size,
        _iter_online_boundary_chunks,
    )

    if mode not in TRAIN_MODES:
        raise ValueError(f"mode must be one of {list(TRAIN_MODES)}, got {mode!r}")
    def autocast():
        return torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)

    vocab = model.config.vocab_size
    optimizer.zero_grad(set_to_none=True)
    if mode == "plain":
        with autocast():
            logits = model(input_ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss.detach())
    fast_state = model.init_fast_state()
    attention_cache = None if _variant(model) == "hope_selfmod" else model.init_attention_cache()
    total, count = 0.0, 0
    chunk_size = _infer_online_chunk_size(model) or input_ids.size(1)
    for chunk, next_tokens, finalize in _iter_online_boundary_chunks(input_ids, chunk_size=chunk_size):
        targets = chunk[:, 1:] if next_tokens is None else torch.cat([chunk[:, 1:], next_tokens[:, None]], dim=1)
        if targets.size(1) == 0:
            continue
        chunk_cache = attention_cache
        with autocast():
            if chunk_cache is not None:
                logits, _, block_outputs, attention_cache = model.forward_with_block_outputs(
                    chunk, fast_state=fast_state, attention_cache=chunk_cache, return_attention_cache=True)
            else:
                logits, _, block_outputs = model.forward_with_block_outputs(chunk, fast_state=fast_state)
            loss = F.cross_entropy(logits[:, : targets.size(1)].reshape(-1, vocab).float(), targets.reshape(-1))
        teach_signals = _compute_layer_teach_signals(loss, block_outputs)
        loss.backward()
        with torch.no_grad():  # the peer's stop-grad write pass: advances fast_state
            model(chunk, teach_signals=teach_signals, fast_state=fast_state, finalize_updates=finalize,
                  attention_cache=chunk_cache)
        total += float(loss.detach()) * targets.size(1)
        count += targets.size(1)
    optimizer.step()
    return total / max(count, 1)


# --- one cell, in a child process ----------------------------------------------------------------
def run_cell(cell: dict) -> dict:
    """One bench cell (task "train:T:fp32|bf16", "prefill:T:<any>", "decode:<context>")."""
    import torch

    variant = cell.get("variant", "hope_selfmod")
    train_mode = cell.get("train_mode", "online")
    task, size, repeats = cell["task"], cell["size"], cell["repeats"]
    model = build_peer_model(size, variant=variant)
    result = {"row": cell.get("row", "peer"), "task": task, "params": sum(p.numel() for p in model.parameters()),
              "variant": variant, "peer": f"{PEER_PACKAGE}=={PEER_VERSION}"}
    gen = torch.Generator().manual_seed(1)
    times: List[float] = []
    if task.startswith("train"):
        _, length, dtype = task.split(":")
        length = int(length)
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"train dtype must be fp32 or bf16, got {dtype!r}")
        result["train_mode"] = train_mode
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, size["vocab"], (1, length), generator=gen)
        for step in range(repeats + 1):
            start = time.perf_counter()
            peer_train_step(model, optimizer, ids, mode=train_mode,
                            autocast_dtype=torch.bfloat16 if dtype == "bf16" else None)
            if step > 0:
                times.append(time.perf_counter() - start)
        result["tokens_per_s"] = [length / t for t in times]
    elif task.startswith("prefill"):
        length = int(task.split(":")[1])
        model.eval()
        ids = torch.randint(0, size["vocab"], (1, length), generator=gen)
        with torch.no_grad():
            for step in range(repeats + 1):
                start = time.perf_counter()
                peer_prefill(model, ids)
                if step > 0:
                    times.append(time.perf_counter() - start)
        result["tokens_per_s"] = [length / t for t in times]
        result["note"] = "static forward: the peer's memories do not move at inference"
    elif task.startswith("decode"):
        context = int(task.split(":")[1])
        model.eval()
        ids = torch.randint(0, size["vocab"], (1, context), generator=gen)
        with torch.no_grad():
            _, state = peer_prefill(model, ids)
            token = ids[:, -1:]
            per_token = []
            for step in range(cell["decode_steps"] + 2):
                start = time.perf_counter()
                logits, state = peer_decode_step(model, token, state)
                token = logits[:, -1:].argmax(-1)
                if step >= 2:  # two warm-up steps, as in bench_speed
                    per_token.append((time.perf_counter() - start) * 1e3)
        result["ms_per_token"] = per_token
    else:
        raise ValueError(f"task must start with train, prefill or decode, got {task!r}")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# --- the driver ------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser)
    parser.add_argument("--variant", default="hope_selfmod", choices=VARIANTS)
    parser.add_argument("--train-mode", default="online", choices=TRAIN_MODES)
    parser.add_argument("--row", default="peer", help="row name in the JSON lines")
    parser.add_argument("--tasks", default="", help="comma-separated subset of the cells (default: all)")
    parser.add_argument("--out", default="runs/bench_speed/peer_nested_learning.json")
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return []
    _check_version()  # fail here, not in every child
    from tqdm.auto import tqdm

    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    size = parse_size(args.size)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    # bench_speed's own cell list (its prefill key is "prefill:2048:chunked"), so the two stay in step
    tasks = cells_for([args.row], args.quick, contexts, reference_prefill=False)[args.row]
    if args.tasks:
        wanted = [t for t in args.tasks.split(",") if t]
        unknown = [t for t in wanted if t not in tasks]
        if unknown:
            raise SystemExit(f"--tasks: unknown {unknown}; accepted: {tasks}")
        tasks = wanted
    results = []
    for task in tqdm(tasks, desc="peer nested-learning", file=sys.stderr):
        if task.startswith("decode") and args.variant == "hope_selfmod":
            result = {"row": args.row, "task": task, "variant": args.variant,
                      "error": "unsupported: nested-learning 0.2.0 hope_selfmod has no incremental decoding"}
        else:
            cell = {"row": args.row, "task": task, "size": size, "repeats": args.repeats,
                    "decode_steps": args.decode_steps, "variant": args.variant, "train_mode": args.train_mode}
            result = spawn(cell, args.timeout, script=Path(__file__).resolve())
        print(json.dumps(result), flush=True)
        results.append(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"size": size, "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
                               "results": results}, indent=1))
    tmp.replace(out)  # no half-written file on failure
    tqdm.write(f"wrote {out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
