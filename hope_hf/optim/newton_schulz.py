"""Newton-Schulz orthogonalisation: the non-linear output `sigma` of paper Eq. 24.

The only place in `hope_hf.optim` where the iteration is written. Muon, M3 and the
Newton-Schulz output option of `DeltaMomentum` / `DeepMomentum` all call `newton_schulz`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["NS_COEFFICIENTS", "newton_schulz", "matrix_view", "shape_scale", "ShapeScale"]

#: Coefficients (a, b, c) of the quintic iteration `X <- a X + b (X X^T) X + c (X X^T)^2 X`
#: (Jordan et al., 2024). They are tuned so that 5 steps push every singular value of a
#: Frobenius-normalised matrix into roughly [0.7, 1.2] as fast as possible, trading exact
#: convergence to 1 (which the cubic Newton-Schulz iteration gives, slowly) for speed.
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

ShapeScale = Literal["keller", "rms", "none"]


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Approximately orthogonalise `G`: map `G = U S V^T` to about `U V^T`.

    Args:
        G: `[..., m, n]`; leading dimensions are a batch (each matrix is treated on its own).
        steps: Number of quintic iterations (5 is the usual choice; 0 returns `G / ||G||_F`).
        eps: Added to the Frobenius norm before dividing, so that `G = 0` maps to 0.
        dtype: Precision of the iteration. **Default float32** (exact enough for the
            closed-form tests, and fast on CPU); pass `torch.bfloat16` on GPUs for the
            speed of the reference Muon implementation (its singular values are then only
            good to ~1e-2, which Muon tolerates).

    Returns:
        `[..., m, n]` in the dtype of `G`, with singular values in roughly [0.7, 1.2]
        (exactly 0 for the null space of `G`).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz expects a tensor with at least 2 dims, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"Invalid ns_steps: {steps} (must be >= 0)")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    # Iterate on the wide orientation: X X^T is then the smaller Gram matrix.
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    # Frobenius norm >= spectral norm, so after this every singular value is <= 1, inside
    # the region where the polynomial iteration converges.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def matrix_view(t: Tensor) -> Tensor:
    """The 2-D view of a parameter-shaped tensor that the matrix rules act on.

    `[rows, cols]` stays as is; `[rows, d1, d2, ...]` becomes `[rows, d1 * d2 * ...]`
    (trailing dims flattened, as for conv filters: each output unit is one row).
    The result is a view when `t` is contiguous, so in-place updates reach `t`.
    """
    if t.ndim < 2:
        raise ValueError(f"matrix_view expects a tensor with at least 2 dims, got shape {tuple(t.shape)}")
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def shape_scale(shape: torch.Size | tuple[int, ...], mode: ShapeScale) -> float:
    """Multiplier of an orthogonalised update of a parameter of this shape.

    An orthogonal `[rows, cols]` matrix has RMS entry `1 / sqrt(max(rows, cols))`, so without a
    correction tall and wide matrices would move at different speeds.

    * `"keller"`: `max(1, rows / cols) ** 0.5` (the Muon reference of Keller Jordan): a
      tall matrix's update then has unit spectral norm per input direction scaled by
      `sqrt(fan_out / fan_in)`.
    * `"rms"`: `0.2 * sqrt(max(rows, cols))` (Moonlight, Liu et al. 2025): gives the update
      an RMS of 0.2, like AdamW's, so AdamW learning rates and weight decays can be reused.
    * `"none"`: 1.
    """
    if mode == "none":
        return 1.0
    rows = shape[0]
    cols = 1
    for d in shape[1:]:
        cols *= d
    if mode == "keller":
        return max(1.0, rows / cols) ** 0.5
    if mode == "rms":
        return 0.2 * max(rows, cols) ** 0.5
    raise ValueError(f"Invalid shape_scale: {mode!r} (must be 'keller', 'rms' or 'none')")
