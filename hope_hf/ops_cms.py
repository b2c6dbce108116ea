"""The Continuum Memory System level, a chunk at a time (fast path of `ops_reference.cms_scan`).

A level with chunk size `C` reads every token of a chunk with the chunk-start fast weights
`theta = (gate [B, I, d], up [B, I, d], down [B, d, I])` and, when the chunk is complete, writes

    theta <- alpha * theta - eta * sum_{t in chunk} grad_theta 1/2 ||swiglu_theta(n_t) - z_t||^2

(`z_t = n_t W_V`). Each summed gradient is one matmul over the chunk (`grad_gate = dg^T X`, ...).

Two implementations of the same recurrence:
- `cms_chunked` in plain autograd ops: any padding and per-sample chunk positions, any dtype;
- `CMSChunkFunction`, used when training on an aligned batch (no padding, every sample at the
  same place of its chunk, the usual pre-training case): the backward is derived by hand, so no
  autograd graph of thousands of full-size temporaries is built, and the fast weights are kept
  only every `K ~ sqrt(#chunks)` chunks and recomputed inside a block during the backward, so
  training memory grows like `sqrt(T)` fast-weight copies instead of `T / C`.
Both are tested against `ops_reference.cms_scan` (outputs, states and gradients).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .ops_chunked import ChunkGrid, select_where

Weights = Dict[str, torch.Tensor]
NAMES = ("gate", "up", "down")


def swiglu_chunk(weights: Weights, n: torch.Tensor):
    """Per-sample SwiGLU on a chunk. n: [B, C, Dm]; gate/up: [B, I, Dm]; down: [B, Dm, I].
    Returns (output [B, C, Dm], gate pre-activation, up, hidden [B, C, I])."""
    gate = n @ weights["gate"].transpose(-1, -2)
    up = n @ weights["up"].transpose(-1, -2)
    hidden = F.silu(gate) * up
    return hidden @ weights["down"].transpose(-1, -2), gate, up, hidden


def swiglu_chunk_gradient_sum(weights: Weights, n: torch.Tensor, target: torch.Tensor, active: Optional[torch.Tensor]):
    """Outputs, and the sum over a chunk's real tokens of the gradients of
    `1/2 ||swiglu(n_t) - target_t||^2` w.r.t. gate, up, down (the hand-derived
    `ops_reference.swiglu_gradients`, summed by one matmul each). n, target: [B, C, Dm]; active:
    [B, C] or None."""
    out, gate, up, hidden = swiglu_chunk(weights, n)
    error = out - target
    if active is not None:
        error = error * active.unsqueeze(-1).to(error.dtype)
    grad_hidden = error @ weights["down"]  # [B, C, I]
    sig = torch.sigmoid(gate)
    grad_gate = grad_hidden * up * sig * (1 + gate * (1 - sig))
    grad_up = grad_hidden * F.silu(gate)
    sums = {
        "gate": grad_gate.transpose(-1, -2) @ n,
        "up": grad_up.transpose(-1, -2) @ n,
        "down": error.transpose(-1, -2) @ hidden,
    }
    return out, sums


def _state_like(theta: Weights, batch: int) -> Weights:
    return {name: w.new_zeros(batch, *w.shape[1:]) for name, w in theta.items()}


def cms_chunked(
    n: torch.Tensor,
    theta: Weights,
    grad_sum: Optional[Weights],
    num_updates: torch.Tensor,
    seen: torch.Tensor,
    mask: torch.Tensor,
    value_weight: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    chunk_size: int,
    updates: bool,
):
    """Chunk-parallel `ops_reference.cms_scan` (same arguments and results; `grad_sum=None` means
    no partial chunk is pending)."""
    batch = n.shape[0]
    state_dtype = next(iter(theta.values())).dtype
    if not updates:
        return swiglu_chunk(theta, n)[0], theta, grad_sum or _state_like(theta, batch), num_updates
    grid = ChunkGrid(seen, mask, chunk_size)
    n_grid = grid.scatter(n)
    target = n_grid @ value_weight.t()
    if grid.uniform and torch.is_grad_enabled():
        pending = None if grad_sum is None else tuple(grad_sum[name] for name in NAMES)
        y, *flat = CMSChunkFunction.apply(
            n_grid, target, eta, alpha, tuple(grid.segments), tuple(grid.completes), *(theta[k] for k in NAMES),
            *(pending or (None, None, None)),
        )
        theta = dict(zip(NAMES, flat[:3]))
        pending = dict(zip(NAMES, flat[3:])) if flat[3] is not None else None
        num_updates = num_updates + sum(1 for done in grid.completes if done)
        return y.to(n.dtype), theta, pending or _state_like(theta, batch), num_updates
    outputs, pad_outputs = [], []
    pending = grad_sum
    for seg, completes, pads in zip(grid.segments, grid.completes, grid.pads):
        part = slice(*seg)
        out, sums = swiglu_chunk_gradient_sum(theta, n_grid[:, part], target[:, part], grid.segment_active(seg))
        outputs.append(out)
        if pads is not None:  # padding reads the chunk-start weights, like the next real token
            chosen = {name: w.expand(batch, *w.shape[1:])[pads[0]] for name, w in theta.items()}
            pad_outputs.append(swiglu_chunk(chosen, n[pads].unsqueeze(1))[0].squeeze(1))
        else:
            pad_outputs.append(None)
        total = sums if pending is None else {name: pending[name] + sums[name] for name in sums}
        total = {name: g.to(state_dtype) for name, g in total.items()}
        if completes is False:
            pending = total
            continue
        updated = {name: alpha * theta[name] - eta * total[name] for name in theta}
        theta = select_where(completes, updated, theta)
        if completes is True:
            pending = None
            num_updates = num_updates + 1
        else:
            pending = {name: torch.where(completes.view(-1, 1, 1), torch.zeros_like(g), g) for name, g in total.items()}
            num_updates = num_updates + completes.long()
    y = grid.gather(torch.cat(outputs, dim=1), pad_outputs)
    return y.to(n.dtype), theta, pending or _state_like(theta, batch), num_updates


# --- the hand-derived backward ---------------------------------------------------------------------
def _weight(w: torch.Tensor) -> torch.Tensor:
    """A fast weight shared by the whole batch (an expanded parameter, stride 0) as one 2-D matrix,
    so that `[B, C, d] @ W^T` is one matmul over B*C rows."""
    return w[0] if w.dim() == 3 and w.stride(0) == 0 else w


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, in place (fused into the GEMM outside autocast)."""
    if torch.is_autocast_enabled("cpu") or a.dtype != acc.dtype or b.dtype != acc.dtype:
        acc.add_(a @ b)
    else:
        acc.baddbmm_(a, b)


