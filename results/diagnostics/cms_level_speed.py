"""Seconds of one CMS level's forward + backward over T=2048 tokens (d=256, batch 1, the default config's
eta / alpha init, weights ~N(0, 0.02)), for the C=16 and C=256 levels of the default HOPE. One thread:

    OMP_NUM_THREADS=1 PYTHONPATH=. python results/diagnostics/cms_level_speed.py

Run it on two checkouts (PYTHONPATH) to compare CMS code (issue 14; output in cms_level_speed.txt)."""

import math
import time

import torch

from hope_hf import HopeConfig
from hope_hf.models.hope.cache_hope import LayerState
from hope_hf.models.hope.modeling_hope import CMSLevel


def time_level(chunk_size: int, repeats: int = 4) -> list:
    torch.manual_seed(0)
    config = HopeConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_heads=4)
    level = CMSLevel(config, chunk_size)
    with torch.no_grad():  # as `HopePreTrainedModel._init_weights` would set them
        level.eta_logit.fill_(math.log(math.expm1(config.cms_eta_init)))
        level.alpha_logit.fill_(math.log(config.cms_alpha_init / (1 - config.cms_alpha_init)))
        for weight in (level.gate_proj.weight, level.up_proj.weight, level.down_proj.weight, level.value_proj.weight):
            weight.normal_(0, 0.02)
    x = torch.randn(1, 2048, 256, requires_grad=True)
    mask, seen = torch.ones(1, 2048, dtype=torch.bool), torch.zeros(1, dtype=torch.long)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        level(x, LayerState(), 0, mask, seen).square().sum().backward()
        times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    torch.set_num_threads(1)
    for chunk_size in (16, 256):
        times = time_level(chunk_size)
        print(f"C={chunk_size}: fwd+bwd s per repeat {[round(t, 3) for t in times]}, min {min(times):.3f}")
