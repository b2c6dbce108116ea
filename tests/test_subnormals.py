"""Decaying fast weights stay out of the subnormal range (issue 14): x86 arithmetic on subnormal floats is
~100x slower, and a state that decays where nothing writes reaches that range after enough updates (with
alpha 0.9, CMS level weights are all subnormal after ~16K tokens without the flush; with the defaults, the
projection memories' W2 reaches ~1e-38 after 12-16K tokens: the erase term removes its component along
every key, and its writes are small)."""

import torch

from conftest import tiny_model
from hope_hf.models.hope.hf_compat import output_cache
from hope_hf.models.hope.primitives import FLUSH_OFFSET, flush_subnormals


def subnormal_count(cache) -> int:
    count = 0
    for layer in cache.layers:
        for tensor in layer.state.flatten().values():
            if tensor.is_floating_point():
                tiny = torch.finfo(tensor.dtype).tiny
                count += int(((tensor != 0) & (tensor.abs() < tiny)).sum())
    return count


def test_flush_subnormals_zeroes_tiny_entries_and_keeps_the_rest():
    for dtype in (torch.float32, torch.float64):
        tiny = torch.finfo(dtype).tiny
        gen = torch.Generator().manual_seed(0)
        normal = torch.randn(1000, dtype=dtype, generator=gen) * torch.logspace(-30, 3, 1000, dtype=dtype)
        subnormal = (torch.rand(1000, dtype=dtype, generator=gen) - 0.5) * tiny
        out = flush_subnormals(torch.cat([normal, subnormal]))
        assert bool(((out != 0) & (out.abs() < tiny)).sum() == 0)  # nothing subnormal comes out
        assert float((out - torch.cat([normal, subnormal])).abs().max()) <= 2 * FLUSH_OFFSET
        if dtype == torch.float32:  # weights above 2^-39 unchanged; below the offset's half-spacing (2^-88): zero
            assert bool((out[:1000][normal.abs() > 2e-12] == normal[normal.abs() > 2e-12]).all())
            assert bool((out[:1000][normal.abs() < 1e-28] == 0).all())


def test_a_16k_token_stream_leaves_no_subnormal_in_the_cache():
    model = tiny_model(seed=0, alpha_init=0.9, cms_alpha_init=0.9, cms_chunk_sizes=[4, None], num_hidden_layers=1,
                       chunk_size=8, memory_chunk_size=16)
    ids = torch.randint(3, 61, (1, 16384), generator=torch.Generator().manual_seed(1))
    cache = None
    with torch.no_grad():
        for first in range(0, ids.shape[1], 4096):  # prefill pieces
            cache = output_cache(model(ids[:, first:first + 4096], cache=cache, use_cache=True))
        for t in range(4):  # and single-token decoding steps, across a CMS chunk boundary
            cache = output_cache(model(ids[:, t:t + 1], cache=cache, use_cache=True))
    assert int(cache.cms_update_counts(0)[0][0]) == 16388 // 4
    assert subnormal_count(cache) == 0
