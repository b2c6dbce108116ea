"""Chunk bookkeeping shared by the chunked memories (`dgd_chunk`) and CMS levels (`cms_chunk`)
(docs/design.md §4).

`ChunkGrid` aligns a span of tokens on a chunk grid per sample (chunks are counted per sample from
its first real token; padding does not advance a sample), `select_where` keeps a new state only for
the samples a condition picks, `masked_rates` turns fillers and padding into no-op updates, and
`scan_chunks` runs a step over the chunks, recomputing blocks of them in the backward when asked.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch.utils.checkpoint import checkpoint

from .cache_hope import MemoryState

# Log-retention floor: alpha = 0 (a full reset) stays finite in the log domain (exp(-1e4) == 0).
LOG_ALPHA_MIN = -1.0e4

# A per-sample condition: a [B] bool tensor, or a Python bool that holds for every sample.
Condition = Union[bool, torch.Tensor]


def in_state_precision(scan):
    """Run a scan with autocast off: its matmuls are per-chunk and small (bf16 does not pay there)
    and the fast weights accumulate thousands of small updates, so they run in the state's dtype
    (float32 or float64). Under autocast, a model's projections, static levels and LM head still
    run in bf16."""

    @functools.wraps(scan)
    def wrapper(**kwargs):
        device = next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).device
        with torch.autocast(device.type, enabled=False):
            return scan(**kwargs)

    return wrapper


class ChunkGrid:
    """Aligns a span of tokens on the chunk grid of size `chunk_size`.

    A sample that has seen `seen` real tokens puts its `r`-th real token of the span at stream
    position `seen % chunk_size + r`; chunk boundaries are the multiples of `chunk_size` for every
    sample. The grid covers positions `[lo, hi)` (the union over samples) and is cut into
    `segments` at the boundaries: the first may start mid-chunk, the last may end mid-chunk.

    A padding token sits at the position of the next real token (it reads the state that token
    would read, as in the reference) but occupies no grid slot: `pads[i]` lists the
    (sample, token) pairs of the padding tokens that read at segment `i`'s chunk-start state.

    seen: [B] real tokens before the span; mask: [B, T] bool (True = real token).
    """

    def __init__(self, seen: torch.Tensor, mask: torch.Tensor, chunk_size: int) -> None:
        batch, length = mask.shape
        self.chunk_size = chunk_size
        offset = seen % chunk_size  # [B]
        if length == 1:  # decoding: one slot per sample, no alignment needed
            self._single_token(offset, mask[:, 0], chunk_size)
            return
        counts = mask.long().sum(1)  # [B]
        self.uniform = bool(mask.all()) and bool((offset == offset[0]).all())
        if self.uniform:
            lo, hi = int(offset[0]), int(offset[0]) + length
        else:
            real_before = mask.long().cumsum(1) - mask.long()
            position = offset[:, None] + real_before  # [B, T]: a real token's slot, or a pad's read slot
            lo, hi = int(offset.min()), int(position.max()) + 1
            # Padding goes to a trash slot at index `hi - lo` that is dropped.
            self.index = torch.where(mask, position - lo, torch.full_like(position, hi - lo))
        self.lo, self.length = lo, hi - lo
        slots = torch.arange(lo, hi, device=mask.device)
        end = offset + counts
        # [B, L]: whether a grid slot holds a real token of the sample (None: all do).
        self.active = None if self.uniform else (slots >= offset[:, None]) & (slots < end[:, None])
        self.segments: List[Tuple[int, int]] = []
        start = lo
        while start < hi:
            stop = min(hi, (start // chunk_size + 1) * chunk_size)
            self.segments.append((start - lo, stop - lo))
            start = stop
        # Per segment, the samples whose chunk completes at its end (a bool [B], or a Python bool
        # when it is the same for every sample).
        self.completes: List[object] = []
        for seg_start, seg_stop in self.segments:
            absolute = seg_stop + lo
            if absolute % chunk_size != 0:
                self.completes.append(False)
            elif self.uniform:
                self.completes.append(True)
            else:
                done = end >= absolute
                self.completes.append(bool(done.all()) or (done if bool(done.any()) else False))
        self.pads: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(self.segments)
        self.pad_slots: List[Optional[torch.Tensor]] = [None] * len(self.segments)  # each pad's slot in its segment
        if not self.uniform and not bool(mask.all()):
            pad_sample, pad_token = (~mask).nonzero(as_tuple=True)
            pad_slot = position[pad_sample, pad_token] - lo
            for i, (seg_start, seg_stop) in enumerate(self.segments):
                inside = (pad_slot >= seg_start) & (pad_slot < seg_stop)
                if bool(inside.any()):
                    self.pads[i] = (pad_sample[inside], pad_token[inside])
                    self.pad_slots[i] = pad_slot[inside] - seg_start

    def _single_token(self, offset: torch.Tensor, active: torch.Tensor, chunk_size: int) -> None:
        """One token per sample: every sample's token is the grid's only slot (its chunk position
        differs per sample, but a one-token segment needs no alignment); a padding token reads
        its sample's current chunk-start state in place."""
        all_active = bool(active.all())
        self.uniform, self.lo, self.length = True, 0, 1
        self.active = None if all_active else active[:, None]
        self.segments = [(0, 1)]
        completes = (offset + 1) % chunk_size == 0
        if not all_active:
            completes = completes & active
        any_complete = bool(completes.any())
        self.completes = [(bool(completes.all()) or completes) if any_complete else False]
        self.pads = [None]
        self.pad_slots = [None]

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [B, L, ...] grid layout (fillers are zero)."""
        if self.uniform:
            return x
        index = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand_as(x)
        grid = x.new_zeros(x.shape[0], self.length + 1, *x.shape[2:])
        return grid.scatter(1, index, x)[:, : self.length]

    def gather(self, y: torch.Tensor, pad_values: Optional[List[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """[B, L, ...] grid layout -> [B, T, ...]. `pad_values[i]` ([P_i, ...]) are the outputs of
        the padding tokens `pads[i]`; padding positions without a value get zero."""
        if self.uniform:
            return y
        y = torch.cat([y, y.new_zeros(y.shape[0], 1, *y.shape[2:])], dim=1)
        index = self.index.view(*self.index.shape, *([1] * (y.dim() - 2))).expand(-1, -1, *y.shape[2:])
        out = y.gather(1, index)
        for pads, values in zip(self.pads, pad_values or []):
            if pads is not None:
                out = out.index_put(pads, values.to(out.dtype))
        return out

    def split(self, x: torch.Tensor, dim: int = 1) -> Tuple[torch.Tensor, ...]:
        """Grid-layout x cut into its segments along `dim` (one autograd node for all pieces; slicing
        per segment would give each piece a backward that writes a full-length gradient)."""
        return x.split([stop - start for start, stop in self.segments], dim=dim)

    def segment_active(self, seg: Tuple[int, int]) -> Optional[torch.Tensor]:
        """[B, len] bool of real tokens in a segment, or None when all are real."""
        return None if self.active is None else self.active[:, seg[0] : seg[1]]


def select_where(condition: Condition, new: Dict[str, torch.Tensor], old: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per-sample choice `new` / `old` (dicts of batch-first tensors) for a [B] bool condition, or a
    Python bool for all samples."""
    if condition is True:
        return dict(new)
    if condition is False:
        return dict(old)
    return {
        name: torch.where(condition.view(-1, *([1] * (new[name].dim() - 1))), new[name], old[name]) for name in new
    }


