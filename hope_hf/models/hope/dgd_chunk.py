"""The chunk-parallel memories (docs/design.md §4): the same outputs and end states as the per-token
scans of `dgd_naive`, computed a chunk at a time.

Inside a chunk every read, key, value, learning rate and inner gradient uses the chunk-start state
`S`, so all of them are computed for the whole chunk at once from `S`; the only sequential object is
the current state `W`, whose DGD update (`dgd_naive.dgd_step`)

    W_t = W_{t-1} (alpha_t I - eta_t u~_t u~_t^T) + eta_t r_t u~_t^T

is a linear recurrence with rank-1 transitions. `ChunkSolve` gives its end-of-chunk state in closed
form (the UT form of the gated delta rule, one triangular solve) and, with `memory_read="token"`,
the per-token reads `M_{t-1}(q_t)` (paper Eq. 88) as masked matmuls, layer by layer for a deep
memory. `ChunkGrid` (`chunk_grid`) lines up every sample's chunks across the batch: fillers are
no-op tokens (`eta = 0`, `alpha = 1`), and a padding token reads the state the next real token reads.

Entry points (keyword-only, like the naive twins): `self_modifying_titans_chunk`, `titans_chunk`.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .cache_hope import MemoryState
from .chunk_grid import ChunkGrid, in_state_precision, masked_rates, scan_chunks, select_where
from .dgd_fla import fla_dgd_chunk, use_fla
from .dgd_naive import dgd_step
from .primitives import (MemoryRule, Weights, activation, deep_output_dgd_terms, dgd_terms, flush_subnormals, l2norm,
                         linear_dgd_terms, memory_read, output_layer_current, readout_rates)

PROJECTION_MEMORIES = ("k", "v", "eta", "alpha")


class ChunkSolve:
    """The UT form of `W_t = W_{t-1} (alpha_t I + eta_t a_t u~_t^T) + w_t u~_t^T` over a chunk, with
    the writes `w_t = eta_t r_t` and the erase direction `a_t = -u~_t` (the DGD step) unless
    `erase_per_eta` gives it (a linear memory's gradient at the current state, `linear_dgd_terms`).

    With gamma_t = prod_{s<=t} alpha_s, the state is `W_t = gamma_t W_0 + sum_{s<=t} gamma_t /
    gamma_s x_s u~_s^T` where the pseudo-writes x solve the unit lower-triangular system

        x_t - eta_t sum_{s<t} (gamma_{t-1} / gamma_s) (u~_s . a_t) x_s = w_t + eta_t gamma_{t-1} W_0 a_t,

    (the UT transform of DeltaNet, with decay). All decay ratios are <= 1 (no overflow). `end()` is
    W_C; `reads(z)` the per-token reads `W_{t-1} z_t` (what the state is before token t's update),

        W_{t-1} z_t = gamma_{t-1} W_0 z_t + sum_{s<t} (gamma_{t-1} / gamma_s) (u~_s . z_t) x_s,

    an attention-like masked matmul with the same decay matrix.

    weight: W_0 [..., O, I]; unit: [..., C, I]; write_per_eta: r [..., C, O]; eta, log_alpha: [..., C];
    erase_per_eta: a [..., C, I] (None: -unit).
    """

    def __init__(self, weight, unit, write_per_eta, eta, log_alpha, erase_per_eta=None) -> None:
        dtype = weight.dtype
        unit, eta, log_alpha = unit.to(dtype), eta.to(dtype), log_alpha.to(dtype)
        self.weight, self.unit = weight, unit
        write = eta.unsqueeze(-1) * write_per_eta.to(dtype)
        erase = -eta[..., None] * unit if erase_per_eta is None else eta[..., None] * erase_per_eta.to(dtype)  # eta_t a_t
        length = unit.shape[-2]
        self.log_gamma = log_alpha.cumsum(-1)  # [..., C]
        self.log_gamma_prev = self.log_gamma - log_alpha
        if length == 1:  # one token: the step itself
            self.decay = None
            self.pseudo = write + erase @ weight.transpose(-1, -2)
            return
        strictly_lower = torch.ones(length, length, dtype=torch.bool, device=unit.device).tril(-1)
        self.decay = (self.log_gamma_prev[..., :, None] - self.log_gamma[..., None, :]).masked_fill(
            ~strictly_lower, -math.inf).exp()
        system = -self.decay * (erase @ unit.transpose(-1, -2))  # [..., C, C], strictly lower
        rhs = write + self.log_gamma_prev.exp()[..., None] * (erase @ weight.transpose(-1, -2))  # [..., C, O]
        self.pseudo = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)

    def end(self) -> torch.Tensor:
        """W_C [..., O, I], subnormals flushed (`primitives.flush_subnormals`)."""
        tail = (self.log_gamma[..., -1:] - self.log_gamma).exp()  # gamma_C / gamma_s, [..., C]
        end = self.log_gamma[..., -1, None, None].exp() * self.weight + (self.pseudo * tail[..., None]).transpose(-1, -2) @ self.unit
        return flush_subnormals(end)

    def reads(self, z: torch.Tensor) -> torch.Tensor:
        """`W_{t-1} z_t` for z [..., C, I] -> [..., C, O]."""
        z = z.to(self.weight.dtype)
        initial = z @ self.weight.transpose(-1, -2)  # W_0 z_t, [..., C, O]
        if self.decay is None:
            return initial
        return self.log_gamma_prev.exp()[..., None] * initial + (self.decay * (z @ self.unit.transpose(-1, -2))) @ self.pseudo

    def map(self, fn) -> "ChunkSolve":
        """The same solve with `fn` applied to each of its tensors (e.g. a piece of its problems)."""
        view = ChunkSolve.__new__(ChunkSolve)
        for name in ("weight", "unit", "log_gamma", "log_gamma_prev", "pseudo"):
            setattr(view, name, fn(getattr(self, name)))
        view.decay = None if self.decay is None else fn(self.decay)
        return view

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


def _memory_chunk_update(
    start: Weights,
    current: Weights,
    key: torch.Tensor,
    target: torch.Tensor,
    eta: torch.Tensor,
    log_alpha: torch.Tensor,
    rule: MemoryRule,
    target_key: Optional[torch.Tensor] = None,
    token_reads: bool = False,
):
    """One chunk of DGD on one (possibly stacked) memory; the gradients are taken at `start`, or for a
    linear memory under `linear_gradient="token"` at each token's current state (`linear_dgd_terms`;
    `target` is then ignored for a self-generated target, which it re-reads at that state), and for a deep
    memory's W1 under `deep_output_gradient="token"` at the current W1 on the chunk-start hidden features
    (`deep_output_dgd_terms`). With the
    chunk-start gradient a linear memory on CUDA runs through fla's gated-delta-rule kernel (`dgd_fla`)
    unless the per-token reads are wanted. `target_key`: the key of a self-generated target.

    Returns the end state, or with `token_reads` a `(end state, solves)` pair: each weight's
    `ChunkSolve`, whose `reads` give the per-token states' reads (`_token_reads`)."""
    if rule.gradient_at_current(current):
        unit, erase, write = linear_dgd_terms(key, target if target_key is None else None, target_key, rule.eps,
                                              eta if rule.step_bound else None)
        solve = ChunkSolve(current["W"], unit, write, eta, log_alpha, erase_per_eta=erase)
        return ({"W": solve.end()}, {"W": solve}) if token_reads else {"W": solve.end()}
    bound_eta = eta if rule.step_bound else None
    terms = dgd_terms(start, key, target, rule.activation, rule.eps, target_key, bound_eta)
    if "W" in current and not token_reads and rule.use_fla and use_fla(current["W"]):
        return {"W": flush_subnormals(fla_dgd_chunk(current["W"], *terms["W"], eta, log_alpha, compute_dtype=rule.fla_dtype))}
    # name -> (u~, r, erase direction a; None: -u~, the chunk-start gradient's)
    terms = {name: (unit, write, None) for name, (unit, write) in terms.items()}
    if rule.output_layer_at_current(current):  # W1: a delta rule on the chunk-start hidden features
        unit, erase, write = deep_output_dgd_terms(start, key, target, target_key, rule.activation, rule.eps, bound_eta)
        terms["W1"] = (unit, write, erase)
    if "W1" in current and current["W1"].shape == current["W2"].shape and key.shape[-2] > 1:  # both layers in one solve
        (unit_1, write_1, erase_1), (unit_2, write_2, _) = terms["W1"], terms["W2"]  # W2: the DGD erase
        both = ChunkSolve(
            torch.cat([current["W1"], current["W2"]]), torch.cat([unit_1, unit_2]), torch.cat([write_1, write_2]),
            torch.cat([eta, eta]), torch.cat([log_alpha, log_alpha]),
            None if erase_1 is None else torch.cat([erase_1, -unit_2]),
        )
        end = dict(zip(("W1", "W2"), both.end().chunk(2)))
        if not token_reads:
            return end
        return end, {name: _SolvePart(both, i, 2) for i, name in enumerate(("W1", "W2"))}
    solves = {name: ChunkSolve(current[name], unit, write, eta, log_alpha, erase_per_eta=erase)
              for name, (unit, write, erase) in terms.items()}
    end = {name: solve.end() for name, solve in solves.items()}
    return (end, solves) if token_reads else end


class _FixedRead:
    """A weight that does not change inside the chunk, read like a `ChunkSolve` (every token reads it)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def reads(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.weight.dtype) @ self.weight.transpose(-1, -2)

    def reads_at(self, z: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return (self.weight @ z.to(self.weight.dtype).unsqueeze(-1)).squeeze(-1)

    def map(self, fn) -> "_FixedRead":
        return _FixedRead(fn(self.weight))


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
        return self.solve.map(self._piece)


def _token_reads(solves, z: torch.Tensor, act: str, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`M_{t-1}(z_t)`: the memory read at the state before each token's update (paper Eq. 88), from the
    chunk's solves. A deep memory reads its W2 layer, then its W1 layer, each at the per-token state:
    `z + W1_{t-1} act(W2_{t-1} z)`. z: [..., C, D]; with `slots` [...], single vectors z [..., D] read
    at those chunk slots."""
    read = (lambda solve, x: solve.reads(x)) if slots is None else (lambda solve, x: solve.reads_at(x, slots))
    if "W" in solves:
        return read(solves["W"], z)
    return z + read(solves["W1"], activation(act, read(solves["W2"], z)))


def _remat(rule: MemoryRule, pieces: List, *tensors: torch.Tensor) -> bool:
    """Recompute in the backward when training over more than `rule.recompute_above` chunks."""
    if rule.recompute_above is None or len(pieces) <= rule.recompute_above:
        return False
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _flat(x: torch.Tensor, leading: int) -> torch.Tensor:
    """Merge the first `leading` dims: per-(sample, memory, head) problems become one batch of
    3-D matmuls (a broadcasting matmul costs several ops of reshaping per call)."""
    return x.reshape(-1, *x.shape[leading:])


def _per_problem(condition, repeats: int):
    """A per-sample [B] condition for the flattened [B * repeats] problems (Python bools pass)."""
    return condition if isinstance(condition, bool) else condition.repeat_interleave(repeats)


def _dtype_of(weights: Weights) -> torch.dtype:
    return next(iter(weights.values())).dtype


def _run_main_memory(
    q: torch.Tensor,
    pad_queries: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    state: MemoryState,
    grid: ChunkGrid,
    rule: MemoryRule,
    self_generated: bool,
) -> Tuple[torch.Tensor, List, MemoryState]:
    """The main memory `M_mem` over its chunk grid.

    q, key, value: [B, L, H, D] (grid layout); pad_queries: [B, T, H, D] (token layout, read at
    padding positions); eta, alpha: [B, L, H]. The DGD target is `value` (titans) or the
    self-generated `M_mem[S](value)` (self-modifying, `value` = unit value). Returns the reads
    [B, L, H, D], the reads at padding tokens per segment, and the end state."""
    dtype = _dtype_of(state.current)
    batch, heads = q.shape[0], q.shape[2]
    shape = {w: t.shape[1:] for w, t in state.current.items()}  # [H, O, I]
    q, key, value = (_flat(x.transpose(1, 2).to(dtype), 2) for x in (q, key, value))  # [B*H, L, D]
    eta, alpha = (_flat(x.transpose(1, 2).to(dtype), 2) for x in (eta, alpha))  # [B*H, L]
    token_reads = rule.memory_read != "chunk" and rule.updates
    hidden_at_start = rule.memory_read == "token_output" and "W2" in state.current

    def step(carry: MemoryState, piece):
        start, current = carry.start, carry.current
        seg, completes, pads, pad_slots, (q_c, key_c, value_c, eta_c, alpha_c) = piece
        pad_read = None
        if not token_reads:  # reads at the chunk-start state (paper Eq. 90)
            out = memory_read(start, q_c, rule.activation)
            if pads is not None:
                per_sample = {w: t.view(batch, *shape[w]) for w, t in start.items()}
                pad_read = _read_at(per_sample, pad_queries[pads], pads[0], rule)
        if rule.updates:
            target = value_c
            if self_generated and not rule.gradient_at_current(start):  # else re-read at each token's state
                target = memory_read(start, value_c, rule.activation)
            active = grid.segment_active(seg)
            eta_c, log_alpha_c = masked_rates(eta_c, alpha_c, None if active is None else active.repeat_interleave(heads, 0))
            updated = _memory_chunk_update(start, current, key_c, target, eta_c, log_alpha_c, rule,
                                           value_c if self_generated else None, token_reads)
            if token_reads:  # reads at the state before each token's update (paper Eq. 88)
                updated, solves = updated
                if hidden_at_start:  # "token_output": the hidden layer read at the chunk start
                    solves = {"W1": solves["W1"], "W2": _FixedRead(start["W2"])}
                out = _token_reads(solves, q_c, rule.activation)
                if pads is not None:
                    pad_read = _pad_token_reads(solves, pad_queries[pads].to(dtype), pads[0], pad_slots, heads, rule)
            current = updated
            start = select_where(_per_problem(completes, heads), current, start)
        return MemoryState(start, current), (out, pad_read)

    pieces = list(zip(grid.segments, grid.completes, grid.pads, grid.pad_slots,
                      zip(*(grid.split(x) for x in (q, key, value, eta, alpha)))))
    carry = state.map(lambda w, t: _flat(t.expand(batch, *shape[w]), 2))  # [B*H, O, I]
    remat = _remat(rule, pieces, q, key, value, *carry.current.values())
    carry, results = scan_chunks(step, carry, pieces, remat, rule.compile_chunks)
    outputs, pad_reads = [r[0] for r in results], [r[1] for r in results]
    o = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    o = o.reshape(batch, heads, -1, q.shape[-1]).transpose(1, 2)  # [B, L, H, D]
    unflat = lambda weights: {w: t.view(batch, *shape[w]) for w, t in weights.items()}  # noqa: E731
    return o, pad_reads, MemoryState(unflat(carry.start), unflat(carry.current))


def _pad_token_reads(solves, z: torch.Tensor, samples: torch.Tensor, slots: torch.Tensor, heads: int,
                     rule: MemoryRule) -> torch.Tensor:
    """Per-token reads of padding tokens: z [P, H, D] of samples [P] at segment slots [P] (a pad reads
    the state its sample's next real token reads) -> [P, H, D]. The solves are flattened per
    (sample, head): problem `sample * H + h`."""
    problems = samples[:, None] * heads + torch.arange(heads, device=samples.device)  # [P, H]

    def pick(solve):
        base = solve._as_solve() if isinstance(solve, _SolvePart) else solve
        return base.map(lambda t: t[problems])

    return _token_reads({w: pick(solve) for w, solve in solves.items()}, z, rule.activation,
                        slots[:, None].expand(-1, heads))


def _read_at(weights: Weights, z: torch.Tensor, samples: torch.Tensor, rule: MemoryRule) -> torch.Tensor:
    """Reads of single vectors z [P, H, D] at the weights of the given samples [P] -> [P, H, D]."""
    chosen = {name: weight[samples] for name, weight in weights.items()}
    return memory_read(chosen, z.to(_dtype_of(weights)).unsqueeze(-2), rule.activation).squeeze(-2)


@in_state_precision
def titans_chunk(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    state: MemoryState,
    seen: torch.Tensor,
    mask: torch.Tensor,
    memory_chunk_size: int,
    rule: MemoryRule,
) -> Tuple[torch.Tensor, MemoryState]:
    """Chunk-parallel `dgd_naive.titans_naive` (same arguments and results)."""
    grid = ChunkGrid(seen, mask, memory_chunk_size)
    to_grid = grid.scatter
    o, pad_reads, state = _run_main_memory(
        to_grid(q), q, to_grid(k), to_grid(v), to_grid(eta), to_grid(alpha), state, grid, rule, self_generated=False,
    )
    return grid.gather(o, pad_reads).to(q.dtype), state


def _stack(weights: List[Weights]) -> Weights:
    """Memories with the same chunk size, stacked on dim 1: weight [B, X, H, O, I]. Weights that
    `_unstack` made (views of one stacked tensor, as kept in a cache between calls) are not copied."""
    if torch.compiler.is_compiling():  # in a compiled step the copy fuses; `_base` is not traced
        return {w: torch.stack([memory[w] for memory in weights], dim=1) for w in weights[0]}
    stacked = {}
    for w in weights[0]:
        parts = [memory[w] for memory in weights]
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


def _unstack(stacked: Weights, count: int) -> List[Weights]:
    return [{w: t[:, i] for w, t in stacked.items()} for i in range(count)]


@in_state_precision
def self_modifying_titans_chunk(
    *,
    a: torch.Tensor,
    q: torch.Tensor,
    state: Dict[str, MemoryState],
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
) -> Tuple[torch.Tensor, Dict[str, MemoryState]]:
    """Chunk-parallel `dgd_naive.self_modifying_titans_naive` (same arguments and results).

    Two passes: the projection memories `M_k, M_v, M_eta, M_alpha` (chunk `C`, stacked and
    updated together since they share keys, eta and alpha) produce k, v, eta, alpha for every
    token; then the main memory (chunk `C_mem`) reads and learns from them. One token per sample
    (decoding) takes `_self_modifying_token`: the five memories' steps at once."""
    if a.shape[1] == 1 and rule.updates:
        return _self_modifying_token(a, q, state, seen, mask, eta_readout, eta_bias, alpha_readout, alpha_bias,
                                     eta_max, chunk_size, memory_chunk_size, rule)
    grid = ChunkGrid(seen, mask, chunk_size)
    names = PROJECTION_MEMORIES
    dtype = _dtype_of(state["k"].current)
    batch, heads, copies = a.shape[0], a.shape[2], len(names)
    starts = _stack([state[n].start for n in names])
    shared = all(state[n].current[w] is state[n].start[w] for n in names for w in starts)  # e.g. fresh states
    stacked = MemoryState(starts, starts if shared else _stack([state[n].current for n in names]))
    shape = {w: t.shape[1:] for w, t in stacked.current.items()}  # [4, H, O, I]
    stacked = stacked.map(lambda w, t: _flat(t.expand(batch, *shape[w]), 3))  # [B*4*H, O, I]

    def per_memory(x: torch.Tensor) -> torch.Tensor:  # [B, H, ...] -> [B*4*H, ...], one copy per memory
        return _flat(x.unsqueeze(1).expand(batch, copies, *x.shape[1:]), 3)

    a_grid = grid.scatter(a).transpose(1, 2).to(dtype)  # [B, H, L, D]

    def step(carry: MemoryState, piece):
        start, current = carry.start, carry.current
        seg, completes, a_c = piece
        # Every read and self-generated value uses the chunk-start states (paper Eq. 90).
        reads = memory_read(start, per_memory(a_c), rule.activation)
        reads = reads.view(batch, copies, heads, *reads.shape[1:])  # [B, 4, H, C, D]
        k_c = l2norm(reads[:, 0], rule.eps)  # [B, H, C, D]
        v_unit = l2norm(reads[:, 1], rule.eps)  # the self-generated targets read unit values (docs/design.md §8)
        eta_c, alpha_c = readout_rates(reads[:, 2], reads[:, 3], eta_readout, eta_bias, alpha_readout, alpha_bias,
                                       eta_max)  # [B, H, C]
        if rule.updates:
            # the self-generated values, [B*4*H, C, D] (a linear memory under "token" re-reads them per token)
            targets = None if rule.gradient_at_current(start) else memory_read(start, per_memory(v_unit), rule.activation)
            eta_m, log_alpha_m = masked_rates(eta_c, alpha_c, grid.segment_active(seg))
            current = _memory_chunk_update(
                start, current, per_memory(k_c), targets, per_memory(eta_m), per_memory(log_alpha_m), rule,
                per_memory(v_unit),
            )
            start = select_where(_per_problem(completes, copies * heads), current, start)
        return MemoryState(start, current), (k_c, v_unit, eta_c, alpha_c)

    pieces = list(zip(grid.segments, grid.completes, grid.split(a_grid, dim=2)))
    remat = _remat(rule, pieces, a_grid, eta_readout, *stacked.current.values())
    stacked, results = scan_chunks(step, stacked, pieces, remat, rule.compile_chunks)
    keys, unit_values, etas, alphas = (list(column) for column in zip(*results))
    unflat = lambda weights: {w: t.view(batch, *shape[w]) for w, t in weights.items()}  # noqa: E731

    def to_tokens(pieces: List[torch.Tensor]) -> torch.Tensor:  # [B, H, L, ...] pieces -> [B, T, H, ...]
        return grid.gather((torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]).transpose(1, 2))

    k, v_unit, eta, alpha = to_tokens(keys), to_tokens(unit_values), to_tokens(etas), to_tokens(alphas)
    mem_grid = ChunkGrid(seen, mask, memory_chunk_size)
    to_grid = mem_grid.scatter
    o, pad_reads, mem = _run_main_memory(
        to_grid(q), q, to_grid(k), to_grid(v_unit), to_grid(eta), to_grid(alpha), state["mem"], mem_grid, rule,
        self_generated=True,
    )
    starts, currents = _unstack(unflat(stacked.start), copies), _unstack(unflat(stacked.current), copies)
    end = {name: MemoryState(s, c) for name, s, c in zip(names, starts, currents)}
    end["mem"] = mem
    return mem_grid.gather(o, pad_reads).to(q.dtype), end


