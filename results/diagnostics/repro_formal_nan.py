"""Repro: the synthetic-suite HOPE (d=64, 2 layers, CMS [8, None]) on a formal language at AdamW lr 3e-3.

    OMP_NUM_THREADS=1 python results/diagnostics/repro_formal_nan.py abab_star [extra synthetic.py flags]

Trains HOPE exactly as `scripts/synthetic.py formal` does for that language (same data seed, model seed,
batches and schedule; no time cap) until the loss is non-finite or the 300 steps end. On divergence it
reloads the weights of the last two steps and re-runs the next step's batch (forward + backward) with the
chunked and the reference scans: non-finite weights, loss, gradient norm, non-finite gradients, the first
module (in call order) whose output is non-finite and the largest |output| per module, and each
adaptive CMS level's learned eta, alpha and weight norms.
"""
import copy
import importlib.util
import sys
from pathlib import Path

import torch

from hope_hf import scan_implementation
from hope_hf.data.synthetic import FORMAL_LANGUAGES, FORMAL_VOCAB, PAD_ID, FormalLanguageDataset, formal_language_collate
from hope_hf.experiments import hope_and_llama, train_model

spec = importlib.util.spec_from_file_location("synthetic", Path(__file__).resolve().parents[2] / "scripts" / "synthetic.py")
synthetic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(synthetic)

language = sys.argv[1]
args = synthetic.build_parser().parse_args(["formal", "--languages", language, *sys.argv[2:]])
budget = synthetic.budget_for("formal", args)
config = synthetic.hope_config(args, len(FORMAL_VOCAB), PAD_ID)
seed = args.seed + 1000 * list(FORMAL_LANGUAGES).index(language)  # the data seed of the full suite
train = FormalLanguageDataset.generate(language, args.num_train, *args.train_lengths, seed=seed)
model = hope_and_llama(config, args.test_lengths[1] + 3, seed=args.seed)["HOPE"]
snapshots = [(0, copy.deepcopy(model.state_dict()))]  # (step, weights after it): the last two steps


def snapshot(step, m):
    snapshots[:] = [*snapshots[-1:], (step, copy.deepcopy(m.state_dict()))]


summary = train_model(model, train, formal_language_collate, budget, desc=f"HOPE {language}", on_step=snapshot)
losses = summary["losses"]
print(f"{language}: {summary['steps']} steps, diverged_at_step={summary['diverged_at_step']}, "
      f"losses at steps 1, 50, 100, ...: {[round(x, 3) for x in losses[::50]]}, last 5: {[round(x, 3) for x in losses[-5:]]}")
if summary["diverged_at_step"] is None:
    sys.exit(0)

# Replay the batch sampler (train_model draws one index batch per step).
generator = torch.Generator().manual_seed(budget.seed)
batches = [torch.randint(0, len(train), (budget.batch_size,), generator=generator).tolist()
           for _ in range(summary["diverged_at_step"])]
names = {mod: name for name, mod in model.named_modules()}
record = []


def hook(mod, inp, out):
    t = out[0] if isinstance(out, tuple) else out
    if torch.is_tensor(t) and t.is_floating_point():
        record.append((names[mod], type(mod).__name__, bool(torch.isfinite(t).all()),
                       float(t.detach().abs().nan_to_num(0, 0, 0).max())))


handles = [mod.register_forward_hook(hook) for mod in model.modules()]
for step, state in snapshots:
    model.load_state_dict(state)
    model.train()
    bad_weights = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    batch = formal_language_collate([train[i] for i in batches[step]])  # the batch of step `step + 1`
    print(f"weights after step {step}: non-finite tensors {bad_weights[:4]}; forward of step {step + 1}:")
    for name, mod in model.named_modules():
        if type(mod).__name__ == "CMSLevel" and mod.chunk_size is not None:  # learned inner rate and retention
            norms = {k: round(getattr(mod, f"{k}_proj").weight.norm().item(), 2) for k in ("gate", "up", "down", "value")}
            print(f"  {name}: eta {torch.nn.functional.softplus(mod.eta_logit).item():.4f}, "
                  f"alpha {torch.sigmoid(mod.alpha_logit).item():.4f}, weight norms {norms}")
    for name in ("chunked", "reference"):
        record.clear()
        model.zero_grad(set_to_none=True)
        with scan_implementation(model, name):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], use_cache=False)
        out.loss.backward()
        grad_bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        bad = [r for r in record if not r[2]]
        print(f"  {name}: loss {out.loss.item():.4f}, grad norm {norm.item():.3g}, non-finite grads {grad_bad[:4]}; "
              f"first module with a non-finite output: {bad[0][:2] if bad else None}")
        print("    largest |output| per module:", sorted(((round(r[3], 1), r[0]) for r in record), reverse=True)[:6])
