"""generate(): the cache is exact (greedy, sampling, beams, continuation, left padding)."""

import pytest
import torch

from conftest import tiny_model
from hope_hf import HopeCache
from hope_hf.models.hope.hf_compat import output_cache


@pytest.fixture(params=["self_modifying", "titans", "attention"])
def model(request):
    return tiny_model(seed=7, mixer=request.param, dtype=torch.float64)


def prompt(batch=2, length=9, seed=0):
    return torch.randint(3, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


def gen(model, ids, **kw):
    kw.setdefault("max_new_tokens", 8)
    kw.setdefault("pad_token_id", 0)
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def test_greedy_cache_equals_no_cache(model):
    ids = prompt()
    assert torch.equal(gen(model, ids, do_sample=False), gen(model, ids, do_sample=False, use_cache=False))


def test_sampling_cache_equals_no_cache(model):
    ids = prompt(seed=1)
    torch.manual_seed(123)
    a = gen(model, ids, do_sample=True, top_k=20)
    torch.manual_seed(123)
    b = gen(model, ids, do_sample=True, top_k=20, use_cache=False)
    assert torch.equal(a, b)


def test_beam_search_cache_equals_no_cache(model):
    ids = prompt(seed=2)
    kw = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=6)
    a = gen(model, ids, **kw)
    b = gen(model, ids, use_cache=False, **kw)
    assert a.shape == (4, ids.shape[1] + 6)
    assert torch.equal(a, b)


def test_continue_from_returned_cache(model):
    ids = prompt(batch=1, seed=3)
    first = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = output_cache(first)
    assert isinstance(cache, HopeCache)
    follow = prompt(batch=1, length=4, seed=4)
    joined = torch.cat([first.sequences, follow], dim=1)
    continued = model.generate(joined, cache=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    fresh = model.generate(joined, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(continued, fresh)


def test_continue_from_cache_with_beams(model):
    ids = prompt(batch=1, seed=5)
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
    follow = torch.cat([ids, prompt(batch=1, length=3, seed=6)], dim=1)
    kw = dict(num_beams=3, do_sample=False, max_new_tokens=4, pad_token_id=0)
    assert torch.equal(model.generate(follow, cache=cache, **kw), model.generate(follow, **kw))


def test_left_padded_batch_equals_alone(model):
    a, b = prompt(batch=1, length=10, seed=8), prompt(batch=1, length=6, seed=9)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone_a = gen(model, a, max_new_tokens=6, do_sample=False)
    alone_b = gen(model, b, max_new_tokens=6, do_sample=False)
    assert torch.equal(out[0], alone_a[0])
    assert torch.equal(out[1, 4:], alone_b[0])


def test_assisted_decoding_refused(model):
    with pytest.raises(ValueError, match="assisted generation is not supported"):
        model.generate(prompt(batch=1), assistant_model=tiny_model(seed=1), max_new_tokens=3, pad_token_id=0)


def test_cache_implementation_refused(model):
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(prompt(batch=1), cache_implementation="static", max_new_tokens=3, pad_token_id=0)