def _self_modifying_token(a, q, state: Dict[str, MemoryState], seen, mask, eta_readout, eta_bias, alpha_readout,
                          alpha_bias, eta_max: float, chunk_size: int, memory_chunk_size: int,
                          rule: MemoryRule) -> Tuple[torch.Tensor, Dict[str, MemoryState]]:
    """One token per sample (decoding). All five memories share the token's key, unit value, eta and
    alpha, so their DGD steps are one stacked step over [B, 5, H] weights (`dgd_naive.dgd_step`, the
    one-token case of the chunk's closed form); a padding token keeps every state.
    a, q: [B, 1, H, D]; mask: [B, 1]. The end states are views of one stacked tensor per weight, which
    the next call's `_stack` takes without copying."""
    names = PROJECTION_MEMORIES + ("mem",)
    act = rule.activation
    start, current = _stack([state[n].start for n in names]), _stack([state[n].current for n in names])  # [B, 5, H, O, I]
    a_t, q_t = a.transpose(1, 2).unsqueeze(1), q.transpose(1, 2)  # [B, 1, H, 1, D], [B, H, 1, D]
    reads = memory_read({w: t[:, :4] for w, t in start.items()}, a_t, act)  # [B, 4, H, 1, D]
    key, v_unit = l2norm(reads[:, 0], rule.eps), l2norm(reads[:, 1], rule.eps)  # [B, H, 1, D]
    eta, alpha = readout_rates(reads[:, 2], reads[:, 3], eta_readout, eta_bias, alpha_readout, alpha_bias,
                               eta_max)  # [B, H, 1]
    read_at = rule.read_state({w: t[:, 4] for w, t in start.items()}, {w: t[:, 4] for w, t in current.items()})
    o = memory_read(read_at, q_t, act)  # [B, H, 1, D]
    # the state every memory's inner gradient and self-generated value are taken at
    gradient_at = current if rule.gradient_at_current(current) else start
    targets = memory_read(gradient_at, v_unit.unsqueeze(1), act)  # every memory's self-generated value, [B, 5, H, 1, D]
    copies = lambda x: x.unsqueeze(1).expand(-1, len(names), *x.shape[1:])  # noqa: E731  [B, ...] -> [B, 5, ...]
    terms = dgd_terms(gradient_at, copies(key), targets, act, rule.eps, copies(v_unit),
                      copies(eta) if rule.step_bound else None)
    if rule.output_layer_at_current(current):  # W1's gradient at the current W1, the chunk-start W2
        gradient_at = output_layer_current(start, current)
        terms["W1"] = dgd_terms(gradient_at, copies(key), memory_read(gradient_at, v_unit.unsqueeze(1), act), act,
                                rule.eps, copies(v_unit), copies(eta) if rule.step_bound else None)["W1"]
    terms = {w: (unit.squeeze(-2), write.squeeze(-2)) for w, (unit, write) in terms.items()}
    stepped = dgd_step(current, terms, eta.squeeze(-1).unsqueeze(1), alpha.squeeze(-1).unsqueeze(1))
    active = mask[:, 0]
    periods = torch.tensor([chunk_size] * 4 + [memory_chunk_size], device=active.device)
    chunk_end = (active[:, None] & ((seen + 1)[:, None] % periods == 0)).view(-1, len(names), 1, 1, 1)  # [B, 5, 1, 1, 1]
    # Most decoding steps pad nothing and end no chunk; there the two selections over the full stacked
    # state (~20% of a default model's decode step, profiled) are skipped. That needs a host read of two
    # [B]-sized flags: free on the CPU, a stream stall on an accelerator, a graph break under torch.compile,
    # so there the selections always run.
    host_read = active.device.type == "cpu" and not torch.compiler.is_compiling()
    if host_read and bool(active.all()):
        current = stepped
    else:
        keep = active.view(-1, 1, 1, 1, 1)
        current = {w: torch.where(keep, stepped[w], t) for w, t in current.items()}
    if not host_read or bool(chunk_end.any()):
        start = {w: torch.where(chunk_end, current[w], t) for w, t in start.items()}
    starts, currents = _unstack(start, len(names)), _unstack(current, len(names))
    end = {name: MemoryState(s, c) for name, s, c in zip(names, starts, currents)}
    return o.transpose(1, 2).to(q.dtype), end

