"""Bad input gets a clear error naming the argument."""

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from hope_hf import HopeConfig
from hope_hf.models.hope.hf_compat import output_cache


@pytest.mark.parametrize("field,value,match", [
    ("mixer", "mamba", "mixer must be one of"),
    ("memory_type", "wide", "memory_type must be one of"),
    ("cms_variant", "parallel", "cms_variant must be one of"),
    ("hidden_size", 30, "divisible by num_heads"),
    ("chunk_size", 0, "chunk_size must be a positive int"),
    ("memory_chunk_size", 2.5, "memory_chunk_size must be a positive int"),
    ("cms_chunk_sizes", [16, 0, None], "cms_chunk_sizes entries"),
    ("cms_chunk_sizes", "16", "cms_chunk_sizes must be a list"),
    ("eta_max", 0.0, "eta_max"),
    ("alpha_init", 1.0, "alpha_init"),
    ("memory_activation", "relu6", "memory_activation"),
    ("in_context_updates", "yes", "in_context_updates"),
])
def test_bad_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        HopeConfig(**{"hidden_size": 32, "num_heads": 4, field: value})


def test_input_errors():
    model = tiny_model()
    x = torch.randint(3, 61, (2, 5))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=x, inputs_embeds=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="attention_mask must be a 2-D"):
        model(x, attention_mask=torch.ones(2, 1, 5, 5))
    bad = torch.randn(2, 5, 16)
    bad[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(inputs_embeds=bad)
    bad[0, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(inputs_embeds=bad)
    with pytest.raises(TypeError, match="HopeCache"):
        model(x, cache=DynamicCache())
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(inputs_embeds=torch.randn(2, 5, 8))


def test_cache_cannot_be_cropped():
    model = tiny_model()
    with torch.no_grad():
        cache = output_cache(model(torch.randint(3, 61, (1, 4)), use_cache=True))
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(1)
