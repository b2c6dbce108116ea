"""Where the default HOPE's FLOPs go (issue 14): FLOPs per token of one forward + backward, as
`scripts/bench_speed.py` counts them (torch's FlopCounterMode: matrix products and attention), for the
bench's d=256, 4-layer, vocab-8192 model and variants that remove one part at a time, against the bench's
same-size Llama. At Llama's FLOP efficiency a model's training speed ratio would be Llama's FLOPs / its FLOPs.

    OMP_NUM_THREADS=1 python results/diagnostics/flops_breakdown.py > results/diagnostics/flops_breakdown.txt
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from bench_speed import build_model, counted_flops, parse_size  # noqa: E402

from hope_hf import HopeConfig, HopeForCausalLM  # noqa: E402

VARIANTS = [
    ("HOPE default", {}),
    ("memory_read='chunk'", dict(memory_read="chunk")),
    ("memory_type='linear'", dict(memory_type="linear")),
    ("mixer='attention' (Hope-Attention)", dict(mixer="attention")),
    ("CMS levels all static", dict(cms_chunk_sizes=[None, None, None])),
    ("in_context_updates=False", dict(in_context_updates=False)),
]

if __name__ == "__main__":
    torch.set_num_threads(1)
    size = parse_size("")
    length = 512
    ids = torch.randint(0, size["vocab"], (1, length), generator=torch.Generator().manual_seed(0))
    llama = counted_flops(build_model("llama", size).train(), ids, False) / length
    print(f"{'model':36s} {'MFLOP/token':>12s} {'x Llama':>8s} {'speed bound':>12s}")
    print(f"{'Llama (bench row)':36s} {llama / 1e6:12.1f} {1.0:8.2f} {1.0:12.2f}")
    base = dict(vocab_size=size["vocab"], hidden_size=size["d"], num_hidden_layers=size["layers"], num_heads=size["heads"])
    for name, overrides in VARIANTS:
        torch.manual_seed(0)
        model = HopeForCausalLM(HopeConfig(**base, **overrides)).train()
        flops = counted_flops(model, ids, False) / length
        print(f"{name:36s} {flops / 1e6:12.1f} {flops / llama:8.2f} {llama / flops:12.2f}", flush=True)
