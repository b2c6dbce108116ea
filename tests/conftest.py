import pytest
import torch

from hope_hf import HopeConfig, HopeForCausalLM

MIXERS = ["self_modifying", "titans", "attention"]
MEMORY_TYPES = ["deep", "linear"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests that pin torch to one thread must not change the thread count of the tests after them."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> HopeConfig:
    """A tiny model with short chunks so that every update path fires within ~20 tokens."""
    kwargs = dict(
        vocab_size=61, hidden_size=16, num_heads=2, num_hidden_layers=2, chunk_size=3, memory_chunk_size=5,
        cms_chunk_sizes=[2, 7, None], cms_intermediate_size=24, eta_init=0.3, alpha_init=0.9,
        cms_eta_init=0.05, cms_alpha_init=0.95, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    kwargs.update(overrides)
    return HopeConfig(**kwargs)


def tiny_model(seed: int = 0, dtype=torch.float32, **overrides) -> HopeForCausalLM:
    torch.manual_seed(seed)
    model = HopeForCausalLM(tiny_config(**overrides)).to(dtype).eval()
    return model


@pytest.fixture(params=[(m, t) for m in MIXERS for t in MEMORY_TYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def mixer_memory(request):
    return request.param
