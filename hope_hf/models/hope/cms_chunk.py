"""One Continuum Memory System level, a chunk at a time (docs/design.md §5): the same outputs and end
state as `cms_naive`.

A level with chunk size `C` reads every token of a chunk with the chunk-start fast weights and, when
the chunk is complete, takes `primitives.cms_step` with the chunk's summed gradient (one matmul per
weight, `primitives.SwiGLUPass`). The open chunk's inputs wait in a buffer ([B, C, d], in the cache),
so a decoding step costs one read of the fast weights.

Positions are counted in a *frame* that starts at the open chunk's first token: the buffered inputs
fill slots `[0, seen % C)` and this call's tokens follow (`ChunkGrid` positions), so every chunk of
the frame is `[i C, (i + 1) C)`.

Two implementations of the same recurrence:
- autograd ops: any padding and per-sample chunk positions, any dtype;
- `CMSChunkFunction`, used when training on an aligned batch (no padding, every sample at the same
  place of its chunk, the usual pre-training case): a hand-derived backward, so no autograd graph of
  full-size temporaries is built, and above `recompute_above` chunks the fast weights are kept only
  every `K ~ sqrt(#chunks)` chunks and recomputed inside a block during the backward.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from .cache_hope import CMSState
from .chunk_grid import ChunkGrid, in_state_precision, select_where
from .primitives import SWIGLU_NAMES, SwiGLUPass, apply_weight, shared_weight, silu_second


class Frame:
    """This call's tokens after the buffered inputs of the open chunk, on the chunk grid.

    grid: the `ChunkGrid` of the call's tokens (slots from `lo = min(seen % C)`); buffer:
    [B, C, d] with rows `[0, seen % C)` filled. `x` [B, hi, d] holds the buffered rows at their
    slots and the tokens at theirs; `segments` are the frame's chunks; `out_starts[i]` the first
    slot of segment i whose output is emitted (slots before `lo` were emitted by earlier calls).
    """

    def __init__(self, grid: ChunkGrid, n: torch.Tensor, buffer: torch.Tensor, seen: torch.Tensor, mask: torch.Tensor):
        chunk, lo = grid.chunk_size, grid.lo
        self.grid, self.lo = grid, lo
        n_grid = grid.scatter(n)  # [B, L, d], slots lo..hi
        hi = lo + n_grid.shape[1]
        if not grid.uniform and lo < min(chunk, hi):
            # samples further into their chunk than `lo` have buffered rows in slots [lo, offset)
            head = n_grid[:, : min(chunk, hi) - lo] + buffer[:, lo : min(chunk, hi)].to(n_grid.dtype)
            n_grid = torch.cat([head, n_grid[:, head.shape[1]:]], dim=1)
        self.x = torch.cat([buffer[:, :lo].to(n_grid.dtype), n_grid], dim=1) if lo > 0 else n_grid
        self.segments = [(0 if i == 0 else start + lo, stop + lo) for i, (start, stop) in enumerate(grid.segments)]
        self.out_starts = [max(start, lo) for start, _ in self.segments]
        end = seen % chunk + mask.long().sum(1)  # [B] frame slot after each sample's last token
        self.end = end
        slots = torch.arange(hi, device=n.device)
        self.active = None if grid.uniform else slots[None, :] < end[:, None]  # real tokens and buffered rows

    def segment_active(self, i: int) -> Optional[torch.Tensor]:
        start, stop = self.segments[i]
        return None if self.active is None else self.active[:, start:stop]

    def next_buffer(self, chunk: int) -> torch.Tensor:
        """[B, C, d]: the inputs of each sample's open chunk after this call (zero-padded)."""
        x, batch, hi = self.x, self.x.shape[0], self.x.shape[1]
        fill = self.end % chunk
        if self.grid.uniform:
            count = hi % chunk
            rows = x[:, hi - count :]
            return torch.cat([rows, rows.new_zeros(batch, chunk - count, rows.shape[-1])], dim=1)
        slot = (self.end - fill)[:, None] + torch.arange(chunk, device=x.device)[None, :]  # [B, C]
        keep = torch.arange(chunk, device=x.device)[None, :] < fill[:, None]
        rows = x.gather(1, slot.clamp(max=hi - 1)[..., None].expand(-1, -1, x.shape[-1]))
        return rows * keep[..., None].to(rows.dtype)


