"""Muon: momentum, then Newton-Schulz orthogonalisation of matrix updates (Jordan et al., 2024).

In the paper's language (Eq. 24) Muon is momentum GD whose memory `m` is a linear layer and
whose output non-linearity is `sigma = Newton-Schulz`:
`W <- W + sigma(m_{i+1})`, `m_{i+1} = alpha m_i - eta grad`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ._base import MatrixOptimizer, check_ns, descend, check_range, check_shape_scale
from .newton_schulz import ShapeScale, matrix_view, newton_schulz, shape_scale

__all__ = ["Muon"]


class Muon(MatrixOptimizer):
    r"""Muon with an AdamW fallback for non-matrix parameters.

    For a matrix parameter `W` (`[rows, cols]`; `[rows, ...]` is flattened to
    `[rows, prod(...)]`) with gradient `g`:

    .. code-block:: text

        B <- momentum * B + g                              # momentum buffer
        U <- g + momentum * B   if nesterov   else B
        W <- (1 - lr * weight_decay) * W - lr * s * NewtonSchulz(U)

    with `s = shape_scale(W.shape, shape_scale)` (`"keller"`: `max(1, rows/cols) ** 0.5`).
    Because Newton-Schulz first divides by the Frobenius norm, the buffer's overall scale is
    irrelevant: this sum form and the EMA form `B <- lerp(B, g, 1 - momentum)` of the
    reference implementation give the same update (up to the `1e-7` in the normalisation).

    Parameters in `use_muon=False` groups get AdamW (see `hope_hf.optim._base`).

    Args:
        params: parameters or param groups. Group keys: `use_muon` (default: `ndim >= 2`) and
            any hyperparameter below.
        lr: learning rate of the matrix rule (the usual Muon range is 0.01-0.05 with
            `shape_scale="keller"`).
        momentum: `momentum` in `[0, 1)`.
        nesterov: use the Nesterov form `g + momentum * B`.
        ns_steps: Newton-Schulz iterations.
        ns_dtype: precision of Newton-Schulz (float32 by default; bfloat16 on GPUs is faster).
        weight_decay: decoupled weight decay of the matrix parameters.
        shape_scale: `"keller"`, `"rms"` (reuse AdamW hyperparameters) or `"none"`.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW fallback (used as `lr`
            and `weight_decay` of `use_muon=False` groups that do not set them).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
        weight_decay: float = 0.0,
        shape_scale: ShapeScale = "keller",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            weight_decay=weight_decay,
            shape_scale=shape_scale,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
        )
        super().__init__(params, defaults)

    def _check_matrix_group(self, group: dict[str, Any]) -> None:
        super()._check_matrix_group(group)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_inclusive=False)
        check_ns(group)
        check_shape_scale(group["shape_scale"])

    def _matrix_update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        momentum = group["momentum"]
        buf.mul_(momentum).add_(grad)
        update = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        ortho = newton_schulz(matrix_view(update), group["ns_steps"], dtype=group["ns_dtype"])
        descend(p, ortho, group, shape_scale(p.shape, group["shape_scale"]))
