"""Repro: does the trained quickstart HOPE (128-token training blocks) give non-finite logits on long inputs?

    python -m hope_hf.quickstart --out runs/quickstart   # or any saved HOPE
    python results/diagnostics/repro_long_nan.py runs/quickstart

Reads the longest Paul Graham essay (1024 tokens) in one call, fp32 and bf16, and prints the first
position whose logits are non-finite and the first module (in call order) with a non-finite output.
Before commit 5bf3048 (unnormalised CMS step) the logits were non-finite from position 448 on, first in
`model.layers.0.cms.levels.1` (C=128); with the normalised step all 1024 positions are finite (fp32, bf16).
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hope_hf  # noqa: F401  (registers the Auto classes)
from hope_hf.data import load_paul_graham_essays

path = sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"
model = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
essay = sorted(load_paul_graham_essays(), key=len, reverse=True)[0]
ids = torch.tensor(tok(essay)["input_ids"][:1024])[None]
first = []


def hook(mod, inp, out):
    t = out[0] if isinstance(out, tuple) else out
    if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all() and not first:
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        first.append((next(n for n, mm in model.named_modules() if mm is mod), bad))


for mod in model.modules():
    mod.register_forward_hook(hook)
for bf16 in (False, True):
    first.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(ids, use_cache=False).logits.float()
    finite = torch.isfinite(logits).all(-1)[0]
    where = int((~finite).nonzero()[0]) if (~finite).any() else None
    print(f"bf16={bf16}: first non-finite position {where}; first module with a non-finite output: {first[:1]}")
