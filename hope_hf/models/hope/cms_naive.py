"""One Continuum Memory System level, one token at a time: the reference that `cms_chunk` is tested
against (paper Eq. 31; docs/design.md §5)."""

from __future__ import annotations

from typing import Tuple

import torch

from .cache_hope import CMSState
from .chunk_grid import select_where
from .primitives import SWIGLU_NAMES, SwiGLUPass


def cms_naive(
    *,
    n: torch.Tensor,
    state: CMSState,
    seen: torch.Tensor,
    mask: torch.Tensor,
    value_weight: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    chunk_size: int,
    updates: bool,
    recompute_above: int = 16,
) -> Tuple[torch.Tensor, CMSState]:
    """A CMS level over a span of tokens.

    Every token is read with the chunk-start fast weights `theta` and its input kept in the buffer;
    when a sample's chunk is complete, its fast weights take `primitives.cms_step` with the gradients
    of `1/2 ||MLP_theta(n_t) - n_t W_V^T||^2` over the chunk's tokens, and the buffer is emptied.

    n: [B, T, d]; mask: [B, T]; seen: [B]; state.buffer: [B, C, d] with rows `[0, seen % C)` filled,
    the rest zero (None: empty); value_weight: [d, d] (nn.Linear layout); eta, alpha: 0-dim.
    (`recompute_above` only concerns the chunked path's memory; accepted for a common signature.)
    Returns (y [B, T, d], end state).
    """
    batch = n.shape[0]
    theta, num_updates = dict(state.theta), state.num_updates
    buffer = state.buffer if state.buffer is not None else n.new_zeros(batch, chunk_size, n.shape[-1])
    counter = seen.clone()
    slots = torch.arange(chunk_size, device=n.device)
    outputs = []
    for t in range(n.shape[1]):
        n_t, active = n[:, t : t + 1], mask[:, t]
        outputs.append(SwiGLUPass([theta[k] for k in SWIGLU_NAMES], n_t).out[:, 0])
        if not updates:
            continue
        write = (active[:, None] & (slots == counter[:, None] % chunk_size))[..., None]  # [B, C, 1]
        buffer = torch.where(write, n_t, buffer)
        counter = counter + active.long()
        boundary = active & (counter % chunk_size == 0)
        if not bool(boundary.any()):
            continue
        weights = [theta[k] for k in SWIGLU_NAMES]
        chunk = SwiGLUPass(weights, buffer, buffer @ value_weight.t())
        updated = dict(zip(SWIGLU_NAMES, chunk.step(weights, eta, alpha)))
        theta = select_where(boundary, updated, theta)
        buffer = torch.where(boundary.view(-1, 1, 1), torch.zeros_like(buffer), buffer)
        num_updates = num_updates + boundary.long()
    return torch.stack(outputs, dim=1), CMSState(theta, buffer, num_updates)