@in_state_precision
def cms_chunk(
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
    defer_chunk_end: bool = False,
) -> Tuple[torch.Tensor, CMSState]:
    """Chunk-parallel `cms_naive.cms_naive` (same arguments and results). `recompute_above`: training
    over more chunks than this keeps the fast weights only every ~sqrt(#chunks) chunks.
    `defer_chunk_end` (one token per sample): buffer the token but leave the update of a chunk it
    completes to `complete_chunk` (the token's output reads the chunk-start weights either way); the
    compiled decoding step uses it, since only a host read can tell whether a chunk ends."""
    batch = n.shape[0]
    theta, num_updates = state.theta, state.num_updates
    buffer = state.buffer if state.buffer is not None else n.new_zeros(batch, chunk_size, n.shape[-1])
    weights = [theta[k] for k in SWIGLU_NAMES]
    if not updates:
        return SwiGLUPass(weights, n).out, CMSState(theta, buffer, num_updates)
    if n.shape[1] == 1:
        out, state = _cms_token(n, CMSState(theta, buffer, num_updates), seen, mask)
        if not defer_chunk_end:
            state = complete_chunk(state, seen, mask, value_weight, eta, alpha)
        return out, state
    grid = ChunkGrid(seen, mask, chunk_size)
    frame = Frame(grid, n, buffer, seen, mask)
    if grid.uniform and torch.is_grad_enabled():
        target = apply_weight(frame.x, value_weight)
        y, *end = CMSChunkFunction.apply(
            frame.x, target, eta, alpha, tuple(frame.segments), tuple(grid.completes), frame.lo, recompute_above,
            *weights,
        )
        num_updates = num_updates + sum(1 for done in grid.completes if done)
        return y.to(n.dtype), CMSState(dict(zip(SWIGLU_NAMES, end)), frame.next_buffer(chunk_size), num_updates)
    outputs, pad_outputs = [], []
    for i, (completes, pads) in enumerate(zip(grid.completes, grid.pads)):
        start, stop = frame.segments[i]
        out_start = frame.out_starts[i]
        weights = [theta[k] for k in SWIGLU_NAMES]
        if pads is not None:  # padding reads the chunk-start weights, like the next real token
            chosen = [w.expand(batch, *w.shape[1:])[pads[0]] for w in weights]
            pad_outputs.append(SwiGLUPass(chosen, n[pads].unsqueeze(1)).out.squeeze(1))
        else:
            pad_outputs.append(None)
        if completes is False:
            outputs.append(SwiGLUPass(weights, frame.x[:, out_start:stop]).out)
            continue
        x = frame.x[:, start:stop]
        chunk = SwiGLUPass(weights, x, apply_weight(x, value_weight), frame.segment_active(i))
        outputs.append(chunk.out[:, out_start - start :])
        theta = select_where(completes, dict(zip(SWIGLU_NAMES, chunk.step(weights, eta, alpha))), theta)
        num_updates = num_updates + (1 if completes is True else completes.long())
    y = grid.gather(torch.cat(outputs, dim=1), pad_outputs)
    return y.to(n.dtype), CMSState(theta, frame.next_buffer(chunk_size), num_updates)


