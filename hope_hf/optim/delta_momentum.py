"""Delta-rule momentum (paper Eq. 22, Eq. 49 of the arXiv version).

Momentum is a memory of past gradients. Plain momentum (Eq. 17) is the gradient-descent
solution of a dot-product ("Hebbian") inner objective; replacing it with the l2 regression
`|| m g^T - P ||^2` gives the delta rule (Eq. 22)

    m_{i+1} = (alpha I - g^T g) m_i - eta P g,         W_{i+1} = W_i + m_{i+1},

whose erase term lets the memory overwrite what it stored about the current gradient's
directions instead of only decaying everything.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ._base import MatrixOptimizer, check_ns, descend, check_range, check_shape_scale
from .newton_schulz import ShapeScale, matrix_view, newton_schulz, shape_scale

__all__ = ["DeltaMomentum"]


class DeltaMomentum(MatrixOptimizer):
    r"""Delta-rule momentum in a normalised form, with an AdamW fallback for non-matrices.

    For a matrix parameter `W` (`[rows, cols]`) with gradient `g`, and `P = I`:

    .. code-block:: text

        g_hat = g / ||g||_F                                        # unit Frobenius norm
        B <- B (alpha I - beta g_hat^T g_hat) + g                  # B = -m / lr, [rows, cols]
        W <- (1 - lr * weight_decay) W - lr * s * sigma(B)

    where `sigma` is the identity, or Newton-Schulz with `orthogonalize=True` (Eq. 24), and
    `s = shape_scale(W.shape)` (only with `orthogonalize=True`).

    Why this form: the raw `g^T g` of Eq. 22 has the scale of the squared gradient, so
    `alpha I - g^T g` can have eigenvalues far below -1 and the buffer then explodes;
    with `g_hat` (unit Frobenius norm, hence `||g_hat^T g_hat||_2 <= 1`) the transition's
    eigenvalues lie in `[alpha - beta, alpha]`, a contraction for `0 <= beta <= 1`, and `beta`
    is a scale-free erase strength. `beta = 0` is heavy-ball momentum (`torch.optim.SGD`
    with `momentum=alpha`). In the torch layout (`W: [out, in]`) the erase acts on the right,
    on the input space spanned by the gradient's rows (the keys).

    Args:
        params: parameters or param groups (group key `use_muon`, default `ndim >= 2`).
        lr: `eta`, learning rate (SGD scale, e.g. 0.01-0.1; Muon scale with `orthogonalize`).
        alpha: momentum retention `alpha` in `[0, 1]`.
        beta: erase strength in `[0, 1]`.
        orthogonalize: apply Newton-Schulz to the buffer (the non-linear output of Eq. 24).
        ns_steps, ns_dtype, shape_scale: Newton-Schulz settings (used with `orthogonalize`).
        weight_decay: decoupled weight decay of the matrix parameters.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW fallback.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.05,
        alpha: float = 0.9,
        beta: float = 0.5,
        orthogonalize: bool = False,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
        shape_scale: ShapeScale = "keller",
        weight_decay: float = 0.0,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            alpha=alpha,
            beta=beta,
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
        check_range("alpha", group["alpha"], 0.0, 1.0)
        check_range("beta", group["beta"], 0.0, 1.0)
        check_ns(group)
        check_shape_scale(group["shape_scale"])

    def _matrix_update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        buf_state = state["momentum_buffer"]
        buf = matrix_view(buf_state)  # a view of a contiguous buffer: in-place updates reach the state
        g = matrix_view(grad)
        alpha, beta = group["alpha"], group["beta"]
        if beta != 0:
            g_hat = g / g.norm().clamp_min(torch.finfo(g.dtype).tiny)
            # B g_hat^T g_hat, associated so that the Gram matrix is the smaller one.
            if g.size(0) <= g.size(1):
                erase = (buf @ g_hat.mT) @ g_hat
            else:
                erase = buf @ (g_hat.mT @ g_hat)
            buf.mul_(alpha).sub_(erase, alpha=beta)
        else:
            buf.mul_(alpha)
        buf.add_(g)
        if buf.data_ptr() != buf_state.data_ptr():  # reshape had to copy (non-contiguous state)
            buf_state.copy_(buf.reshape(buf_state.shape))

        if group["orthogonalize"]:
            update = newton_schulz(buf, group["ns_steps"], dtype=group["ns_dtype"])
            scale = shape_scale(p.shape, group["shape_scale"])
        else:
            update, scale = buf, 1.0
        descend(p, update, group, scale)
