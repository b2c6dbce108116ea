"""In-context learning really happens, and the outer loss reaches every meta-learned piece."""

import pytest
import torch

from conftest import tiny_config, tiny_model
from hope_hf import HopeForCausalLM
from hope_hf.models.hope.primitives import SwiGLUPass, gradient_factors, memory_read
from hope_hf.models.hope.hf_compat import output_cache


def ids(seed=0, length=16, batch=2):
    return torch.randint(3, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("memory_type", ["deep", "linear"])
def test_memory_gradients_match_autograd(memory_type):
    torch.manual_seed(0)
    B, H, D, M = 2, 3, 4, 5
    if memory_type == "deep":
        state = {"W1": torch.randn(B, H, D, M, dtype=torch.float64), "W2": torch.randn(B, H, M, D, dtype=torch.float64)}
    else:
        state = {"W": torch.randn(B, H, D, D, dtype=torch.float64)}
    key, target = torch.randn(B, H, 3, D, dtype=torch.float64), torch.randn(B, H, 3, D, dtype=torch.float64)
    for act in ("silu", "gelu", "tanh"):
        leaves = {k: v.clone().requires_grad_() for k, v in state.items()}
        for t in range(key.shape[-2]):  # per token: the gradient is the rank-1 e u^T
            loss = 0.5 * (memory_read(leaves, key[..., t:t + 1, :], act) - target[..., t:t + 1, :]).pow(2).sum()
            auto = torch.autograd.grad(loss, list(leaves.values()))
            factors = gradient_factors(state, key, target, act)
            for name, g in zip(leaves, auto):
                e, u = factors[name]
                torch.testing.assert_close(e[..., t, :, None] * u[..., t, None, :], g, atol=1e-12, rtol=0)


def test_swiglu_gradients_match_autograd():
    torch.manual_seed(1)
    B, I, D = 2, 6, 4
    w = {"gate": torch.randn(B, I, D, dtype=torch.float64), "up": torch.randn(B, I, D, dtype=torch.float64),
         "down": torch.randn(B, D, I, dtype=torch.float64)}
    n, target = torch.randn(B, 5, D, dtype=torch.float64), torch.randn(B, 5, D, dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_() for k, v in w.items()}
    hidden = torch.nn.functional.silu(n @ leaves["gate"].transpose(-1, -2)) * (n @ leaves["up"].transpose(-1, -2))
    loss = 0.5 * (hidden @ leaves["down"].transpose(-1, -2) - target).pow(2).sum()
    auto = torch.autograd.grad(loss, list(leaves.values()))
    swiglu = SwiGLUPass([w[k] for k in ("gate", "up", "down")], n, target)
    torch.testing.assert_close(swiglu.out, (hidden @ leaves["down"].transpose(-1, -2)).detach(), atol=1e-12, rtol=0)
    for name, hand, g in zip(leaves, swiglu.gradient_sums(), auto):  # summed over the block's tokens
        torch.testing.assert_close(hand, g, atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("memory_read", ["token", "chunk"])
@pytest.mark.parametrize("mixer", ["self_modifying", "titans"])
def test_logits_differ_without_in_context_updates(mixer, memory_read):
    x = ids(seed=2, length=20)
    on = tiny_model(seed=3, mixer=mixer, memory_read=memory_read)
    off = HopeForCausalLM(tiny_config(mixer=mixer, memory_read=memory_read, in_context_updates=False)).eval()
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        a, b = on(x).logits, off(x).logits
    # Before the first write is visible (the first chunk's end for chunk-start reads (C = 3), the second
    # token for per-token reads of M_mem), both models read the same (initial) state ...
    same = 2 if memory_read == "chunk" else 1
    torch.testing.assert_close(a[:, :same], b[:, :same])
    if memory_read == "token":  # ... a write is visible to the next token
        assert (a[:, 1] - b[:, 1]).abs().max() > 1e-6
    # ... afterwards, in-context updates change what the model predicts.
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_cms_fast_weights_change_only_after_chunk_and_counters_advance():
    model = tiny_model(seed=4, mixer="attention", cms_chunk_sizes=[4, 6, None])
    x = ids(seed=5, length=3, batch=1)
    level0 = model.model.layers[0].cms.levels[0]
    with torch.no_grad():
        cache = output_cache(model(x, use_cache=True))
        state = cache.layers[0].state
        assert torch.equal(state.cms[0].theta["gate"][0], level0.gate_proj.weight)  # 3 tokens < C=4: untouched
        assert cache.cms_update_counts(0)[0].tolist() == [0]
        model(ids(seed=6, length=10, batch=1), cache=cache)  # 13 tokens in all
    state = cache.layers[0].state
    assert not torch.allclose(state.cms[0].theta["gate"][0], level0.gate_proj.weight)
    counts = cache.cms_update_counts(0)
    assert counts[0].tolist() == [3] and counts[1].tolist() == [2] and counts[2] is None


def test_outer_gradients_reach_every_meta_learned_part():
    model = tiny_model(seed=6).train()
    x = ids(seed=7, length=20)
    model(x, labels=x).loss.backward()
    layer = model.model.layers[0]
    for name, memory in layer.mixer.memories.items():
        for pname, p in memory.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"memory {name}.{pname}"
    for pname in ("eta_readout", "eta_bias", "alpha_readout", "alpha_bias"):
        assert getattr(layer.mixer, pname).grad.abs().sum() > 0, pname
    for level in layer.cms.levels:
        if level.chunk_size is not None:
            assert level.value_proj.weight.grad.abs().sum() > 0
            assert level.eta_logit.grad.abs() > 0 and level.alpha_logit.grad.abs() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name


@pytest.mark.parametrize("mixer,memory_type", [("self_modifying", "deep"), ("titans", "linear")])
def test_gradcheck_through_in_context_updates(mixer, memory_type):
    model = HopeForCausalLM(tiny_config(mixer=mixer, memory_type=memory_type, hidden_size=4, num_heads=2,
                                        num_hidden_layers=1, memory_hidden_size=2, chunk_size=2,
                                        memory_chunk_size=2, cms_chunk_sizes=[2], cms_intermediate_size=4))
    model = model.double().eval()
    torch.manual_seed(8)
    embeds = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    name = next(n for n, _ in model.model.named_parameters() if n.endswith("memories.mem.W1") or n.endswith("memories.mem.W"))
    w0 = dict(model.model.named_parameters())[name].detach().clone().requires_grad_()

    def f(e, w):  # output as a function of the inputs and the memory's initial state
        out = torch.func.functional_call(model.model, {name: w}, kwargs={"inputs_embeds": e, "use_cache": False})
        return out.last_hidden_state

    assert torch.autograd.gradcheck(f, (embeds, w0), eps=1e-6, atol=1e-6)