def masked_rates(eta: torch.Tensor, alpha: torch.Tensor, active: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fillers and padding become no-ops: eta = 0 and alpha = 1. eta, alpha: [B, ..., C]; active: [B, C].

    A retention alpha = sigmoid(logit) that underflows to exactly 0 (logit below about -104 in float32, which
    trained rate readouts reach) gets log alpha = LOG_ALPHA_MIN. The log is taken of a safe stand-in there,
    not clamped afterwards: log(0) = -inf clamps to a finite value, but its backward is 0 / 0 = NaN, which
    made whole training steps' gradients NaN (issue 12, MQAR 16 at step 800)."""
    positive = alpha > 0
    log_alpha = torch.where(positive, torch.where(positive, alpha, 1.0).log(), LOG_ALPHA_MIN)
    if active is None:
        return eta, log_alpha
    keep = active.view(active.shape[0], *([1] * (eta.dim() - 2)), active.shape[1])
    return eta * keep, log_alpha * keep


def scan_chunks(step: Callable[[MemoryState, object], Tuple[MemoryState, object]], carry: MemoryState, pieces: List,
                remat: bool, compiled: bool = False) -> Tuple[MemoryState, List]:
    """`carry, out = step(carry, piece)` over the chunks, collecting the outputs.

    With `remat` (training on many chunks) the chunks run in blocks of ~sqrt(#chunks), each under
    `torch.utils.checkpoint`: the backward recomputes a block from the state at its start, so
    autograd keeps ~2 sqrt(#chunks) memory states instead of one (plus activations) per chunk.

    With `compiled` (`HopeConfig.compile_chunks`) `step` runs through `torch.compile`: a chunk's
    few hundred small ops, forward and backward, fuse into a few kernels. Dynamo caches the graph
    on `step`'s code, so a fresh closure per call reuses it while its guards (shapes, grad mode,
    the closure's flags, whether start and current are one tensor) hold."""
    if compiled:
        step = torch.compile(step)
    if not remat:
        outputs = []
        for piece in pieces:
            carry, out = step(carry, piece)
            outputs.append(out)
        return carry, outputs
    names = list(carry.flatten())
    block = math.ceil(math.sqrt(len(pieces)))
    outputs = []
    for first in range(0, len(pieces), block):
        def run(*tensors, block_pieces=pieces[first : first + block]):
            state, outs = MemoryState.unflatten(dict(zip(names, tensors))), []
            for piece in block_pieces:
                state, out = step(state, piece)
                outs.append(out)
            flat = state.flatten()
            return tuple(flat[name] for name in names), outs

        flat = carry.flatten()
        tensors, outs = checkpoint(run, *(flat[name] for name in names), use_reentrant=False)
        carry = MemoryState.unflatten(dict(zip(names, tensors)))
        outputs.extend(outs)
    return carry, outputs
