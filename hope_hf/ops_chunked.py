"""The chunk-parallel fast path of SPEC section 3-4: same inputs, outputs and end states as the
per-token scans of `ops_reference.py`, computed a chunk at a time.

Why it is possible (SPEC section 3): inside a chunk every read, key, value, learning rate and
inner gradient uses the chunk-start state `S`, so all of them are computed for the whole chunk
at once from `S`, and the only sequential object is the current state `W`, whose DGD update

    W_t = W_{t-1} (alpha_t I - eta_t u~_t u~_t^T) - eta_t / max(1, ||u_t||^2) * e_t u_t^T

(`memory_hope.dgd_step`; `e_t` the gradient's output factor, `u_t` the layer input) is a linear
recurrence with rank-1 transitions. `dgd_chunk` gives its end-of-chunk state in closed form
(the WY / UT form of the gated delta rule) with one triangular solve. With `memory_read="token"`
the main memory is read at the state before each token's update (`o_t = M_{t-1}(q_t)`, paper
Eq. 88); the same solve gives those reads as masked matmuls (`ChunkSolve.reads`), layer by layer
for a deep memory (`W2_{t-1} q_t`, then `W1_{t-1} act(.)`). A CMS level is simpler:
its fast weights change only at chunk ends, by the chunk's summed gradient (one matmul).

Chunks are counted per sample from its first real token, and padding (mask False) does not
advance a sample, so different samples can be at different places of their chunks. `ChunkGrid`
puts every sample's real tokens at its stream position modulo the chunk layout, so chunk
boundaries line up across the batch; fillers are tokens with `eta = 0`, `alpha = 1` (no-ops).
A padding token reads the state the next real token reads, exactly as in the reference (with
left padding, the logits at the last pad predict the first real token and enter the loss).

(A flat sibling of `modeling_hope.py`, like `ops_reference.py`: `register_for_auto_class` copies
relative imports flat into a checkpoint.)
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from .memory_hope import MemoryState, activation, activation_derivative, l2norm, step_bound
from .ops_fla import fla_dgd_chunk, use_fla
from .ops_reference import MemoryRule

MemoryStates = Dict[str, MemoryState]

# Log-retention floor: alpha = 0 (a full reset) stays finite in the log domain (exp(-1e4) == 0).
_LOG_ALPHA_MIN = -1.0e4


def in_state_precision(scan):
    """Run a scan with autocast off: its matmuls are per-chunk and small (bf16 does not pay there)
    and the fast weights accumulate thousands of small updates, so they run in the state's dtype
    (float32 or float64). Under autocast, a model's projections, static levels and LM head still
    run in bf16."""

    @functools.wraps(scan)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            return scan(first, *args, **kwargs)

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


def select_where(condition, new: Dict[str, torch.Tensor], old: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per-sample choice `new` / `old` for a [B] bool condition, or a Python bool for all samples."""
    if condition is True:
        return dict(new)
    if condition is False:
        return dict(old)
    return {
        name: torch.where(condition.view(-1, *([1] * (new[name].dim() - 1))), new[name], old[name]) for name in new
    }


# --- memories, a chunk at a time ------------------------------------------------------------------
def memory_read_chunk(state: MemoryState, z: torch.Tensor, act: str) -> torch.Tensor:
    """`M[state](z)` for a chunk of vectors. state weights [..., O, I]; z: [..., C, D] -> [..., C, D]."""
    if "W" in state:
        return z @ state["W"].transpose(-1, -2)
    hidden = activation(act, z @ state["W2"].transpose(-1, -2))
    return z + hidden @ state["W1"].transpose(-1, -2)


