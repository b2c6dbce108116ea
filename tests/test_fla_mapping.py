"""The linear-memory DGD recurrence maps onto fla's gated delta rule (`hope_hf.models.hope.dgd_fla`).

On CPU: our closed-form chunk (`dgd_chunk`) equals fla's pure-torch reference recurrence
(`naive_recurrent_gated_delta_rule`) fed with `gated_delta_inputs`. On CUDA: the Triton kernel
path (`fla_dgd_chunk`) equals `dgd_chunk`, and a linear-memory model gives the same logits
with and without it."""

import pytest
import torch

from conftest import tiny_model
from hope_hf.models.hope.dgd_chunk import dgd_chunk
from hope_hf.models.hope.dgd_fla import fla_available, gated_delta_inputs
from hope_hf.models.hope.primitives import l2norm

naive = pytest.importorskip("fla.ops.gated_delta_rule.naive", reason="flash-linear-attention is not installed")


def random_chunk(seed: int, problems: int = 6, length: int = 13, dim: int = 8, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(problems, dim, dim, generator=gen)
    unit = l2norm(torch.randn(problems, length, dim, generator=gen), 1e-6)
    write_per_eta = torch.randn(problems, length, dim, generator=gen)
    eta = torch.rand(problems, length, generator=gen) * 0.5
    alpha = 0.8 + 0.2 * torch.rand(problems, length, generator=gen)
    eta[0, 3], alpha[0, 3] = 0.0, 1.0  # a padding / filler token is a no-op in both
    return [t.to(device) for t in (weight, unit, write_per_eta, eta, alpha.log())]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dgd_chunk_equals_fla_naive_gated_delta_rule(seed):
    weight, unit, write_per_eta, eta, log_alpha = random_chunk(seed)
    k, v, g, beta, h0 = gated_delta_inputs(weight, unit, write_per_eta, eta, log_alpha)
    q = torch.randn_like(k)
    _, final = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    ours = dgd_chunk(weight, unit, write_per_eta, eta, log_alpha)
    torch.testing.assert_close(final.squeeze(0).transpose(-1, -2), ours, atol=1e-5, rtol=1e-5)
    # and the mapping is not vacuous: the memory really moved
    assert (ours - weight).abs().max() > 1e-2


cuda = pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and fla")


@cuda
def test_fla_kernel_equals_torch_chunk():
    from hope_hf.models.hope.dgd_fla import fla_dgd_chunk

    weight, unit, write_per_eta, eta, log_alpha = random_chunk(3, problems=8, length=64, dim=64, device="cuda")
    expected = dgd_chunk(weight, unit, write_per_eta, eta, log_alpha)
    got = fla_dgd_chunk(weight, unit, write_per_eta, eta, log_alpha)
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)  # bf16 kernel inputs


@cuda
def test_linear_memory_model_on_cuda_matches_cpu():
    # chunk-start reads and gradients: the settings under which the end states go through fla's kernel
    model = tiny_model(seed=4, mixer="titans", memory_type="linear", memory_read="chunk", linear_gradient="chunk")
    ids = torch.randint(3, 61, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.cuda()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=5e-2, rtol=5e-2)