def _cms_token(n: torch.Tensor, state: CMSState, seen: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, CMSState]:
    """One token per sample (decoding): read at the chunk-start weights and buffer the input (no
    host reads). n: [B, 1, d]; the state's buffer [B, C, d] is allocated."""
    buffer = state.buffer
    chunk_size = buffer.shape[1]
    out = SwiGLUPass([state.theta[k] for k in SWIGLU_NAMES], n).out
    slot = (seen % chunk_size)[:, None] == torch.arange(chunk_size, device=n.device)[None, :]  # [B, C]
    write = slot & mask[:, :1]
    return out, CMSState(state.theta, torch.where(write[..., None], n.to(buffer.dtype), buffer), state.num_updates)


def complete_chunk(state: CMSState, seen: torch.Tensor, mask: torch.Tensor, value_weight: torch.Tensor,
                   eta: torch.Tensor, alpha: torch.Tensor) -> CMSState:
    """After one token per sample (`seen`: [B] real tokens before it, `mask`: [B, 1]) has been buffered:
    for the samples whose chunk it completed, the chunk's update from the buffer, and an empty buffer."""
    buffer = state.buffer
    completes = ((seen + 1) % buffer.shape[1] == 0) & mask[:, 0]  # [B]
    if not bool(completes.any()):  # most tokens complete no chunk
        return state
    completes = True if bool(completes.all()) else completes
    weights = [state.theta[k] for k in SWIGLU_NAMES]
    chunk = SwiGLUPass(weights, buffer, apply_weight(buffer, value_weight.to(buffer.dtype)))
    theta = select_where(completes, dict(zip(SWIGLU_NAMES, chunk.step(weights, eta, alpha))), state.theta)
    buffer = torch.zeros_like(buffer) if completes is True else buffer * (~completes).view(-1, 1, 1)
    return CMSState(theta, buffer, state.num_updates + (1 if completes is True else completes.long()))


# --- the hand-derived backward ---------------------------------------------------------------------
def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, decay: float = 1.0) -> None:
    """acc <- decay * acc + a @ b, in place (fused into the GEMM outside autocast)."""
    if torch.is_autocast_enabled("cpu") or a.dtype != acc.dtype or b.dtype != acc.dtype:
        if decay != 1.0:
            acc.mul_(decay)
        acc.add_(a @ b)
    else:
        acc.baddbmm_(a, b, beta=decay)


