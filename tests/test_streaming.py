"""Stream invariance (SPEC section 6): one call equals any split into calls."""

import torch
from hypothesis import given, settings, strategies as st

from conftest import MIXERS, MEMORY_TYPES, tiny_model
from hope_hf.models.hope.hf_compat import output_cache


def run_split(model, ids, cuts, mask=None):
    cache, logits = None, []
    bounds = [0, *cuts, ids.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        am = None if mask is None else mask[:, :b]
        out = model(ids[:, a:b], attention_mask=am, cache=cache, use_cache=True)
        cache = output_cache(out)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


def flat_state(cache):
    return {f"{i}.{k}": v for i, layer in enumerate(cache.layers) for k, v in layer.state.flatten().items()}


def check_invariance(mixer, memory_type, dtype, tol, cuts, seed, length=17):
    model = tiny_model(seed=seed, dtype=dtype, mixer=mixer, memory_type=memory_type)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, 61, (2, length), generator=gen)
    with torch.no_grad():
        whole, whole_cache = run_split(model, ids, [])
        split, split_cache = run_split(model, ids, cuts)
    torch.testing.assert_close(split, whole, atol=tol, rtol=0)
    a, b = flat_state(whole_cache), flat_state(split_cache)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k].to(a[k].dtype), a[k], atol=tol, rtol=0, msg=k)
    assert torch.equal(whole_cache.seen_tokens, split_cache.seen_tokens)


cuts_strategy = st.lists(st.integers(1, 16), max_size=5, unique=True).map(sorted)


@settings(max_examples=6, deadline=None)
@given(cuts=cuts_strategy, seed=st.integers(0, 10_000), mixer=st.sampled_from(MIXERS),
       memory_type=st.sampled_from(MEMORY_TYPES))
def test_stream_invariance_float64(cuts, seed, mixer, memory_type):
    check_invariance(mixer, memory_type, torch.float64, 1e-10, cuts, seed)


@settings(max_examples=4, deadline=None)
@given(cuts=cuts_strategy, seed=st.integers(0, 10_000), mixer=st.sampled_from(MIXERS),
       memory_type=st.sampled_from(MEMORY_TYPES))
def test_stream_invariance_float32(cuts, seed, mixer, memory_type):
    check_invariance(mixer, memory_type, torch.float32, 1e-4, cuts, seed)


def test_every_mixer_single_tokens(mixer_memory):
    mixer, memory_type = mixer_memory
    check_invariance(mixer, memory_type, torch.float64, 1e-10, list(range(5, 17)), seed=3)


def test_left_padding_equals_alone(mixer_memory):
    """A left-padded batch gives, at real tokens, the logits of each sequence alone, also when
    continued token by token with the cache."""
    mixer, memory_type = mixer_memory
    model = tiny_model(seed=5, dtype=torch.float64, mixer=mixer, memory_type=memory_type)
    gen = torch.Generator().manual_seed(11)
    long_ids = torch.randint(3, 61, (1, 15), generator=gen)
    short_ids = torch.randint(3, 61, (1, 9), generator=gen)
    pad = 15 - 9
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        both, _ = run_split(model, batch, [4, 11], mask=mask)
        alone_long = model(long_ids).logits
        alone_short = model(short_ids).logits
    torch.testing.assert_close(both[0], alone_long[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(both[1, pad:], alone_short[0], atol=1e-10, rtol=0)
