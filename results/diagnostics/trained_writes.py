"""What the trained default HOPE's main memory does with a write (issue 12; `results/in_context/README.md` section 18).

    OMP_NUM_THREADS=1 python results/diagnostics/trained_writes.py [--kv-pairs 8] [--seed 0] [--steps 300] \
        [--out FILE.json] [HopeConfig flags of scripts/synthetic.py]

Trains the suite's HOPE exactly as `scripts/synthetic.py mqar --kv-pairs N --lrs 3e-3 --seeds S` does (same data,
same seeded batches), then, at init and after training, on 64 held-out MQAR sequences, per layer (tokens whose
feature `a` is zero left out):
- `eta`, `alpha`: the mean inner rate and retention of the main memory's writes;
- `hidden_left`: how much of the main memory's hidden pre-activation at each token's key is left after the
  sequence, `|W2_end k_t| / |W2_0 k_t|` (W2's DGD erase removes it where eta is ~1);
- `read_moved`: how far the sequence's writes move the main memory's read at each query,
  `|M_end(q_t) - M_0(q_t)| / |M_0(q_t)|`;
- `accuracy` on the 500 test sequences as trained, and with the same weights read with `memory_read="token_output"`
  (the hidden layer at the chunk start) and `"chunk"` (nothing written in the sequence is read).
"""
import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "results" / "diagnostics")]

from hope_hf.data import masked_next_token_accuracy  # noqa: E402
from hope_hf.experiments import evaluate_accuracy  # noqa: E402
from hope_hf.models.hope.cache_hope import LayerState  # noqa: E402
from hope_hf.models.hope.modeling_hope import HopeForCausalLM  # noqa: E402
from hope_hf.models.hope.primitives import l2norm, memory_read  # noqa: E402
from index_drift import measure_training, memories_after, mixer_inputs, rates  # noqa: E402


@torch.no_grad()
def writes(model: HopeForCausalLM, batch: dict) -> list:
    inputs = mixer_inputs(model, batch)
    config, length = model.config, batch["input_ids"].shape[1]
    initial, end = memories_after(model, batch, 0), memories_after(model, batch, length)
    act, eps = config.memory_activation, config.norm_eps
    rows = []
    for i, layer in enumerate(model.model.layers):
        mixer = layer.mixer
        a, q = mixer.features(inputs[i], LayerState(), batch["attention_mask"].bool())
        a, q = mixer.split_heads(a).transpose(1, 2), q.transpose(1, 2)  # [B, H, T, D]
        norms = a.norm(dim=-1)
        live = norms > 1e-4 * norms.max()
        key = l2norm(memory_read(initial[i]["k"], a, act), eps)  # the projections' chunk-start state: 64-token chunks
        w2_0, w2_end = initial[i]["mem"]["W2"], end[i]["mem"]["W2"]
        hidden_left = (key @ w2_end.transpose(-1, -2)).norm(dim=-1) / (key @ w2_0.transpose(-1, -2)).norm(dim=-1)
        read_0, read_end = memory_read(initial[i]["mem"], q, act), memory_read(end[i]["mem"], q, act)
        moved = (read_end - read_0).norm(dim=-1) / read_0.norm(dim=-1).clamp_min(eps)
        eta, alpha = rates(mixer, initial[i], a, act)
        rows.append({"layer": i, "eta": round(eta, 4), "alpha": round(alpha, 5),
                     "hidden_left": round(float(hidden_left[live].mean()), 4),
                     "read_moved": round(float(moved[live].mean()), 4)})
    return rows


def accuracies(model: HopeForCausalLM, test, collate) -> dict:
    score = functools.partial(evaluate_accuracy, dataset=test, collate=collate, accuracy=masked_next_token_accuracy)
    out = {}
    trained = [layer.mixer.rule for layer in model.model.layers]
    for read in ("token", "token_output", "chunk"):
        for layer, rule in zip(model.model.layers, trained):
            layer.mixer.rule = dataclasses.replace(rule, memory_read=read)
        out[read] = round(score(model), 4)
    for layer, rule in zip(model.model.layers, trained):
        layer.mixer.rule = rule
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-pairs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=300, help="0: measure at init only")
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args, config_flags = parser.parse_known_args()
    measure_training(args, config_flags, args.kv_pairs, "writes", writes, accuracies)


if __name__ == "__main__":
    main()