def dgd_terms(
    state: MemoryState, key: torch.Tensor, target: torch.Tensor, act: str, eps: float,
    target_key: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The DGD update of every weight of a memory, written as `W (alpha I - eta u~ u~^T) + eta r u~^T`.

    The inner gradient of `1/2 ||M[S](k) - target||^2` w.r.t. a weight is a rank-1 `e u^T` (output
    factor `e`, layer input `u`), so the gradient term `-eta / (max(1, ||u||^2) b) e u^T` of
    `memory_hope.dgd_step` is `eta r u~^T` with `r = -||u|| / (max(1, ||u||^2) b) e`, `b` the
    stop-gradient `memory_hope.step_bound` factor (needs `eta`; the self-generated target's key
    `target_key`, None for a plain target; no eta: b = 1).

    state: chunk-start weights [..., O, I]; key, target, target_key: [..., C, D]; eta: [..., C].
    Returns name -> (unit inputs u~ [..., C, I], writes per unit learning rate r [..., C, O]).
    """
    if "W" in state:
        error = key @ state["W"].transpose(-1, -2) - target
        factors = {"W": (error, key)}
    else:
        pre = key @ state["W2"].transpose(-1, -2)  # [..., C, M]
        hidden = activation(act, pre)
        error = key + hidden @ state["W1"].transpose(-1, -2) - target  # [..., C, D]
        grad_pre = (error @ state["W1"]) * activation_derivative(act, pre)  # [..., C, M]
        factors = {"W1": (error, hidden), "W2": (grad_pre, key)}
    bound = None if eta is None else step_bound(state, key, target_key, eta, act)
    terms = {}
    for name, (out_factor, inputs) in factors.items():
        squared = (inputs * inputs).sum(-1)  # [..., C]
        scale = torch.rsqrt(squared + eps)
        # ||u|| written as (||u||^2 + eps) * rsqrt(||u||^2 + eps), so that u = u~ * that, exactly as
        # l2norm defines u~.
        normaliser = squared.clamp(min=1.0) if bound is None else squared.clamp(min=1.0) * bound[name]
        write_scale = -(squared + eps) * scale / normaliser
        terms[name] = (inputs * scale.unsqueeze(-1), out_factor * write_scale.unsqueeze(-1))
    return terms


class ChunkSolve:
    """The UT form of `W_t = W_{t-1} (alpha_t I - eta_t u~_t u~_t^T) + w_t u~_t^T` over a chunk, with
    the writes `w_t = eta_t r_t`.

    With gamma_t = prod_{s<=t} alpha_s, the state is `W_t = gamma_t W_0 + sum_{s<=t} gamma_t /
    gamma_s x_s u~_s^T` where the pseudo-writes x solve the unit lower-triangular system

        x_t + eta_t sum_{s<t} (gamma_{t-1} / gamma_s) (u~_s . u~_t) x_s = w_t - eta_t gamma_{t-1} W_0 u~_t,

    (the UT transform of DeltaNet, with decay). All decay ratios are <= 1 (no overflow). `end()` is
    W_C; `reads(z)` the per-token reads `W_{t-1} z_t` (what the state is before token t's update),

        W_{t-1} z_t = gamma_{t-1} W_0 z_t + sum_{s<t} (gamma_{t-1} / gamma_s) (u~_s . z_t) x_s,

    an attention-like masked matmul with the same decay matrix.

    weight: W_0 [..., O, I]; unit: [..., C, I]; write_per_eta: r [..., C, O]; eta, log_alpha: [..., C].
    """

    def __init__(self, weight, unit, write_per_eta, eta, log_alpha) -> None:
        dtype = weight.dtype
        unit, eta, log_alpha = unit.to(dtype), eta.to(dtype), log_alpha.to(dtype)
        self.weight, self.unit = weight, unit
        write = eta.unsqueeze(-1) * write_per_eta.to(dtype)
        length = unit.shape[-2]
        self.log_gamma = log_alpha.cumsum(-1)  # [..., C]
        self.log_gamma_prev = self.log_gamma - log_alpha
        if length == 1:  # one token: the step itself
            self.decay = None
            self.pseudo = write - eta[..., None] * (unit @ weight.transpose(-1, -2))
            return
        strictly_lower = torch.ones(length, length, dtype=torch.bool, device=unit.device).tril(-1)
        self.decay = (self.log_gamma_prev[..., :, None] - self.log_gamma[..., None, :]).masked_fill(
            ~strictly_lower, -math.inf).exp()
        system = eta[..., :, None] * self.decay * (unit @ unit.transpose(-1, -2))  # [..., C, C], strictly lower
        rhs = write - (eta * self.log_gamma_prev.exp())[..., None] * (unit @ weight.transpose(-1, -2))  # [..., C, O]
        self.pseudo = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)

    def end(self) -> torch.Tensor:
        """W_C [..., O, I]."""
        tail = (self.log_gamma[..., -1:] - self.log_gamma).exp()  # gamma_C / gamma_s, [..., C]
        return self.log_gamma[..., -1, None, None].exp() * self.weight + (self.pseudo * tail[..., None]).transpose(-1, -2) @ self.unit

    def reads(self, z: torch.Tensor) -> torch.Tensor:
        """`W_{t-1} z_t` for z [..., C, I] -> [..., C, O]."""
        z = z.to(self.weight.dtype)
        initial = z @ self.weight.transpose(-1, -2)  # W_0 z_t, [..., C, O]
        if self.decay is None:
            return initial
        return self.log_gamma_prev.exp()[..., None] * initial + (self.decay * (z @ self.unit.transpose(-1, -2))) @ self.pseudo

    def reads_at(self, z: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`W_{s-1} z` for single vectors z [..., I] at chunk slots s [...] (long) -> [..., O]."""
        z = z.to(self.weight.dtype)
        initial = (self.weight @ z.unsqueeze(-1)).squeeze(-1)
        if self.decay is None:
            return initial
        index = slots.unsqueeze(-1)
        decay = self.decay.gather(-2, index.unsqueeze(-1).expand(*slots.shape, 1, self.decay.shape[-1])).squeeze(-2)  # [..., C]
        gamma = self.log_gamma_prev.gather(-1, index).exp()  # [..., 1]
        mixed = ((decay * (self.unit @ z.unsqueeze(-1)).squeeze(-1)).unsqueeze(-2) @ self.pseudo).squeeze(-2)
        return gamma * initial + mixed


def dgd_chunk(
    weight: torch.Tensor, unit: torch.Tensor, write_per_eta: torch.Tensor, eta: torch.Tensor, log_alpha: torch.Tensor
) -> torch.Tensor:
    """End state of `W_t = W_{t-1} (alpha_t I - eta_t u~_t u~_t^T) + w_t u~_t^T` over a chunk, with
    the writes `w_t = eta_t r_t` (`ChunkSolve`, one triangular solve).

    weight: W_0 [..., O, I]; unit: [..., C, I]; write_per_eta: r [..., C, O]; eta, log_alpha: [..., C].
    Returns W_C [..., O, I].
    """
    return ChunkSolve(weight, unit, write_per_eta, eta, log_alpha).end()


def _masked(eta: torch.Tensor, alpha: torch.Tensor, active: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fillers and padding become no-ops: eta = 0 and alpha = 1. eta, alpha: [B, ..., C]; active: [B, C]."""
    log_alpha = alpha.log().clamp(min=_LOG_ALPHA_MIN)
    if active is None:
        return eta, log_alpha
    keep = active.view(active.shape[0], *([1] * (eta.dim() - 2)), active.shape[1])
    return eta * keep, log_alpha * keep


def _memory_chunk_update(
    start: MemoryState,
    current: MemoryState,
    key: torch.Tensor,
    target: torch.Tensor,
    eta: torch.Tensor,
    log_alpha: torch.Tensor,
    rule: MemoryRule,
    target_key: Optional[torch.Tensor] = None,
    token_reads: bool = False,
):
    """One chunk of DGD on one (possibly stacked) memory; the gradients are taken at `start`.
    A linear memory on CUDA runs through fla's gated-delta-rule kernel (`ops_fla`) unless the
    per-token reads are wanted. `target_key`: the key of a self-generated target (`step_bound`).

    Returns the end state, or with `token_reads` a `(end state, solves)` pair: each weight's
    `ChunkSolve`, whose `reads` give the per-token states' reads (`_token_reads`)."""
    terms = dgd_terms(start, key, target, rule.activation, rule.eps, target_key, eta)
    if "W" in current and not token_reads and use_fla(current["W"]):
        return {"W": fla_dgd_chunk(current["W"], *terms["W"], eta, log_alpha)}
    if "W1" in current and current["W1"].shape == current["W2"].shape and key.shape[-2] > 1:  # both layers in one solve
        both = ChunkSolve(
            torch.cat([current["W1"], current["W2"]]), torch.cat([terms["W1"][0], terms["W2"][0]]),
            torch.cat([terms["W1"][1], terms["W2"][1]]), torch.cat([eta, eta]), torch.cat([log_alpha, log_alpha]),
        )
        end = dict(zip(("W1", "W2"), both.end().chunk(2)))
        if not token_reads:
            return end
        return end, {name: _SolvePart(both, i, 2) for i, name in enumerate(("W1", "W2"))}
    solves = {name: ChunkSolve(current[name], unit, write, eta, log_alpha) for name, (unit, write) in terms.items()}
    end = {name: solve.end() for name, solve in solves.items()}
    return (end, solves) if token_reads else end


class _SolvePart:
    """One of `parts` problems stacked on dim 0 of a `ChunkSolve`, read on its own."""

    def __init__(self, solve: ChunkSolve, index: int, parts: int) -> None:
        self.solve, self.index, self.parts = solve, index, parts

    def _piece(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(self.parts)[self.index]

    def reads(self, z: torch.Tensor) -> torch.Tensor:
        return self._as_solve().reads(z)

    def reads_at(self, z: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self._as_solve().reads_at(z, slots)

    def _as_solve(self) -> ChunkSolve:
        view = ChunkSolve.__new__(ChunkSolve)
        for name in ("weight", "unit", "log_gamma", "log_gamma_prev", "pseudo"):
            setattr(view, name, self._piece(getattr(self.solve, name)))
        view.decay = None if self.solve.decay is None else self._piece(self.solve.decay)
        return view


def _token_reads(solves, z: torch.Tensor, act: str, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`M_{t-1}(z_t)`: the memory read at the state before each token's update (paper Eq. 88), from the
    chunk's solves. A deep memory reads its W2 layer, then its W1 layer, each at the per-token state:
    `z + W1_{t-1} act(W2_{t-1} z)`. z: [..., C, D]; with `slots` [...], single vectors z [..., D] read
    at those chunk slots."""
    read = (lambda solve, x: solve.reads(x)) if slots is None else (lambda solve, x: solve.reads_at(x, slots))
    if "W" in solves:
        return read(solves["W"], z)
    return z + read(solves["W1"], activation(act, read(solves["W2"], z)))


def scan_chunks(step, carry: MemoryState, pieces: List, remat: bool) -> Tuple[MemoryState, List]:
    """`carry, out = step(carry, piece)` over the chunks, collecting the outputs.

    With `remat` (training on many chunks) the chunks run in blocks of ~sqrt(#chunks), each under
    `torch.utils.checkpoint`: the backward recomputes a block from the states at its start, so
    autograd keeps ~2 sqrt(#chunks) memory states instead of one (plus activations) per chunk."""
    if not remat:
        outputs = []
        for piece in pieces:
            carry, out = step(carry, piece)
            outputs.append(out)
        return carry, outputs
    names = list(carry)
    block = math.ceil(math.sqrt(len(pieces)))
    outputs = []
    for first in range(0, len(pieces), block):
        def run(*tensors, block_pieces=pieces[first : first + block]):
            state, outs = dict(zip(names, tensors)), []
            for piece in block_pieces:
                state, out = step(state, piece)
                outs.append(out)
            return tuple(state[name] for name in names), outs

        tensors, outs = checkpoint(run, *(carry[name] for name in names), use_reentrant=False)
        carry = dict(zip(names, tensors))
        outputs.extend(outs)
    return carry, outputs


def _remat(rule: MemoryRule, pieces: List, *tensors: torch.Tensor) -> bool:
    """Recompute in the backward when training over more than `rule.recompute_above` chunks."""
    if rule.recompute_above is None or len(pieces) <= rule.recompute_above:
        return False
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _split_state(state: Dict[str, torch.Tensor], prefix: str) -> MemoryState:
    return {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}


def _state_dtype(state: MemoryState) -> torch.dtype:
    return next(iter(state.values())).dtype


def _flat(x: torch.Tensor, leading: int) -> torch.Tensor:
    """Merge the first `leading` dims: per-(sample, memory, head) problems become one batch of
    3-D matmuls (a broadcasting matmul costs several ops of reshaping per call)."""
    return x.reshape(-1, *x.shape[leading:])


def _per_problem(condition, repeats: int):
    """A per-sample [B] condition for the flattened [B * repeats] problems (Python bools pass)."""
    return condition if isinstance(condition, bool) else condition.repeat_interleave(repeats)


def _run_main_memory(
    q: torch.Tensor,
    pad_queries: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    start: MemoryState,
    current: MemoryState,
    grid: ChunkGrid,
    rule: MemoryRule,
    self_generated: bool,
) -> Tuple[torch.Tensor, MemoryState, MemoryState]:
    """The main memory `M_mem` over its chunk grid.

    q, key, value: [B, L, H, D] (grid layout); pad_queries: [B, T, H, D] (token layout, read at
    padding positions); eta, alpha: [B, L, H]. The DGD target is `value` (titans) or the
    self-generated `M_mem[S](value)` (self-modifying, `value` = unit value). Returns the reads
    `o = M_mem[S](q)` [B, L, H, D], the reads at padding tokens per segment and the end
    (start, current) states."""
    dtype = _state_dtype(current)
    batch, heads = q.shape[0], q.shape[2]
    shape = {w: t.shape[1:] for w, t in current.items()}  # [H, O, I]
    q, key, value = (_flat(x.transpose(1, 2).to(dtype), 2) for x in (q, key, value))  # [B*H, L, D]
    eta, alpha = (_flat(x.transpose(1, 2).to(dtype), 2) for x in (eta, alpha))  # [B*H, L]
    start = {w: _flat(t.expand(batch, *shape[w]), 2) for w, t in start.items()}  # [B*H, O, I]
    current = {w: _flat(t.expand(batch, *shape[w]), 2) for w, t in current.items()}
    token_reads = rule.memory_read == "token" and rule.updates

    def step(carry: MemoryState, piece):
        start, current = _split_state(carry, "start."), _split_state(carry, "current.")
        seg, completes, pads, pad_slots, (q_c, key_c, value_c, eta_c, alpha_c) = piece
        pad_read = None
        if not token_reads:  # reads at the chunk-start state (paper Eq. 90)
            out = memory_read_chunk(start, q_c, rule.activation)
            if pads is not None:
                per_sample = {w: t.view(batch, *shape[w]) for w, t in start.items()}
                pad_read = _read_at(per_sample, pad_queries[pads], pads[0], rule)
        if rule.updates:
            target = memory_read_chunk(start, value_c, rule.activation) if self_generated else value_c
            active = grid.segment_active(seg)
            eta_c, log_alpha_c = _masked(eta_c, alpha_c, None if active is None else active.repeat_interleave(heads, 0))
            updated = _memory_chunk_update(start, current, key_c, target, eta_c, log_alpha_c, rule,
                                           value_c if self_generated else None, token_reads)
            if token_reads:  # reads at the state before each token's update (paper Eq. 88)
                updated, solves = updated
                out = _token_reads(solves, q_c, rule.activation)
                if pads is not None:
                    pad_read = _pad_token_reads(solves, pad_queries[pads].to(dtype), pads[0], pad_slots, heads, rule)
            current = updated
            start = select_where(_per_problem(completes, heads), current, start)
        carry = {**{f"start.{w}": t for w, t in start.items()}, **{f"current.{w}": t for w, t in current.items()}}
        return carry, (out, pad_read)

    pieces = list(zip(grid.segments, grid.completes, grid.pads, grid.pad_slots,
                      zip(*(grid.split(x) for x in (q, key, value, eta, alpha)))))
    carry = {**{f"start.{w}": t for w, t in start.items()}, **{f"current.{w}": t for w, t in current.items()}}
    carry, results = scan_chunks(step, carry, pieces, _remat(rule, pieces, q, key, value, *current.values()))
    start, current = _split_state(carry, "start."), _split_state(carry, "current.")
    outputs, pad_reads = [r[0] for r in results], [r[1] for r in results]
    o = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    o = o.reshape(batch, heads, -1, q.shape[-1]).transpose(1, 2)  # [B, L, H, D]
    unflat = lambda state: {w: t.view(batch, *shape[w]) for w, t in state.items()}  # noqa: E731
    return o, pad_reads, unflat(start), unflat(current)


def _pad_token_reads(solves, z: torch.Tensor, samples: torch.Tensor, slots: torch.Tensor, heads: int,
                     rule: MemoryRule) -> torch.Tensor:
    """Per-token reads of padding tokens: z [P, H, D] of samples [P] at segment slots [P] (a pad reads
    the state its sample's next real token reads) -> [P, H, D]. The solves are flattened per
    (sample, head): problem `sample * H + h`."""
    problems = samples[:, None] * heads + torch.arange(heads, device=samples.device)  # [P, H]

    def pick(solve):
        view = ChunkSolve.__new__(ChunkSolve)
        base = solve._as_solve() if isinstance(solve, _SolvePart) else solve
        for name in ("weight", "unit", "log_gamma", "log_gamma_prev", "pseudo"):
            setattr(view, name, getattr(base, name)[problems])
        view.decay = None if base.decay is None else base.decay[problems]
        return view

    return _token_reads({w: pick(solve) for w, solve in solves.items()}, z, rule.activation,
                        slots[:, None].expand(-1, heads))


def _read_at(state: MemoryState, z: torch.Tensor, samples: torch.Tensor, rule: MemoryRule) -> torch.Tensor:
    """Reads of single vectors z [P, H, D] at the states of the given samples [P] -> [P, H, D]."""
    chosen = {name: weight[samples] for name, weight in state.items()}
    return memory_read_chunk(chosen, z.to(_state_dtype(state)).unsqueeze(-2), rule.activation).squeeze(-2)


@in_state_precision
def titans_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    start: MemoryStates,
    current: MemoryStates,
    seen: torch.Tensor,
    mask: torch.Tensor,
    memory_chunk_size: int,
    rule: MemoryRule,
) -> Tuple[torch.Tensor, MemoryStates, MemoryStates]:
    """Chunk-parallel `ops_reference.titans_scan` (same arguments and results)."""
    grid = ChunkGrid(seen, mask, memory_chunk_size)
    to_grid = grid.scatter
    o, pad_reads, mem_start, mem_current = _run_main_memory(
        to_grid(q), q, to_grid(k), to_grid(v), to_grid(eta), to_grid(alpha), start["mem"], current["mem"], grid,
        rule, self_generated=False,
    )
    return grid.gather(o, pad_reads).to(q.dtype), {"mem": mem_start}, {"mem": mem_current}


PROJECTION_MEMORIES = ("k", "v", "eta", "alpha")


def _stack(states: MemoryStates, names) -> MemoryState:
    """Memories with the same chunk size, stacked on dim 1: weight [B, X, H, O, I]. States that
    `_unstack` made (views of one stacked tensor, as kept in a cache between calls) are not copied."""
    stacked = {}
    for w in states[names[0]]:
        parts = [states[name][w] for name in names]
        base = parts[0]._base
        if (base is not None and base.dim() == parts[0].dim() + 1 and base.shape[1] == len(parts)
                and all(p._base is base and p.shape == base.shape[:1] + base.shape[2:]
                        and p.stride() == base.stride()[:1] + base.stride()[2:]
                        and p.storage_offset() == base.storage_offset() + i * base.stride(1)
                        for i, p in enumerate(parts))):
            stacked[w] = base
        else:
            stacked[w] = torch.stack(parts, dim=1)
    return stacked


def _unstack(stacked: MemoryState, names) -> MemoryStates:
    return {name: {w: t[:, i] for w, t in stacked.items()} for i, name in enumerate(names)}


@in_state_precision
def self_modifying_chunked(
    a: torch.Tensor,
    q: torch.Tensor,
    start: MemoryStates,
    current: MemoryStates,
    seen: torch.Tensor,
    mask: torch.Tensor,
    eta_readout: torch.Tensor,
    eta_bias: torch.Tensor,
    alpha_readout: torch.Tensor,
    alpha_bias: torch.Tensor,
    eta_max: float,
    chunk_size: int,
    memory_chunk_size: int,
    rule: MemoryRule,
) -> Tuple[torch.Tensor, MemoryStates, MemoryStates]:
    """Chunk-parallel `ops_reference.self_modifying_scan` (same arguments and results).

    Two passes: the projection memories `M_k, M_v, M_eta, M_alpha` (chunk `C`, stacked and
    updated together since they share keys, eta and alpha) produce k, v, eta, alpha for every
    token; then the main memory (chunk `C_mem`) reads and learns from them."""
    grid = ChunkGrid(seen, mask, chunk_size)
    names = PROJECTION_MEMORIES
    dtype = _state_dtype(current["k"])
    batch, heads, copies = a.shape[0], a.shape[2], len(names)
    proj_start, proj_current = _stack(start, names), _stack(current, names)  # [B, 4, H, O, I]
    shape = {w: t.shape[1:] for w, t in proj_current.items()}
    flat = lambda state: {w: _flat(t.expand(batch, *shape[w]), 3) for w, t in state.items()}  # noqa: E731
    proj_start, proj_current = flat(proj_start), flat(proj_current)  # [B*4*H, O, I]

    def per_memory(x: torch.Tensor) -> torch.Tensor:  # [B, H, ...] -> [B*4*H, ...], one copy per memory
        return _flat(x.unsqueeze(1).expand(batch, copies, *x.shape[1:]), 3)

    a_grid = grid.scatter(a).transpose(1, 2).to(dtype)  # [B, H, L, D]
    def step(carry: MemoryState, piece):
        proj_start, proj_current = _split_state(carry, "start."), _split_state(carry, "current.")
        seg, completes, a_c = piece
        # Every read and self-generated value uses the chunk-start states (paper Eq. 90).
        reads = memory_read_chunk(proj_start, per_memory(a_c), rule.activation)
        reads = reads.view(batch, copies, heads, *reads.shape[1:])  # [B, 4, H, C, D]
        k_c = l2norm(reads[:, 0], rule.eps)  # [B, H, C, D]
        v_unit = l2norm(reads[:, 1], rule.eps)  # see the [choice] in ops_reference.self_modifying_scan
        eta_c = eta_max * torch.sigmoid((reads[:, 2] * eta_readout[:, None]).sum(-1) + eta_bias[:, None])  # [B, H, C]
        alpha_c = torch.sigmoid((reads[:, 3] * alpha_readout[:, None]).sum(-1) + alpha_bias[:, None])
        if rule.updates:
            targets = memory_read_chunk(proj_start, per_memory(v_unit), rule.activation)  # [B*4*H, C, D]
            eta_m, log_alpha_m = _masked(eta_c, alpha_c, grid.segment_active(seg))
            proj_current = _memory_chunk_update(
                proj_start, proj_current, per_memory(k_c), targets, per_memory(eta_m), per_memory(log_alpha_m), rule,
                per_memory(v_unit),
            )
            proj_start = select_where(_per_problem(completes, copies * heads), proj_current, proj_start)
        carry = {**{f"start.{w}": t for w, t in proj_start.items()}, **{f"current.{w}": t for w, t in proj_current.items()}}
        return carry, (k_c, v_unit, eta_c, alpha_c)

    pieces = list(zip(grid.segments, grid.completes, grid.split(a_grid, dim=2)))
    carry = {**{f"start.{w}": t for w, t in proj_start.items()}, **{f"current.{w}": t for w, t in proj_current.items()}}
    carry, results = scan_chunks(step, carry, pieces, _remat(rule, pieces, a_grid, eta_readout, *proj_current.values()))
    proj_start, proj_current = _split_state(carry, "start."), _split_state(carry, "current.")
    keys, unit_values, etas, alphas = (list(column) for column in zip(*results))
    unflat = lambda state: {w: t.view(batch, *shape[w]) for w, t in state.items()}  # noqa: E731
    proj_start, proj_current = unflat(proj_start), unflat(proj_current)

    def to_tokens(pieces: List[torch.Tensor]) -> torch.Tensor:  # [B, H, L, ...] pieces -> [B, T, H, ...]
        return grid.gather((torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]).transpose(1, 2))

    k, v_unit, eta, alpha = to_tokens(keys), to_tokens(unit_values), to_tokens(etas), to_tokens(alphas)
    mem_grid = ChunkGrid(seen, mask, memory_chunk_size)
    to_grid = mem_grid.scatter
    o, pad_reads, mem_start, mem_current = _run_main_memory(
        to_grid(q), q, to_grid(k), to_grid(v_unit), to_grid(eta), to_grid(alpha), start["mem"], current["mem"],
        mem_grid, rule, self_generated=True,
    )
    end_start, end_current = _unstack(proj_start, names), _unstack(proj_current, names)
    end_start["mem"], end_current["mem"] = mem_start, mem_current
    return mem_grid.gather(o, pad_reads).to(q.dtype), end_start, end_current
