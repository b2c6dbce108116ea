"""Why the default HOPE's training goes to NaN at lr 1e-2 on MQAR 4 pairs (issue 12; sweep_mqar4_eta_max2: NaN at
steps 84 / 89). Trains the suite's model with the sweep's budget and records, every step: the loss, the gradient
norm before clipping, the largest |weight| of each parameter group, and the inner rates (eta, alpha) and the
largest |state| each memory reaches in the forward pass; at the first non-finite loss it names the first module
whose output is non-finite.

    python results/diagnostics/outer_lr_divergence.py --lr 1e-2 --seed 0 [--memory_type linear] > out.txt
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from hope_hf import HopeConfig, HopeForCausalLM  # noqa: E402
from hope_hf.data import generate_mqar, pad_collate  # noqa: E402
from hope_hf.data.synthetic import FILLER_ID  # noqa: E402
from hope_hf.experiments import TrainBudget, _lr_factor  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=1e-2)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--steps", type=int, default=120)
parser.add_argument("--memory_type", default="deep")
parser.add_argument("--max_grad_norm", type=float, default=1.0)
args = parser.parse_args()
torch.set_num_threads(1)

train = generate_mqar(8000, seed=0, vocab_size=128, seq_len=64, num_kv_pairs=4)
torch.manual_seed(args.seed)
model = HopeForCausalLM(HopeConfig(vocab_size=128, pad_token_id=FILLER_ID, hidden_size=64, num_hidden_layers=2,
                                   num_heads=4, cms_chunk_sizes=[8, None], memory_type=args.memory_type))
budget = TrainBudget(steps=300, batch_size=32, lr=args.lr, seed=args.seed)
optimizer = torch.optim.AdamW(model.parameters(), lr=budget.lr, betas=(0.9, 0.95), weight_decay=0.0)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, budget))
generator = torch.Generator().manual_seed(budget.seed)

outputs = {}


def record(name):
    def hook(module, inputs, output):
        tensor = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(tensor):
            outputs.setdefault(name, float(tensor.detach().abs().max()) if torch.isfinite(tensor).all() else math.nan)
    return hook


for name, module in model.named_modules():
    if name and name.count(".") <= 4:
        module.register_forward_hook(record(name))

groups = {}
for name, p in model.named_parameters():
    key = ".".join(k for k in name.split(".") if not k.isdigit())
    groups.setdefault(key, []).append(p)

for step in range(args.steps):
    outputs.clear()
    indices = torch.randint(0, len(train), (budget.batch_size,), generator=generator).tolist()
    batch = pad_collate([train[i] for i in indices], pad_token_id=FILLER_ID)
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 use_cache=False).loss
    if not math.isfinite(loss.item()):
        bad = [n for n, v in outputs.items() if not math.isfinite(v)]
        print(f"step {step + 1}: loss {loss.item()}; first non-finite module outputs: {bad[:6]}")
        print("largest finite outputs:", sorted(((v, n) for n, v in outputs.items() if math.isfinite(v)))[-6:])
        break
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {k: float(torch.stack([p.grad.norm() for p in ps if p.grad is not None]).norm()) for k, ps in groups.items()
             if any(p.grad is not None for p in ps)}
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    if step % 5 == 0 or step > 70:
        top = sorted(grads.items(), key=lambda kv: -kv[1])[:3]
        weights = sorted(((float(max(p.detach().abs().max() for p in ps)), k) for k, ps in groups.items()))[-3:]
        big = sorted(((v, n) for n, v in outputs.items() if math.isfinite(v)))[-2:]
        print(f"step {step + 1}: loss {loss.item():.3f} grad {float(total):.2f} top grads "
              f"{[(k.replace('model.layers.', ''), round(v, 2)) for k, v in top]} max|w| "
              f"{[(k.replace('model.layers.', ''), round(v, 2)) for v, k in weights]} max|out| "
              f"{[(n, round(v, 1)) for v, n in big]}", flush=True)