def _inner(adjoint: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(adjoint * weight) over the batch, as one dot product (no temporary of the weights' size);
    weight may be shared by the batch (stride 0)."""
    if weight.stride(0) == 0:
        return torch.dot(adjoint.sum(0).flatten(), weight[0].flatten())
    return torch.dot(adjoint.flatten(), weight.flatten())


def _owned(t: torch.Tensor, inputs) -> torch.Tensor:
    """A custom Function must not return its inputs (or stride-0 views of them) as outputs."""
    return t.clone(memory_format=torch.contiguous_format) if any(t is i for i in inputs) or t.stride(0) == 0 else t


class CMSChunkFunction(torch.autograd.Function):
    """A CMS level over an aligned frame of chunks, with a hand-written backward.

    Inputs: x, target [B, L, d] (the frame: buffered rows then this call's tokens); eta, alpha:
    0-dim tensors; segments: ((start, stop), ...) frame chunks; completes: (bool, ...); out_start:
    the first slot whose output is returned; recompute_above: above this many chunks, keep the
    weights only every ~sqrt(#chunks) chunks; gate, up, down: chunk-start fast weights.
    Outputs: y [B, L - out_start, d] and the end weights.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, target, eta, alpha, segments, completes, out_start, recompute_above, gate, up, down):
        weights = (gate, up, down)
        eta_f, alpha_f = float(eta), float(alpha)
        # Keep the weights at the start of every `block`-th chunk (every chunk for short inputs);
        # the backward recomputes the others inside a block.
        block = math.ceil(math.sqrt(len(segments))) if len(segments) > recompute_above else 1
        checkpoints: List[Tuple] = []
        outputs = []
        for i, ((start, stop), complete) in enumerate(zip(segments, completes)):
            if i % block == 0:
                checkpoints.append(weights)
            first = max(start, out_start)
            if not complete:  # an open chunk: outputs only
                outputs.append(SwiGLUPass(weights, x[:, first:stop]).out)
                continue
            chunk = SwiGLUPass(weights, x[:, start:stop], target[:, start:stop])
            outputs.append(chunk.out[:, first - start :])
            weights = chunk.step(weights, eta_f, alpha_f)
        ctx.segments, ctx.completes, ctx.block, ctx.checkpoints = segments, completes, block, checkpoints
        ctx.out_start = out_start
        ctx.save_for_backward(x, target, eta, alpha)
        # An output kept on ctx (a checkpoint that is also the end state) would form a reference
        # cycle through its grad_fn and leak: return copies of those.
        kept = (gate, up, down) + tuple(t for state in checkpoints for t in state)
        return (torch.cat(outputs, dim=1), *(_owned(w, kept) for w in weights))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_y, grad_gate, grad_up, grad_down):
        x_all, target, eta, alpha = ctx.saved_tensors
        eta_f, alpha_f = float(eta), float(alpha)
        segments, completes, block, checkpoints = ctx.segments, ctx.completes, ctx.block, ctx.checkpoints
        out_start = ctx.out_start
        first_weights = checkpoints[0]
        state_dtype, batch = first_weights[0].dtype, x_all.shape[0]

        def adjoint(grad, like):
            if grad is None:
                return torch.zeros(batch, *like.shape[1:], dtype=state_dtype, device=x_all.device)
            return grad.to(state_dtype).clone(memory_format=torch.contiguous_format)

        # Adjoints of the weights after the current chunk, walking the chunks backwards.
        d_weights = [adjoint(g, w) for g, w in zip((grad_gate, grad_up, grad_down), first_weights)]
        if grad_y is None:
            grad_y = x_all.new_zeros(batch, x_all.shape[1] - out_start, x_all.shape[2])
        grad_x, grad_target = torch.zeros_like(x_all), torch.zeros_like(target)
        grad_eta = torch.zeros((), dtype=torch.float64)
        grad_alpha = torch.zeros((), dtype=torch.float64)

        for b in reversed(range(len(checkpoints))):
            first_chunk, last_chunk = b * block, min(len(segments), (b + 1) * block)
            weights = checkpoints[b]
            replay = []  # (weights, chunk) at the start of each chunk of the block
            for i in range(first_chunk, last_chunk):
                start, stop = segments[i]
                emitted = max(start, out_start)
                chunk = SwiGLUPass(weights, x_all[:, start:stop] if completes[i] else x_all[:, emitted:stop],
                               target[:, start:stop] if completes[i] else None)
                replay.append((weights, chunk))
                if completes[i] and i < last_chunk - 1:
                    weights = chunk.step(weights, eta_f, alpha_f)
            for i in reversed(range(first_chunk, last_chunk)):
                start, stop = segments[i]
                weights, chunk = replay[i - first_chunk]
                x = chunk.n
                lo = start if completes[i] else max(start, out_start)  # the slots `chunk` covers
                emitted = max(start, out_start)
                gate_w, up_w, down_w = (shared_weight(w) for w in weights)
                # this chunk's outputs' gradient, zero on the rows emitted by an earlier call
                d_out = grad_y[:, emitted - out_start : stop - out_start].to(chunk.out.dtype)
                if emitted > lo:
                    d_out = torch.cat([d_out.new_zeros(batch, emitted - lo, d_out.shape[-1]), d_out], dim=1)
                if completes[i]:
                    # weights' = alpha * weights - rate * G, G = (g_gate^T x, g_up^T x, error^T hidden),
                    # rate = eta / max(1, energy): the adjoint of G is -rate * dW'. Its products:
                    q_gate = x @ d_weights[0].to(x.dtype).transpose(-1, -2)  # [B, C, I]
                    q_up = x @ d_weights[1].to(x.dtype).transpose(-1, -2)
                    q_error = chunk.hidden @ d_weights[2].to(x.dtype).transpose(-1, -2)  # [B, C, d]
                    q_hidden = chunk.error @ d_weights[2].to(x.dtype)  # [B, C, I]
                    # <dW', G> per sample without forming G: <dW, g^T x> = sum(g * (x dW^T)).
                    inners = ((chunk.grad_gate * q_gate).sum((1, 2)), (chunk.grad_up * q_up).sum((1, 2)),
                              (chunk.error * q_error).sum((1, 2)))
                    rates = chunk.rates(1.0)  # 1 / max(1, energy), [B, 1, 1] each
                    grad_eta -= sum((r.flatten() * inner).sum() for r, inner in zip(rates, inners)).double()
                    for w, dw in zip(weights, d_weights):
                        grad_alpha += _inner(dw, w).double()
                    # through the normalisers: d(1/E)/dE = -1/E^2 where E > 1; dE/du_t = 2 g_t u_t
                    # (the gains g_t carry no gradient)
                    d_energy_gate, d_energy_up, d_energy_hidden = (
                        (eta_f * inner * r.flatten() ** 2 * (energy > 1)).view(-1, 1, 1)
                        for inner, r, energy in zip(inners, rates, chunk.energies))
                    scale_gate, scale_up, scale_hidden = (-eta_f * r for r in rates)
                    d_grad_gate, d_grad_up = scale_gate * q_gate, scale_up * q_up
                    d_x = (scale_gate * (chunk.grad_gate @ d_weights[0].to(x.dtype))
                           + scale_up * (chunk.grad_up @ d_weights[1].to(x.dtype)))
                    d_x = d_x + 2 * (d_energy_gate * chunk.gain_gate.unsqueeze(-1)
                                     + d_energy_up * chunk.gain_up.unsqueeze(-1)) * x
                    # grad_gate = grad_hidden * up * dsilu(gate); grad_up = grad_hidden * act
                    d_grad_hidden = d_grad_up * chunk.act + d_grad_gate * chunk.up * chunk.dsilu
                    d_act = d_grad_up * chunk.grad_hidden
                    d_up = d_grad_gate * chunk.grad_hidden * chunk.dsilu
                    d_gate = d_grad_gate * chunk.grad_hidden * chunk.up * silu_second(chunk.gate)
                    # grad_hidden = error @ down; error = out - target
                    d_error = scale_hidden * q_error + d_grad_hidden @ down_w.transpose(-1, -2)
                    grad_target[:, start:stop] -= d_error.to(grad_target.dtype)
                    d_out = d_out + d_error
                    d_hidden = scale_hidden * q_hidden + d_out @ down_w + 2 * d_energy_hidden * chunk.hidden
                    decay = alpha_f  # weights' = alpha * weights - ...: scales each adjoint (in its first GEMM below)
                else:
                    decay = 1.0
                    d_grad_hidden = None
                    d_hidden = d_out @ down_w
                    d_act = d_up = d_gate = d_x = 0.0
                # out = hidden @ down^T; hidden = act * up; act = silu(gate); gate/up = x @ W^T
                d_act = d_act + d_hidden * chunk.up
                d_up = d_up + d_hidden * chunk.act
                d_gate = d_gate + d_act * chunk.dsilu
                d_x = d_x + d_up @ up_w + d_gate @ gate_w
                grad_x[:, lo:stop] += d_x.to(grad_x.dtype)
                _accumulate(d_weights[0], d_gate.transpose(-1, -2), x, decay)
                _accumulate(d_weights[1], d_up.transpose(-1, -2), x, decay)
                _accumulate(d_weights[2], d_out.transpose(-1, -2).to(chunk.hidden.dtype), chunk.hidden, decay)
                if d_grad_hidden is not None:
                    _accumulate(d_weights[2], chunk.error.transpose(-1, -2), d_grad_hidden)
        return (grad_x, grad_target, grad_eta.to(eta.dtype), grad_alpha.to(alpha.dtype), None, None, None, None,
                *d_weights)
