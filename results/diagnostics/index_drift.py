"""Why does the default HOPE recall worse than with `chunk_size=64`? How far the in-context updates move the
index under which a pair is stored (issue 12; `results/in_context/README.md` section 16).

    OMP_NUM_THREADS=1 python results/diagnostics/index_drift.py [--seed 0] [--steps 300] [--out FILE.json] \
        [HopeConfig flags of scripts/synthetic.py, e.g. --chunk_size 64]

Trains the suite's HOPE exactly as `scripts/synthetic.py mqar --kv-pairs 4 --lrs 3e-3 --seeds S` does (same data,
same seeded batches; `--steps 0`: at init only), and measures, at init and after training, on 64 held-out MQAR
sequences (64 tokens: the 4 pairs at positions 0-7, written through the projections' initial state with the default
`chunk_size` 16; the queries after), per layer, on the tokens of the last projection chunk (filler tokens whose
feature `a` is zero left out), how the projection memories' read differs between their initial state and their
state at the start of that chunk (which is what those tokens read):
- `key_drift`: `1 - cos` of the keys `M_k(a)` (cosine of the keys before their l2 normalisation);
- `value_change`: `|M_v(a) - M_v0(a)| / |M_v0(a)|`;
- the mean inner rate `eta_t` and retention `alpha_t` from the rate memories at the two states;
- `feature_drift`: the relative change of the main memory's hidden features `act(W2 q)` between its initial state
  and the start of its last chunk (non-zero when `memory_chunk_size` is below the sequence length).
All of these are 0 when the chunk sizes cover the sequence (64). Then `accuracy` on the 500 test sequences with the
chunk sizes the model was trained with, and the same weights evaluated with every memory held at its initial state
over the whole sequence (`chunk_size` = `memory_chunk_size` = 64): does the trained model use, or suffer from, the
in-context updates of its projections?
"""
import argparse
import functools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from hope_hf.data import generate_mqar, masked_next_token_accuracy, pad_collate  # noqa: E402
from hope_hf.data.synthetic import FILLER_ID  # noqa: E402
from hope_hf.experiments import evaluate_accuracy, train_model  # noqa: E402
from hope_hf.models.hope.cache_hope import LayerState  # noqa: E402
from hope_hf.models.hope.modeling_hope import HopeForCausalLM  # noqa: E402
from hope_hf.models.hope.primitives import activation, memory_read, readout_rates  # noqa: E402
import synthetic  # noqa: E402  (scripts/synthetic.py: the suite's parser, config and budget)


@torch.no_grad()
def memories_after(model: HopeForCausalLM, batch: dict, length: int) -> list:
    """Per layer: memory name -> weights after the first `length` tokens (a chunk boundary, where the
    chunk-start state is the current one), or the initial weights for `length` 0."""
    if length == 0:
        size = batch["input_ids"].shape[0]
        return [{name: mem.expand(size) for name, mem in layer.mixer.memories.items()} for layer in model.model.layers]
    out = model(input_ids=batch["input_ids"][:, :length], attention_mask=batch["attention_mask"][:, :length],
                use_cache=True)
    return [{name: mem.current for name, mem in layer.state.memories.items()} for layer in out.past_key_values.layers]


@torch.no_grad()
def mixer_inputs(model: HopeForCausalLM, batch: dict) -> dict:
    """Layer index -> the hidden states its mixer reads [B, T, d], from one forward pass over the batch."""
    inputs = {}
    hooks = [layer.mixer.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, layer in enumerate(model.model.layers)]
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    return inputs


def rates(mixer, weights: dict, a: torch.Tensor, act: str) -> tuple:
    """Mean eta_t and alpha_t (paper Eq. 86-87) that the rate memories of `weights` give the features a [B, H, T, D]."""
    eta, alpha = readout_rates(memory_read(weights["eta"], a, act), memory_read(weights["alpha"], a, act),
                               mixer.eta_readout, mixer.eta_bias, mixer.alpha_readout, mixer.alpha_bias,
                               mixer.config.eta_max)
    return float(eta.mean()), float(alpha.mean())


