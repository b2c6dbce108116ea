"""Why does one seed of the default HOPE learn parity and another stay at chance? (issue 12;
`results/in_context/README.md` section 20.)

    OMP_NUM_THREADS=1 python results/diagnostics/parity_seeds.py [--seeds 0 1] [--steps 200] [--every 25] \
        [--lr 3e-3] [--out FILE.json] [HopeConfig flags of scripts/synthetic.py]

Trains the suite's HOPE on parity exactly as `scripts/synthetic.py formal --languages parity --lrs LR --seeds S` does
(same data, same seeded batches and init) and measures it every `--every` steps on 64 held-out strings of 12-40 bits
(training lengths; the first bit is at least 10 tokens before the `<cls>` token that answers, beyond the conv window):
- `accuracy`, `loss`: on the probe's yes/no decision;
- `reach_first` / `reach_last`: the mean change of the decision margin `logit(<yes>) - logit(<no>)` at `<cls>` when
  the string's first / last bit is flipped (either flip changes the answer), and `flip_first_follows`: the fraction
  of strings whose prediction changes with the first bit (1.0 for a model that computes parity, ~0 for one that
  ignores the bit);
- per layer: the main memory's inner rate eta on `1` and `0` tokens (mean over the probe's bits, per head) and its
  retention alpha. With chunk sizes above the strings' length the projection memories stay at their initial state
  over a string, so these are the rates the scan uses.
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "results" / "diagnostics")]

from hope_hf.data.synthetic import (FORMAL_LANGUAGES, FORMAL_VOCAB, PAD_ID, FormalLanguageDataset,  # noqa: E402
                                    formal_language_collate)
from hope_hf.data.synthetic.formal_language_task import FORMAL_TOKEN_TO_ID, NO_ID, YES_ID  # noqa: E402
from hope_hf.experiments import train_model  # noqa: E402
from hope_hf.models.hope.cache_hope import LayerState  # noqa: E402
from hope_hf.models.hope.modeling_hope import HopeForCausalLM  # noqa: E402
from hope_hf.models.hope.primitives import memory_read, readout_rates  # noqa: E402
from index_drift import memories_after, mixer_inputs  # noqa: E402
import synthetic  # noqa: E402  (scripts/synthetic.py: the suite's parser, config and budget)

ZERO, ONE = FORMAL_TOKEN_TO_ID["0"], FORMAL_TOKEN_TO_ID["1"]


def probe_strings(suite: argparse.Namespace, seed: int, count: int = 64, min_bits: int = 12) -> dict:
    """`count` held-out parity strings (the suite's held-out set of the training lengths) of at least `min_bits` bits,
    collated, with the positions of the first and last bit and of the token whose logits answer."""
    short_min, short_max = suite.train_lengths
    held_out = FormalLanguageDataset.generate("parity", 4 * suite.num_test, short_min, short_max, seed=seed + 1)
    items = [item for item in held_out if int((item["input_ids"] == ZERO).sum() + (item["input_ids"] == ONE).sum())
             >= min_bits][:count]
    batch = formal_language_collate(items)
    lengths = batch["attention_mask"].sum(1)
    batch["answer_at"] = lengths - 2  # `<cls>`: its logits predict the label, the sequence's last token
    batch["first_bit"] = torch.ones_like(lengths)  # after `<bos>`
    batch["last_bit"] = lengths - 3
    return batch


def flipped(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    out = input_ids.clone()
    rows = torch.arange(len(out))
    out[rows, positions] = torch.where(out[rows, positions] == ONE, ZERO, ONE)
    return out


@torch.no_grad()
def margins(model: HopeForCausalLM, batch: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """logit(<yes>) - logit(<no>) at `<cls>`: [B]."""
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
    at = logits[torch.arange(len(logits)), batch["answer_at"]]
    return at[:, YES_ID] - at[:, NO_ID]


@torch.no_grad()
def measure(model: HopeForCausalLM, batch: dict) -> dict:
    was_training = model.training
    model.eval()
    ids = batch["input_ids"]
    base = margins(model, batch, ids)
    target_yes = batch["labels"][torch.arange(len(ids)), batch["answer_at"] + 1] == YES_ID
    sign = torch.where(target_yes, 1.0, -1.0)
    row = {"accuracy": round(float(((base > 0) == target_yes).float().mean()), 4),
           "loss": round(float(torch.nn.functional.softplus(-sign * base).mean()), 4)}
    first = margins(model, batch, flipped(ids, batch["first_bit"]))
    last = margins(model, batch, flipped(ids, batch["last_bit"]))
    row["reach_first"] = round(float((first - base).abs().mean()), 4)
    row["reach_last"] = round(float((last - base).abs().mean()), 4)
    row["flip_first_follows"] = round(float(((first > 0) != (base > 0)).float().mean()), 4)
    inputs = mixer_inputs(model, batch)
    mask = batch["attention_mask"].bool()
    is_one, is_zero = (ids == ONE), (ids == ZERO)  # [B, T]
    initial_states = memories_after(model, batch, 0)
    layers = []
    for i, layer in enumerate(model.model.layers):
        mixer = layer.mixer
        a, _ = mixer.features(inputs[i], LayerState(), mask)
        a = mixer.split_heads(a).transpose(1, 2)  # [B, H, T, D]
        initial = initial_states[i]
        act = model.config.memory_activation
        eta, alpha = readout_rates(memory_read(initial["eta"], a, act), memory_read(initial["alpha"], a, act),
                                   mixer.eta_readout, mixer.eta_bias, mixer.alpha_readout, mixer.alpha_bias,
                                   model.config.eta_max)  # [B, H, T]
        mean_at = lambda x, where: (x * where[:, None]).sum((0, 2)) / where.sum()  # noqa: E731  per head [H]
        layers.append({"eta_on_1": [round(float(e), 3) for e in mean_at(eta, is_one)],
                       "eta_on_0": [round(float(e), 3) for e in mean_at(eta, is_zero)],
                       "alpha": [round(float(x), 4) for x in mean_at(alpha, is_one | is_zero)]})
    row["layers"] = layers
    model.train(was_training)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args, config_flags = parser.parse_known_args()
    suite = synthetic.build_parser().parse_args(["formal", "--languages", "parity", *config_flags])
    config = synthetic.hope_config(suite, len(FORMAL_VOCAB), PAD_ID)
    data_seed = suite.seed + 1000 * list(FORMAL_LANGUAGES).index("parity")  # as `synthetic.run_formal`
    train = FormalLanguageDataset.generate("parity", suite.num_train, *suite.train_lengths, seed=data_seed)
    probe = probe_strings(suite, data_seed)
    table = {}
    for seed in args.seeds:
        torch.manual_seed(seed)  # as `hope_and_llama` initialises the HOPE
        model = HopeForCausalLM(config)
        curve = [{"step": 0, **measure(model, probe)}]
        print(f"seed {seed}", curve[-1], flush=True)

        def on_step(step, m, curve=curve):
            if step % args.every == 0:
                curve.append({"step": step, **measure(m, probe)})
                print(f"seed {seed}", {k: v for k, v in curve[-1].items() if k != "layers"}, flush=True)

        budget = replace(synthetic.budget_for("formal", suite), lr=args.lr, seed=seed, steps=args.steps)
        train_model(model, train, formal_language_collate, budget, desc=f"HOPE parity seed={seed}", on_step=on_step)
        table[f"seed {seed}"] = curve
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "config_flags": config_flags, "table": table},
                                             indent=1))


if __name__ == "__main__":
    main()
