"""Deep Momentum Gradient Descent, DMGD (paper Eq. 23, and Eq. 24 for the non-linear output).

The momentum is a memory of the gradients. DMGD replaces the linear (matrix-valued) memory of
Eq. 17 with a small MLP `m` trained online, by one gradient step per optimiser step on an
inner objective `L2(m; u_i, I)` whose key is the current gradient `u_i`:

    W_{i+1} = W_i + sigma(m_{i+1}(u_i)),   m_{i+1} = alpha m_i - eta grad L2(m_i; u_i, I).

**[choice]** The paper leaves `L2` and the architecture open. Here:

* the memory reads each row of the (matrix-shaped) gradient as a key and outputs a row:
  `m(k) = b + W_out tanh(W_in k)` with `W_in: [hidden, cols]`, `W_out: [cols, hidden]` shared
  by the rows, and `b: [rows, cols]` a per-parameter bias (the "momentum" part);
* the objective is l2 regression onto the identity value map `I` (target = the key itself):
  `L2 = 1/2 || m(u) - u ||^2` summed over rows. With `W_out = 0` this is exactly an EMA:
  `b <- b - (1 - beta)(b - u) = beta b + (1 - beta) u`, i.e. linear momentum, and with
  `sigma = NewtonSchulz` the optimiser is Muon (tested). The MLP part learns, online, the
  dominant directions of recent gradients (a non-linear PCA of the gradient rows), and the
  output adds the current gradient's projection on them to the momentum;
* the MLP's inner steps are normalised like NLMS (normalised least mean squares) so the
  memory cannot diverge whatever the gradient scale:
  `W_out` steps by `memory_lr / (||Z||_F^2 + 1)` and `W_in` by
  `memory_lr / (||K||_F^2 (1 + ||W_out||_F^2))` (`Z`, `K`: hidden activations and keys).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ._base import MatrixOptimizer, check_ns, descend, check_range, check_shape_scale
from .newton_schulz import ShapeScale, matrix_view, newton_schulz, shape_scale

__all__ = ["DeepMomentum"]


class DeepMomentum(MatrixOptimizer):
    r"""DMGD: momentum as an MLP memory trained online on the gradients (+ AdamW fallback).

    For a matrix parameter `W` (`[rows, cols]`, trailing dims flattened) with gradient `g`:

    .. code-block:: text

        u    = g / RMS(g)     if normalize_grad   else g         # keys = rows of u  [rows, cols]
        Z    = tanh(u W_in^T)                                    # [rows, hidden]
        err  = b + Z W_out^T - u                                 # [rows, cols]
        b     <- alpha b     - (1 - beta) err                    # one step on L2 = 1/2 ||err||^2
        W_out <- alpha W_out - memory_lr * err^T Z / (||Z||^2 + 1)
        W_in  <- alpha W_in  - memory_lr * ((err W_out) * (1 - Z^2))^T u / (||u||^2 (1 + ||W_out||^2))
        out  = b + tanh(u W_in^T) W_out^T                        # m_{i+1}(u_i), new memory
        W    <- (1 - lr * weight_decay) W - lr * s * sigma(out)

    `sigma` is the identity (Eq. 23) or Newton-Schulz with `orthogonalize=True` (Eq. 24), with
    `s = shape_scale(W.shape)` in the latter case only. `normalize_grad` makes the memory see
    gradients of unit RMS, so one `lr` works at every gradient scale (the update then has an
    RMS of about `lr`, like sign-based methods). `W_in` is initialised `N(0, 1/cols)` from a
    generator seeded by `seed` and the parameter's position (the global RNG is not touched),
    `W_out` and `b` at 0. `hidden_dim = 0` gives a linear memory (EMA momentum).

    The memory lives in `state[p]` (`memory_bias`, `memory_in`, `memory_out`), so
    `state_dict()` round-trips it.

    Args:
        params: parameters or param groups (group key `use_muon`, default `ndim >= 2`).
        lr: learning rate of the matrix parameters.
        beta: momentum of the bias `b` (its inner step is `1 - beta`), in `[0, 1)`.
        alpha: retention of the whole memory (Eq. 23's `alpha`), in `(0, 1]`.
        memory_lr: normalised inner learning rate of the MLP, in `[0, 1]`.
        hidden_dim: hidden width of the memory MLP, `>= 0`.
        normalize_grad: feed gradients of unit RMS to the memory.
        orthogonalize: Newton-Schulz output (Eq. 24).
        ns_steps, ns_dtype, shape_scale: Newton-Schulz settings (used with `orthogonalize`).
        weight_decay: decoupled weight decay of the matrix parameters.
        seed: seed of the memories' initialisation.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW fallback.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        beta: float = 0.9,
        alpha: float = 1.0,
        memory_lr: float = 0.1,
        hidden_dim: int = 16,
        normalize_grad: bool = True,
        orthogonalize: bool = False,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
        shape_scale: ShapeScale = "keller",
        weight_decay: float = 0.0,
        seed: int = 0,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
    ) -> None:
        check_range("seed", seed, 0, integer=True)
        self._seed = seed
        defaults = dict(
            lr=lr,
            beta=beta,
            alpha=alpha,
            memory_lr=memory_lr,
            hidden_dim=hidden_dim,
            normalize_grad=normalize_grad,
            orthogonalize=orthogonalize,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            shape_scale=shape_scale,
            weight_decay=weight_decay,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
        )
        super().__init__(params, defaults)

    def _check_matrix_group(self, group: dict[str, Any]) -> None:
        super()._check_matrix_group(group)
        check_range("beta", group["beta"], 0.0, 1.0, high_inclusive=False)
        check_range("alpha", group["alpha"], 0.0, 1.0, low_inclusive=False)
        check_range("memory_lr", group["memory_lr"], 0.0, 1.0)
        check_range("hidden_dim", group["hidden_dim"], 0, integer=True)
        check_ns(group)
        check_shape_scale(group["shape_scale"])

    def _param_index(self, p: Tensor) -> int:
        # Position of p among all parameters: a seed that does not depend on memory addresses.
        index = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return index
                index += 1
        raise KeyError("parameter not in this optimizer")

    def _init_memory(self, p: Tensor, state: dict[str, Any], hidden: int) -> None:
        rows, cols = matrix_view(p).shape
        gen = torch.Generator(device="cpu").manual_seed(self._seed * 1_000_003 + self._param_index(p))
        w_in = torch.randn(hidden, cols, generator=gen, dtype=torch.float32) / cols**0.5
        state["memory_in"] = w_in.to(device=p.device, dtype=p.dtype)
        state["memory_out"] = torch.zeros(cols, hidden, device=p.device, dtype=p.dtype)
        state["memory_bias"] = torch.zeros(rows, cols, device=p.device, dtype=p.dtype)

    def _matrix_update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if "memory_bias" not in state:
            self._init_memory(p, state, group["hidden_dim"])
        b, w_in, w_out = state["memory_bias"], state["memory_in"], state["memory_out"]
        alpha, beta, eta = group["alpha"], group["beta"], group["memory_lr"]

        u = matrix_view(grad)
        if group["normalize_grad"]:
            u = u / u.pow(2).mean().sqrt().clamp_min(torch.finfo(u.dtype).tiny)

        # One gradient step of the memory on L2 = 1/2 ||b + tanh(u W_in^T) W_out^T - u||^2,
        # all three gradients taken at the pre-step memory (m_i in Eq. 23).
        z = torch.tanh(u @ w_in.mT)  # [rows, hidden]
        err = b + z @ w_out.mT - u  # [rows, cols]
        if w_in.numel() > 0:
            grad_out = err.mT @ z  # [cols, hidden]
            grad_in = ((err @ w_out) * (1 - z * z)).mT @ u  # [hidden, cols]
            step_out = eta / (z.pow(2).sum() + 1)
            step_in = eta / (u.pow(2).sum() * (1 + w_out.pow(2).sum())).clamp_min(torch.finfo(u.dtype).tiny)
            w_in.mul_(alpha).sub_(grad_in * step_in)
            w_out.mul_(alpha).sub_(grad_out * step_out)
        b.mul_(alpha).sub_(err, alpha=1 - beta)

        # Read the updated memory at the current gradient: m_{i+1}(u_i).
        out = b + torch.tanh(u @ w_in.mT) @ w_out.mT if w_in.numel() > 0 else b
        if group["orthogonalize"]:
            out = newton_schulz(out, group["ns_steps"], dtype=group["ns_dtype"])
            scale = shape_scale(p.shape, group["shape_scale"])
        else:
            scale = 1.0
        descend(p, out, group, scale)