@torch.no_grad()
def drift(model: HopeForCausalLM, batch: dict) -> list:
    """Per layer: how the projections read by the last chunk's tokens differ between the memories' initial state
    and their chunk-start state in that chunk (see the module docstring). Tokens whose feature `a` is zero (filler
    tokens whose conv window holds only the zero embedding of the pad id: below 1e-4 of the largest) are left out."""
    inputs = mixer_inputs(model, batch)
    config, length = model.config, batch["input_ids"].shape[1]
    key_start = (length - 1) // config.chunk_size * config.chunk_size
    mem_start = (length - 1) // config.memory_chunk_size * config.memory_chunk_size
    states = {n: memories_after(model, batch, n) for n in {0, key_start, mem_start}}  # one forward per distinct start
    initial, at_key_start, at_mem_start = states[0], states[key_start], states[mem_start]
    act, eps = config.memory_activation, config.norm_eps
    rows = []
    for i, layer in enumerate(model.model.layers):
        mixer = layer.mixer
        a, q = mixer.features(inputs[i], LayerState(), batch["attention_mask"].bool())
        a = mixer.split_heads(a).transpose(1, 2)  # [B, H, T, D]
        norms = a.norm(dim=-1)
        live = (norms > 1e-4 * norms.max())[..., key_start:]  # [B, H, T_last]
        a_last = a[:, :, key_start:]
        k0 = memory_read(initial[i]["k"], a_last, act)  # the key before its l2 normalisation
        k1 = memory_read(at_key_start[i]["k"], a_last, act)
        cos = ((k0 * k1).sum(-1) / (k0.norm(dim=-1) * k1.norm(dim=-1)).clamp_min(1e-30))[live]
        v0 = memory_read(initial[i]["v"], a_last, act)
        v1 = memory_read(at_key_start[i]["v"], a_last, act)
        v_change = ((v1 - v0).norm(dim=-1) / v0.norm(dim=-1).clamp_min(eps))[live]
        eta0, alpha0 = rates(mixer, initial[i], a_last, act)
        eta1, alpha1 = rates(mixer, at_key_start[i], a_last, act)
        row = {"layer": i, "tokens": int(live.sum()), "key_drift": round(float((1 - cos).mean()), 4),
               "value_change": round(float(v_change.mean()), 4), "eta (initial -> drifted)": [round(eta0, 4), round(eta1, 4)],
               "alpha (initial -> drifted)": [round(alpha0, 5), round(alpha1, 5)]}
        if "W2" in initial[i]["mem"]:
            q = q.transpose(1, 2)[:, :, mem_start:]
            h0 = activation(act, q @ initial[i]["mem"]["W2"].transpose(-1, -2))
            h1 = activation(act, q @ at_mem_start[i]["mem"]["W2"].transpose(-1, -2))
            row["feature_drift"] = round(float((h1 - h0).norm(dim=-1).mean() / h0.norm(dim=-1).mean()), 4)
        rows.append(row)
    return rows


def accuracies(model: HopeForCausalLM, test, collate) -> dict:
    score = functools.partial(evaluate_accuracy, dataset=test, collate=collate, accuracy=masked_next_token_accuracy)
    trained = (model.config.chunk_size, model.config.memory_chunk_size)
    out = {f"as trained ({trained[0]}/{trained[1]})": round(score(model), 4)}
    model.config.chunk_size = model.config.memory_chunk_size = 64
    out["held at chunk start (64/64)"] = round(score(model), 4)
    model.config.chunk_size, model.config.memory_chunk_size = trained
    return out


def measure_training(args: argparse.Namespace, config_flags: list, kv_pairs: int, name: str, measure, accuracies) -> dict:
    """Trains the suite's HOPE on MQAR with `kv_pairs` pairs exactly as `scripts/synthetic.py mqar --lrs LR --seeds S`
    does (same data, same seeded batches; `args.steps` 0: at init only) and measures it at init and after training:
    `measure(model, probe)` on 64 held-out sequences (stored under `name`) and `accuracies(model, test, collate)` on
    the 500 test sequences. Writes the table to `args.out` (JSON) when given, and returns it."""
    suite = synthetic.build_parser().parse_args(["mqar", "--kv-pairs", str(kv_pairs), *config_flags])
    config = synthetic.hope_config(suite, suite.mqar_vocab, FILLER_ID)
    collate = functools.partial(pad_collate, pad_token_id=FILLER_ID)
    common = dict(vocab_size=suite.mqar_vocab, seq_len=suite.mqar_seq_len, num_kv_pairs=kv_pairs)
    train = generate_mqar(suite.mqar_train, seed=args.seed, **common)
    test = generate_mqar(500, seed=args.seed + 1, **common)
    probe = collate([test[i] for i in range(64)])
    torch.manual_seed(args.seed)  # as `hope_and_llama` initialises the HOPE
    model = HopeForCausalLM(config)
    table = {"init": {name: measure(model, probe), "accuracy": accuracies(model, test, collate)}}
    print("init:", table["init"], flush=True)
    if args.steps:
        budget = replace(synthetic.budget_for("mqar", suite), lr=args.lr, seed=args.seed, steps=args.steps)
        train_model(model, train, collate, budget, desc=f"HOPE lr={args.lr}")
        model.eval()
        table["trained"] = {name: measure(model, probe), "accuracy": accuracies(model, test, collate)}
        print("trained:", table["trained"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "config_flags": config_flags, "table": table},
                                             indent=2))
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=300, help="0: measure at init only")
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args, config_flags = parser.parse_known_args()
    measure_training(args, config_flags, 4, "drift", drift, accuracies)


if __name__ == "__main__":
    main()
