"""M3, Multi-scale Momentum Muon (the paper's arXiv Algorithm 1).

Momentum seen as a memory of past gradients (paper Section 2.3) combined with the
Continuum Memory System idea (Eq. 31): a fast memory updated every step and a slow memory
that absorbs the gradients of a whole chunk of `f` steps at once, both read through the
Newton-Schulz non-linearity of Eq. 24, and an Adam-style second moment.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
from torch import Tensor

from ._base import MatrixOptimizer, check_choice, check_ns, descend, check_range, check_shape_scale
from .newton_schulz import ShapeScale, matrix_view, newton_schulz, shape_scale

__all__ = ["M3"]

MomentumForm = Literal["paper", "ema"]


class M3(MatrixOptimizer):
    r"""Multi-scale Momentum Muon, with an AdamW fallback for non-matrix parameters.

    For a matrix parameter `Theta` with gradient `g_t` at step `t = 1, 2, ...`
    (`momentum_form="paper"`, exactly Algorithm 1):

    .. code-block:: text

        M1 <- M1 + beta1 * g_t                     # fast momentum      [rows, cols]
        V  <- V  + beta2 * g_t^2                   # second moment      [rows, cols]
        O1 =  NewtonSchulz(M1)
        Theta <- Theta - lr * (O1 + alpha * O2) / sqrt(V + eps)
        every f steps (t % f == 0), after the update:
            M2 <- M2 + beta3 * (g_{t-f+1} + ... + g_t)    # slow momentum
            O2 =  NewtonSchulz(M2)                         # (0 before the first chunk ends)

    Algorithm 1 updates the slow memory at the *start* of each outer iteration `k` with the
    gradients of the chunk that just ended, then keeps `O2` fixed for the `f` inner steps.
    Doing it at the end of step `k f` is the same trajectory, and makes `M2` (in
    `state[p]["slow_momentum"]`) change exactly at the multiples of `f`. `O2` is cached in
    the state, so the slow Newton-Schulz runs once per `f` steps.

    Notes:
        * In the paper's form the momenta are plain accumulations. Newton-Schulz divides by
          the norm, so `beta1` and `beta3` only matter relative to each other through
          `alpha`; `beta2` and `eps` set the step size together with `lr`. Since `O1`, `O2`
          are scale-free and `V` grows with `t`, the step behaves like AdaGrad's
          (decaying as `1/sqrt(t)`) and scales like `1/|g|`, and entries with tiny gradients
          are amplified up to `1/sqrt(eps)`: tune `lr` to the gradient scale. On the byte-level
          Llama of `scripts/bench_optimizers.py` 3e-5 worked best (1e-5 for the EMA form);
          on a least-squares toy with O(1) gradients, 0.1.
        * Without decay, `M1` and `M2` remember every gradient: the fast memory behaves like
          momentum 1, which makes the paper's form slow on convex toys; the EMA form forgets.
        * `momentum_form="ema"` is an explicit, non-paper variant: `M1 <- beta1 M1 +
          (1-beta1) g`, `V <- beta2 V + (1-beta2) g^2` with Adam's bias correction
          `V / (1 - beta2^t)`, and `M2 <- beta3 M2 + (1-beta3) * mean(chunk gradients)`.
          Here `beta1, beta2, beta3` are decay rates, as in Adam.

    Args:
        params: parameters or param groups (group key `use_muon`, default `ndim >= 2`).
        lr: `eta`, the learning rate.
        beta1: coefficient of the fast momentum, in `[0, 1)`.
        beta2: coefficient of the second moment, in `[0, 1)`.
        beta3: coefficient of the slow momentum, in `[0, 1)`.
        alpha: weight of the slow momentum's output `O2`, `>= 0`.
        slow_frequency: `f`, the slow momentum absorbs the last `f` gradients every `f` steps.
        eps: `epsilon > 0` inside the square root.
        ns_steps: `T`, Newton-Schulz iterations.
        ns_dtype: precision of Newton-Schulz (float32 by default).
        weight_decay: decoupled weight decay (not in the paper; 0 by default).
        shape_scale: multiplier of `O1 + alpha O2` by shape, see `shape_scale`; `"none"`
            (the paper's form) by default.
        momentum_form: `"paper"` (default) or `"ema"`.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW fallback.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        beta1: float = 0.9,
        beta2: float = 0.999,
        beta3: float = 0.9,
        alpha: float = 0.5,
        slow_frequency: int = 10,
        eps: float = 1e-8,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
        weight_decay: float = 0.0,
        shape_scale: ShapeScale = "none",
        momentum_form: MomentumForm = "paper",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            alpha=alpha,
            slow_frequency=slow_frequency,
            eps=eps,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            weight_decay=weight_decay,
            shape_scale=shape_scale,
            momentum_form=momentum_form,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
        )
        super().__init__(params, defaults)

    def _check_matrix_group(self, group: dict[str, Any]) -> None:
        super()._check_matrix_group(group)
        for name in ("beta1", "beta2", "beta3"):
            check_range(name, group[name], 0.0, 1.0, high_inclusive=False)
        check_range("alpha", group["alpha"], 0.0)
        check_range("slow_frequency", group["slow_frequency"], 1, integer=True)
        check_range("eps", group["eps"], 0.0, low_inclusive=False)
        check_ns(group)
        check_shape_scale(group["shape_scale"])
        check_choice("momentum_form", group["momentum_form"], ("paper", "ema"))

    def _matrix_update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if "fast_momentum" not in state:
            for key in ("fast_momentum", "second_moment", "slow_momentum", "slow_grad_sum", "slow_output"):
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        m1, v = state["fast_momentum"], state["second_moment"]
        m2, chunk_sum, o2 = state["slow_momentum"], state["slow_grad_sum"], state["slow_output"]
        t, f = state["step"], group["slow_frequency"]
        b1, b2, b3 = group["beta1"], group["beta2"], group["beta3"]
        ema = group["momentum_form"] == "ema"

        if ema:
            m1.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            v_hat = v / (1 - b2**t)
        else:
            m1.add_(grad, alpha=b1)
            v.addcmul_(grad, grad, value=b2)
            v_hat = v
        o1 = newton_schulz(matrix_view(m1), group["ns_steps"], dtype=group["ns_dtype"]).reshape(p.shape)
        update = o1.add(o2, alpha=group["alpha"]) if group["alpha"] != 0 else o1
        update = update.div_((v_hat + group["eps"]).sqrt())

        descend(p, update, group, shape_scale(p.shape, group["shape_scale"]))

        # Slow memory: the chunk's gradients are summed and absorbed once the chunk is complete.
        chunk_sum.add_(grad)
        if t % f == 0:
            if ema:
                m2.mul_(b3).add_(chunk_sum, alpha=(1 - b3) / f)
            else:
                m2.add_(chunk_sum, alpha=b3)
            chunk_sum.zero_()
            o2.copy_(newton_schulz(matrix_view(m2), group["ns_steps"], dtype=group["ns_dtype"]).reshape(p.shape))
