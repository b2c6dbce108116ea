"""Repro: the quickstart HOPE (5.4M, self_modifying/deep, CMS [32, 128, None]) at AdamW lr 3e-3.

    OMP_NUM_THREADS=1 python results/diagnostics/repro_cms_nan.py fp32 3e-3 7

Prints step, loss, grad norm, then the first module whose output is non-finite on the last batch, with the
chunked and the reference scans. Before commit 5bf3048 (unnormalised CMS step) the loss was NaN at step 4 in
fp32 and bf16 alike, first in `CMSLevel model.layers.2.cms.levels.0` (the C=32 adaptive level). With the
normalised step it stays finite: fp32 and bf16 through 7 steps, fp32 through 40 steps (loss 8.34 -> 5.86),
and no module has a non-finite output.
Optional 4th argument: JSON of HopeConfig overrides, e.g. '{"cms_chunk_sizes": [null]}'.
"""
import json
import math
import sys

import torch

from hope_hf import HopeConfig, HopeForCausalLM, scan_implementation
from hope_hf.data import load_shakespeare_text, tokenize_and_chunk, train_bpe_tokenizer
from hope_hf.quickstart import QUICKSTART_MODEL

bf16, lr, steps = sys.argv[1] == "bf16", float(sys.argv[2]), int(sys.argv[3])
text = load_shakespeare_text(max_chars=400000)
tok = train_bpe_tokenizer([text], vocab_size=4096)
ds = tokenize_and_chunk(text, tok, 128)
torch.manual_seed(0)
kw = dict(QUICKSTART_MODEL)
kw.update(json.loads(sys.argv[4]) if len(sys.argv) > 4 else {})
m = HopeForCausalLM(HopeConfig(vocab_size=len(tok), **kw))
opt = torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95))
g = torch.Generator().manual_seed(0)
for step in range(steps):
    x = ds.tensors["input_ids"][torch.randint(0, len(ds), (8,), generator=g)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = m(x, labels=x).loss
    opt.zero_grad()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    print(step, round(loss.item(), 3), round(norm.item(), 3), flush=True)
    if not math.isfinite(loss.item()):
        break
    opt.step()

first = []


def hook(mod, inp, out):
    t = out[0] if isinstance(out, tuple) else out
    if torch.is_tensor(t) and not torch.isfinite(t).all() and not first:
        first.append(mod.__class__.__name__ + " " + next(n for n, mm in m.named_modules() if mm is mod))


for mod in m.modules():
    mod.register_forward_hook(hook)
for name in ("chunked", "reference"):
    first.clear()
    with torch.no_grad(), scan_implementation(m, name):
        m(x)
    print(f"{name}: first module with a non-finite output: {first}")