class _Chunk:
    """Activations of one chunk, recomputed from its inputs and chunk-start weights."""

    def __init__(self, weights: Tuple[torch.Tensor, ...], n: torch.Tensor, target: torch.Tensor) -> None:
        gate_w, up_w, down_w = (_weight(w) for w in weights)
        self.n = n
        self.gate = n @ gate_w.transpose(-1, -2)  # [B, C, I]
        self.up = n @ up_w.transpose(-1, -2)
        self.sig = torch.sigmoid(self.gate)
        self.act = self.gate * self.sig  # silu(gate)
        self.hidden = self.act * self.up
        self.out = self.hidden @ down_w.transpose(-1, -2)  # [B, C, d]
        self.error = self.out - target
        self.grad_hidden = self.error @ down_w  # [B, C, I]
        self.dsilu = self.sig * (1 + self.gate * (1 - self.sig))
        self.grad_gate = self.grad_hidden * self.up * self.dsilu
        self.grad_up = self.grad_hidden * self.act

    def gradient_sums(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum grad gate [B, I, d], up [B, I, d], down [B, d, I])."""
        n = self.n
        return (self.grad_gate.transpose(-1, -2) @ n, self.grad_up.transpose(-1, -2) @ n,
                self.error.transpose(-1, -2) @ self.hidden)


def _step(weights, pending, chunk: _Chunk, complete: bool, eta: float, alpha: float):
    """The fast weights and pending gradient after a chunk: (weights, pending)."""
    state_dtype = weights[0].dtype
    sums = [g.to(state_dtype) for g in chunk.gradient_sums()]
    total = sums if pending is None else [p + g for p, g in zip(pending, sums)]
    if not complete:
        return weights, tuple(total)
    return tuple(alpha * w - eta * g for w, g in zip(weights, total)), None


def _owned(t: torch.Tensor, inputs) -> torch.Tensor:
    """A custom Function must not return its inputs (or stride-0 views of them) as outputs."""
    return t.clone(memory_format=torch.contiguous_format) if any(t is i for i in inputs) or t.stride(0) == 0 else t


class CMSChunkFunction(torch.autograd.Function):
    """A CMS level over an aligned grid of chunks, with a hand-written backward.

    Inputs: n, target [B, L, d]; eta, alpha: 0-dim tensors; segments: ((start, stop), ...);
    completes: (bool, ...); gate, up, down: chunk-start fast weights; pending gate/up/down: the
    gradient summed over the already-seen part of the first chunk, or None.
    Outputs: y [B, L, d], the end weights and the end pending gradient (None if no chunk is open).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, n, target, eta, alpha, segments, completes, gate, up, down, pending_gate, pending_up, pending_down):
        inputs = (gate, up, down, pending_gate, pending_up, pending_down)
        weights = (gate, up, down)
        pending = None if pending_gate is None else (pending_gate, pending_up, pending_down)
        eta_f, alpha_f = float(eta), float(alpha)
        # Keep the weights at the start of every `block`-th chunk (every chunk for short inputs);
        # the backward recomputes the others inside a block.
        block = math.ceil(math.sqrt(len(segments))) if len(segments) > 16 else 1
        checkpoints: List[Tuple] = []
        outputs = []
        for i, ((start, stop), complete) in enumerate(zip(segments, completes)):
            if i % block == 0:
                checkpoints.append((weights, pending))
            chunk = _Chunk(weights, n[:, start:stop], target[:, start:stop])
            outputs.append(chunk.out)
            weights, pending = _step(weights, pending, chunk, complete, eta_f, alpha_f)
        ctx.segments, ctx.completes, ctx.block, ctx.checkpoints = segments, completes, block, checkpoints
        ctx.save_for_backward(n, target, eta, alpha)
        weights = tuple(_owned(w, inputs) for w in weights)
        pending = tuple(_owned(p, inputs) for p in pending) if pending is not None else (None, None, None)
        return (torch.cat(outputs, dim=1), *weights, *pending)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_y, grad_gate, grad_up, grad_down, grad_pgate, grad_pup, grad_pdown):
        n, target, eta, alpha = ctx.saved_tensors
        eta_f, alpha_f = float(eta), float(alpha)
        segments, completes, block, checkpoints = ctx.segments, ctx.completes, ctx.block, ctx.checkpoints
        first_weights, first_pending = checkpoints[0]
        state_dtype, batch = first_weights[0].dtype, n.shape[0]

        def adjoint(grad, like):
            if grad is None:
                return torch.zeros(batch, *like.shape[1:], dtype=state_dtype, device=n.device)
            return grad.to(state_dtype).clone(memory_format=torch.contiguous_format)

        # Adjoints of the weights and of the pending sum after the current chunk, walking backwards.
        d_weights = [adjoint(g, w) for g, w in zip((grad_gate, grad_up, grad_down), first_weights)]
        d_pending = None
        if any(g is not None for g in (grad_pgate, grad_pup, grad_pdown)):
            d_pending = [adjoint(g, w) for g, w in zip((grad_pgate, grad_pup, grad_pdown), first_weights)]
        if grad_y is None:
            grad_y = torch.zeros_like(n)
        grad_n, grad_target = torch.zeros_like(n), torch.zeros_like(target)
        grad_eta = torch.zeros((), dtype=torch.float64)
        grad_alpha = torch.zeros((), dtype=torch.float64)

        for b in reversed(range(len(checkpoints))):
            first, last = b * block, min(len(segments), (b + 1) * block)
            weights, pending = checkpoints[b]
            replay = []  # (weights, pending, chunk) at the start of each chunk of the block
            for i in range(first, last):
                start, stop = segments[i]
                chunk = _Chunk(weights, n[:, start:stop], target[:, start:stop])
                replay.append((weights, pending, chunk))
                if i < last - 1:
                    weights, pending = _step(weights, pending, chunk, completes[i], eta_f, alpha_f)
            for i in reversed(range(first, last)):
                start, stop = segments[i]
                weights, pending, chunk = replay[i - first]
                x = chunk.n
                gate_w, up_w, down_w = (_weight(w) for w in weights)
                # The chunk's gradient sums G enter the next state as `-eta * G` (complete chunk)
                # or as `pending + G` (open chunk): their adjoint is `scale * source`.
                source, scale = (d_weights, -eta_f) if completes[i] else (d_pending, 1.0)
                d_pending_in = None
                if source is not None:
                    q_gate = x @ source[0].to(x.dtype).transpose(-1, -2)  # [B, C, I]
                    q_up = x @ source[1].to(x.dtype).transpose(-1, -2)
                    q_error = chunk.hidden @ source[2].to(x.dtype).transpose(-1, -2)  # [B, C, d]
                    q_hidden = chunk.error @ source[2].to(x.dtype)  # [B, C, I]
                    if completes[i]:
                        # <dW', G> without forming G: <dW, g^T x> = sum(g * (x dW^T)).
                        grad_eta -= ((chunk.grad_gate * q_gate).sum() + (chunk.grad_up * q_up).sum()
                                     + (chunk.error * q_error).sum()).double()
                        for w, dw in zip(weights, d_weights):
                            grad_alpha += (dw * w).sum().double()
                        if pending is not None:
                            grad_eta -= sum((dw * p).sum() for dw, p in zip(d_weights, pending)).double()
                    if pending is not None:
                        d_pending_in = [scale * s for s in source]
                    d_grad_gate, d_grad_up = scale * q_gate, scale * q_up
                    d_x = scale * (chunk.grad_gate @ source[0].to(x.dtype) + chunk.grad_up @ source[1].to(x.dtype))
                    # grad_gate = grad_hidden * up * dsilu(gate); grad_up = grad_hidden * act
                    d_grad_hidden = d_grad_up * chunk.act + d_grad_gate * chunk.up * chunk.dsilu
                    d_act = d_grad_up * chunk.grad_hidden
                    d_up = d_grad_gate * chunk.grad_hidden * chunk.dsilu
                    sig = chunk.sig
                    d2silu = sig * (1 - sig) * (2 + chunk.gate * (1 - 2 * sig))
                    d_gate = d_grad_gate * chunk.grad_hidden * chunk.up * d2silu
                    # grad_hidden = error @ down; error = out - target
                    d_error = scale * q_error + d_grad_hidden @ down_w.transpose(-1, -2)
                    grad_target[:, start:stop] -= d_error.to(grad_target.dtype)
                    d_out = grad_y[:, start:stop] + d_error
                    d_hidden = scale * q_hidden + d_out @ down_w
                else:
                    d_grad_hidden = None
                    d_out = grad_y[:, start:stop]
                    d_hidden = d_out @ down_w
                    d_act = d_up = d_gate = d_x = 0.0
                if completes[i]:
                    for dw in d_weights:  # weights' = alpha * weights - ...
                        dw.mul_(alpha_f)
                # out = hidden @ down^T; hidden = act * up; act = silu(gate); gate/up = x @ W^T
                d_act = d_act + d_hidden * chunk.up
                d_up = d_up + d_hidden * chunk.act
                d_gate = d_gate + d_act * chunk.dsilu
                d_x = d_x + d_up @ up_w + d_gate @ gate_w
                grad_n[:, start:stop] += d_x.to(grad_n.dtype)
                _accumulate(d_weights[0], d_gate.transpose(-1, -2), x)
                _accumulate(d_weights[1], d_up.transpose(-1, -2), x)
                _accumulate(d_weights[2], d_out.transpose(-1, -2).to(chunk.hidden.dtype), chunk.hidden)
                if d_grad_hidden is not None:
                    _accumulate(d_weights[2], chunk.error.transpose(-1, -2), d_grad_hidden)
                d_pending = d_pending_in
        grad_pending = tuple(d_pending) if first_pending is not None and d_pending is not None else (None, None, None)
        return (grad_n, grad_target, grad_eta.to(eta.dtype), grad_alpha.to(alpha.dtype), None, None,
                *d_weights, *grad_pending)
