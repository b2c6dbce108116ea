"""flash-linear-attention kernels for the linear-memory DGD recurrence (CUDA only).

Within a chunk, a linear memory's DGD update (`primitives.dgd_terms`, `dgd_chunk.ChunkSolve`) is

    W_t = alpha_t W_{t-1} (I - (eta_t / alpha_t) u_t u_t^T) + w_t u_t^T,    W: [out, in],

with `u_t` the unit key and `w_t = eta_t * r_t` a write proportional to eta (`r_t` is what
`dgd_terms` returns for eta = 1: the state-independent part, taken at the chunk-start state).
fla's gated delta rule keeps `h = W^T` ([K, V]) and computes

    h_t = exp(g_t) h_{t-1} + k_t beta_t (v_t - exp(g_t) h_{t-1}^T k_t)^T,

which is the same recurrence with `k = u`, `g = log alpha`, `beta = eta / alpha` and
`v = alpha * r` (so that `beta * v = w`, without dividing by eta). Padding and fillers have
`eta = 0, alpha = 1`: `beta = 0, g = 0`, a no-op.

Only the end state is taken from fla: with `memory_read="token"` the main memory's per-token reads
`M_{t-1}(q_t)` come from the torch solve (`dgd_chunk.ChunkSolve.reads`), since fla's outputs
`h_t^T q_t` include token t's own write.

`gated_delta_inputs` is the mapping (pure torch, tested on CPU against
`fla.ops.gated_delta_rule.naive`); `fla_dgd_chunk` runs `chunk_gated_delta_rule` on it. fla is
imported lazily: nothing here is needed on CPU.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch


def gated_delta_inputs(
    weight: torch.Tensor, unit: torch.Tensor, write_per_eta: torch.Tensor, eta: torch.Tensor, log_alpha: torch.Tensor
) -> Tuple[torch.Tensor, ...]:
    """Our chunk recurrence as fla's gated-delta-rule inputs.

    weight: W_0 [N, O, I]; unit: [N, C, I]; write_per_eta: r [N, C, O]; eta, log_alpha: [N, C].
    Returns (k [1, C, N, I], v [1, C, N, O], g [1, C, N], beta [1, C, N], h0 [1, N, I, O]): the N
    independent problems become fla's heads, of one sequence.
    """
    alpha = log_alpha.exp()
    beta = eta / alpha
    v = alpha.unsqueeze(-1) * write_per_eta
    tokens_first = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731  [N, C, ...] -> [1, C, N, ...]
    return (tokens_first(unit), tokens_first(v), tokens_first(log_alpha), tokens_first(beta),
            weight.transpose(-1, -2).unsqueeze(0))


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    """fla's gated delta rule is importable (its Triton kernels still need a CUDA device)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialise without a driver
        return False
    return True


def use_fla(weight: torch.Tensor) -> bool:
    return weight.is_cuda and fla_available()


def fla_dgd_chunk(
    weight: torch.Tensor, unit: torch.Tensor, write_per_eta: torch.Tensor, eta: torch.Tensor, log_alpha: torch.Tensor,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`dgd_chunk.dgd_chunk` for a linear memory through `chunk_gated_delta_rule` (CUDA), its inputs
    in `compute_dtype` (`HopeConfig.fla_dtype`; fla's chunk kernels run in half precision), the state
    in float32. Shapes as in `gated_delta_inputs`; returns W_C [N, O, I] in the state's dtype."""
    try:  # optional dependency (in a try block: transformers' remote-code import check skips it)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as error:
        raise RuntimeError("fla_dgd_chunk needs flash-linear-attention (pip install 'hope-hf[cuda]')") from error
    k, v, g, beta, h0 = gated_delta_inputs(weight, unit, write_per_eta, eta, log_alpha)
    compute = compute_dtype
    q = torch.zeros_like(k, dtype=compute)  # the per-token outputs are not used: reads use the chunk start
    _, final = chunk_gated_delta_rule(
        q, k.to(compute), v.to(compute), g.float(), beta.to(compute),
        initial_state=h0.float(), output_final_state=True,
    )
    return final.squeeze(0).transpose(-1, -2).to(weight.dtype)
