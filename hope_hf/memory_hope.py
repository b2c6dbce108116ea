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
from typing import Dict, Optional, Tuple

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


def step_bound(
    state: MemoryState, key: torch.Tensor, target_key, eta: torch.Tensor, act: str
) -> MemoryState:
    """Stop-gradient factor (>= 1, exactly 1 at init) that bounds each weight's DGD gradient step by
    the curvature of the whole inner loss, the target's dependence on the state included.

    The gradient term of weight W with layer input u (key side) is `-eta / max(1, ||u||^2) G_k^T e u^T`
    (`G_k` the Jacobian from W's output to the memory's output: I for W1 and a linear W,
    `W1 diag(act'(W2 k))` for W2). Its Jacobian with respect to W, the curvature the step sees, is
    bounded by
      plain target (titans):            kappa = ||u||^2 ||G_k||^2
      self-generated `M[S](v)`:         kappa = ||u|| ||G_k|| (||G_k|| ||u - u_v|| + ||G_k - G_v|| ||u_v||)
    (`u_v`, `G_v` the same for the target key v; Frobenius norms for W2's gains, 1 for I). Together with
    the erase term (rate eta along u~) the step's contraction along the worst direction is at most
    `eta (1 + kappa / n)` for a normaliser n, which must stay below 2 (an eigenvalue above -1):
    n >= kappa * max(1, eta / (2 - eta)). The factor is `max(1, that / max(1, ||u||^2))`, so the old
    normalised step is kept wherever it is already stable. With SPEC section 9's init (W1 ~ 0,
    self-generated target with k ~ v, eta <= 1) every factor is 1: the step is exactly the SPEC
    section 3 step. The default `key_value_init_range` 0.3 starts k and the target apart, so there the
    bound is active from the first token (factors up to ~3.5 for W1, ~40 for M_k/M_v's W2 at d_h 16).
    Why: with trained weights, the self-generated target feeds the state back (transition along h_k
    about `1 - eta (2 - h_v.h_k / ||h_k||^2)`, which left (-1, 1) and gave NaN during training at
    eta 0.9 and W2_0 std 2, issue 12).

    state: weights [..., O, I]; key, target_key (None: a plain target): [..., C, D]; eta: [..., C].
    Returns name -> factor [..., C].
    """
    with torch.no_grad():  # [choice] a safeguard on the step size, like gradient clipping
        rate = (eta / (2.0 - eta).clamp(min=1e-6)).clamp(min=1.0)  # max(1, eta / (2 - eta))
        return {name: (kappa * rate / (u * u).sum(-1).clamp(min=1.0)).clamp(min=1.0)
                for name, (kappa, u) in inner_curvature(state, key, target_key, act).items()}


def inner_curvature(state: MemoryState, key: torch.Tensor, target_key, act: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """`step_bound`'s kappa per weight: an upper bound of the spectral norm of the Jacobian, with respect
    to that weight, of the inner gradient `G_k^T (M[S](k) - target) u^T`, the target `M[S](target_key)`
    moving with the state (None: a fixed target). Returns name -> (kappa [..., C], key-side input u)."""
    norm = lambda x: (x * x).sum(-1).sqrt()  # noqa: E731
    if "W" in state:
        inputs = {"W": (key, target_key, None, None)}
    else:
        pre_k = key @ state["W2"].transpose(-1, -2)  # [..., C, M]
        columns = (state["W1"] ** 2).sum(-2).unsqueeze(-2)  # ||W1[:, m]||^2, [..., 1, M]
        slope_k = activation_derivative(act, pre_k)
        gain_k = (columns * slope_k * slope_k).sum(-1).sqrt()  # ||W1 diag(act'(pre_k))||_F
        if target_key is None:
            inputs = {"W1": (activation(act, pre_k), None, None, None), "W2": (key, None, gain_k, None)}
        else:
            pre_v = target_key @ state["W2"].transpose(-1, -2)
            slope_v = activation_derivative(act, pre_v)
            gain_diff = (columns * (slope_k - slope_v) ** 2).sum(-1).sqrt()  # ||G_k - G_v||_F
            inputs = {"W1": (activation(act, pre_k), activation(act, pre_v), None, None),
                      "W2": (key, target_key, gain_k, gain_diff)}
    curvature = {}
    for name, (u, u_v, gain, gain_diff) in inputs.items():
        g = 1.0 if gain is None else gain
        if u_v is None:
            kappa = (u * u).sum(-1) * (g * g)  # (not norm(u)**2: exactly the normaliser's ||u||^2)
        else:
            kappa = norm(u) * g * (g * norm(u - u_v) + (0.0 if gain_diff is None else gain_diff * norm(u_v)))
        curvature[name] = (kappa, u)
    return curvature


def dgd_step(
    current: MemoryState,
    grads: MemoryState,
    layer_inputs: MemoryState,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    eps: float,
    bound: Optional[MemoryState] = None,
) -> MemoryState:
    """One Delta Gradient Descent step (paper Eq. 88/91), for every weight W of a memory:

        W_t = W_{t-1} (alpha I - eta u~ u~^T) - eta / (max(1, ||u||^2) b) * grad,   u~ = u / ||u||

    (the `max(1, ||u||^2)` normalisation is a stability choice on top of SPEC section 3; it is
    the identity for unit-norm inputs, i.e. for linear memories and every memory's W2; `b` is
    `step_bound`'s stop-gradient factor, 1 at init; None: 1.)

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
        if bound is not None:
            step = step / bound[name][..., None, None]
        new[name] = alpha_ * weight - eta_ * projected.unsqueeze(-1) * unit.unsqueeze(-2) - step * grads[name]
    return new


def select_state(condition: torch.Tensor, new: MemoryState, old: MemoryState) -> MemoryState:
    """Per-sample choice: `new` where condition [B] is True, else `old`."""
    cond = condition.view(-1, *([1] * (next(iter(new.values())).dim() - 1)))
    return {name: torch.where(cond, new[name], old[name]) for name in new}
