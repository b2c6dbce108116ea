"""In-context memories and the Delta Gradient Descent (DGD) update (SPEC sections 2-3).

This is the one place where a memory is read, where its inner-loss gradient is taken (derived
by hand, no `torch.autograd.grad` in the inner loop) and where DGD writes it. Every mixer and
every fast path uses these functions or is tested against them.

A memory *state* is a dict of per-sample, per-head weights:
- deep memory   `M(z) = z + W1 @ act(W2 @ z)`:  `{"W1": [B, H, D, M], "W2": [B, H, M, D]}`
- linear memory `M(z) = W @ z`:                  `{"W":  [B, H, D, D]}`
with `D = head_dim` and `M = memory_dim`. Vectors are `[B, H, D]`.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

MemoryState = Dict[str, torch.Tensor]


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "tanh":
        return torch.tanh(x)
    raise ValueError(f"activation must be one of ['silu', 'gelu', 'tanh'], got {name!r}")


def activation_derivative(name: str, x: torch.Tensor) -> torch.Tensor:
    """d act(x) / dx, elementwise (hand-derived so the inner loop needs no autograd)."""
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return cdf + x * pdf
    if name == "tanh":
        return 1 - torch.tanh(x) ** 2
    raise ValueError(f"activation must be one of ['silu', 'gelu', 'tanh'], got {name!r}")


def l2norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def memory_read(state: MemoryState, z: torch.Tensor, act: str) -> torch.Tensor:
    """`M[state](z)`. z: [B, H, D] -> [B, H, D]."""
    if "W" in state:
        return torch.einsum("bhij,bhj->bhi", state["W"], z)
    pre = torch.einsum("bhmd,bhd->bhm", state["W2"], z)
    return z + torch.einsum("bhdm,bhm->bhd", state["W1"], activation(act, pre))


def memory_gradients(
    state: MemoryState, key: torch.Tensor, target: torch.Tensor, act: str
) -> Tuple[MemoryState, MemoryState]:
    """Gradient of `L(S) = 1/2 || M[S](key) - target ||^2` with respect to each weight of S.

    Returns `(grads, layer_inputs)`: for each weight `W` its gradient (same shape as `W`) and
    the input `u` that `W` multiplies (`key` for W2 and W, `act(W2 key)` for W1), `[B, H, in]`,
    which DGD's erase term uses.
    """
    if "W" in state:
        error = torch.einsum("bhij,bhj->bhi", state["W"], key) - target
        return {"W": error.unsqueeze(-1) * key.unsqueeze(-2)}, {"W": key}
    pre = torch.einsum("bhmd,bhd->bhm", state["W2"], key)
    hidden = activation(act, pre)
    error = key + torch.einsum("bhdm,bhm->bhd", state["W1"], hidden) - target
    grad_w1 = error.unsqueeze(-1) * hidden.unsqueeze(-2)
    grad_pre = torch.einsum("bhdm,bhd->bhm", state["W1"], error) * activation_derivative(act, pre)
    grad_w2 = grad_pre.unsqueeze(-1) * key.unsqueeze(-2)
    return {"W1": grad_w1, "W2": grad_w2}, {"W1": hidden, "W2": key}


def dgd_step(
    current: MemoryState,
    grads: MemoryState,
    layer_inputs: MemoryState,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    eps: float,
) -> MemoryState:
    """One Delta Gradient Descent step (paper Eq. 88/91), for every weight W of a memory:

        W_t = W_{t-1} (alpha I - eta u~ u~^T) - eta / max(1, ||u||^2) * grad,   u~ = u / ||u||

    (the `max(1, ||u||^2)` normalisation is a stability choice on top of SPEC section 3; it is
    the identity for unit-norm inputs, i.e. for linear memories and every memory's W2.)

    `current` holds `W_{t-1}`; `grads` were evaluated at the chunk-start state. eta, alpha: [B, H].
    """
    eta_ = eta[..., None, None]
    alpha_ = alpha[..., None, None]
    new = {}
    for name, weight in current.items():
        inputs = layer_inputs[name]  # [B, H, in]
        unit = l2norm(inputs, eps)
        projected = torch.einsum("bhoi,bhi->bho", weight, unit)
        # Normalised step (NLMS): the gradient term contracts W along u by eta * ||u||^2, which
        # for a deep memory's hidden input (||u|| >> 1) would flip and blow up the state;
        # dividing by max(1, ||u||^2) keeps every step a contraction. Unit inputs (l2-normalised
        # keys, linear memory) are unchanged.
        step = eta_ / (inputs * inputs).sum(-1).clamp(min=1.0)[..., None, None]
        new[name] = alpha_ * weight - eta_ * projected.unsqueeze(-1) * unit.unsqueeze(-2) - step * grads[name]
    return new


def select_state(condition: torch.Tensor, new: MemoryState, old: MemoryState) -> MemoryState:
    """Per-sample choice: `new` where condition [B] is True, else `old`."""
    cond = condition.view(-1, *([1] * (next(iter(new.values())).dim() - 1)))
    return {name: torch.where(cond, new[name], old[name]) for name in new}
