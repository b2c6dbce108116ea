"""The executable per-token reference of SPEC section 7.

Plain loops over tokens, vectorised over batch and heads, that read like the equations. Each
function is the boundary a fast path plugs into: it takes a span of tokens, the state at the
start of the span (chunk-start states *and* current states, since a span may begin mid-chunk)
and the per-sample token counters, and returns the outputs and the state at the end of the span.

Chunks are counted per sample from the first real token of the stream: `seen [B]` is the number
of real tokens each sample has processed before the span; a token with `mask == False`
(padding) changes no state and no counter.

(These modules are flat siblings of `modeling_hope.py`, not an `ops/` package, because
`register_for_auto_class` copies a model's relative imports flat into the checkpoint.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .memory_hope import MemoryState, dgd_step, l2norm, memory_gradients, memory_read, select_state, step_bound

MemoryStates = Dict[str, MemoryState]


@dataclass
class MemoryRule:
    """Static settings of the in-context update."""

    activation: str
    eps: float
    updates: bool  # False: the in-context-learning ablation, memories stay at their initial state
    # Fast path only: training over more chunks than this recomputes the scan in the backward
    # (None: never). Results are identical either way.
    recompute_above: Optional[int] = None
    # Where the main memory M_mem is read: "token" reads the current state, `o_t = M_{t-1}(q_t)`
    # (paper Eq. 88); "chunk" reads the state at the start of the token's chunk (paper Eq. 90).
    # Either way the inner gradients are taken at the chunk-start state (as Titans trains).
    memory_read: str = "chunk"


def _advance(
    name: str,
    chunk: int,
    start: MemoryStates,
    current: MemoryStates,
    new_current: MemoryState,
    active: torch.Tensor,
    counter_after: torch.Tensor,
) -> None:
    """Commit one token's update for the samples where it is real, and promote the current state
    to chunk-start state for the samples whose chunk just completed."""
    current[name] = select_state(active, new_current, current[name])
    boundary = active & (counter_after % chunk == 0)
    start[name] = select_state(boundary, current[name], start[name])


def _bound(state: MemoryState, key: torch.Tensor, target_key, eta: torch.Tensor, act: str) -> MemoryState:
    """`memory_hope.step_bound` for one token: key, target_key [B, H, D], eta [B, H] -> [B, H]."""
    factors = step_bound(state, key.unsqueeze(-2), None if target_key is None else target_key.unsqueeze(-2),
                         eta.unsqueeze(-1), act)
    return {name: f.squeeze(-1) for name, f in factors.items()}


def self_modifying_scan(
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
    """Self-modifying Titans (paper Eq. 83-91), one token at a time.

    Every memory's inner gradient (and its `step_bound`) is taken at its chunk-start state; the main
    memory is read at the current state `M_{t-1}` with `rule.memory_read == "token"`.

    a, q: [B, T, H, D] (non-adaptive features and l2-normalised queries); mask: [B, T] bool;
    seen: [B]; readouts [H, D], biases [H]. `start`/`current`: memory name -> state, names
    `k, v, eta, alpha, mem`. Returns the reads `o` [B, T, H, D] and the end states.
    """
    start, current = dict(start), dict(current)
    chunks = {name: (memory_chunk_size if name == "mem" else chunk_size) for name in start}
    counter = seen.clone()
    outputs = []
    for t in range(a.shape[1]):
        a_t, q_t, active = a[:, t], q[:, t], mask[:, t]
        # Every read and self-generated value uses the chunk-start state (paper Eq. 90), except the
        # main memory's read with memory_read="token": the current state M_{t-1} (paper Eq. 88).
        k_t = l2norm(memory_read(start["k"], a_t, rule.activation), rule.eps)
        v_t = memory_read(start["v"], a_t, rule.activation)
        eta_t = eta_max * torch.sigmoid(
            (memory_read(start["eta"], a_t, rule.activation) * eta_readout).sum(-1) + eta_bias
        )
        alpha_t = torch.sigmoid(
            (memory_read(start["alpha"], a_t, rule.activation) * alpha_readout).sum(-1) + alpha_bias
        )
        read_state = current["mem"] if rule.memory_read == "token" else start["mem"]
        outputs.append(memory_read(read_state, q_t, rule.activation))
        if not rule.updates:
            continue
        counter = counter + active.long()
        # [choice] The self-generated values are M_X(v / ||v||): with an unnormalised v the target
        # M_X[S](v) feeds the memory's own state back multiplied by eta * ||v|| every token, an
        # exponential blow-up once the outer optimiser grows ||v|| (seen as NaN in training).
        v_unit = l2norm(v_t, rule.eps)
        for name in start:
            target = memory_read(start[name], v_unit, rule.activation)  # self-generated value
            grads, inputs = memory_gradients(start[name], k_t, target, rule.activation)
            bound = _bound(start[name], k_t, v_unit, eta_t, rule.activation)  # stop-gradient, 1 at init
            new = dgd_step(current[name], grads, inputs, eta_t, alpha_t, rule.eps, bound)
            _advance(name, chunks[name], start, current, new, active, counter)
    return torch.stack(outputs, dim=1), start, current


def titans_scan(
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
    """Titans with static projections (paper Eq. 76-78) and the DGD update of one memory `mem`.

    q, k, v: [B, T, H, D]; eta, alpha: [B, T, H]; mask: [B, T]; seen: [B]."""
    start, current = dict(start), dict(current)
    counter = seen.clone()
    outputs = []
    for t in range(q.shape[1]):
        active = mask[:, t]
        read_state = current["mem"] if rule.memory_read == "token" else start["mem"]
        outputs.append(memory_read(read_state, q[:, t], rule.activation))
        if not rule.updates:
            continue
        counter = counter + active.long()
        grads, inputs = memory_gradients(start["mem"], k[:, t], v[:, t], rule.activation)
        bound = _bound(start["mem"], k[:, t], None, eta[:, t], rule.activation)  # stop-gradient, 1 at init
        new = dgd_step(current["mem"], grads, inputs, eta[:, t], alpha[:, t], rule.eps, bound)
        _advance("mem", memory_chunk_size, start, current, new, active, counter)
    return torch.stack(outputs, dim=1), start, current


def swiglu(weights: Dict[str, torch.Tensor], n: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Per-sample SwiGLU `down(silu(gate n) * up n)`. n: [B, Dm]; gate/up: [B, I, Dm]; down: [B, Dm, I].
    Returns (output [B, Dm], gate pre-activation, up, hidden)."""
    gate = torch.einsum("bid,bd->bi", weights["gate"], n)
    up = torch.einsum("bid,bd->bi", weights["up"], n)
    hidden = torch.nn.functional.silu(gate) * up
    return torch.einsum("bdi,bi->bd", weights["down"], hidden), gate, up, hidden


def swiglu_gains(column_energy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token gains of a SwiGLU's gate and up layers for the CMS step normaliser, at least 1, no gradient.

    The gain of a layer is the squared Frobenius norm of `d out / d (its pre-activation)`:
    `sum_i ||down[:, i]||^2 a_i^2` with `a = up * silu'(gate)` for gate and `a = silu(gate)` for
    up, an upper bound of the curvature `||J||^2` that the layer input's energy alone misses.
    column_energy: `||down[:, i]||^2`, broadcastable against gate; gate (pre-activation), up:
    [..., I]. Returns (gain_gate, gain_up), each [...].
    """
    with torch.no_grad():  # [choice] a safeguard on the step size, like gradient clipping: not differentiated
        sig = torch.sigmoid(gate)
        gain_gate = (column_energy * (up * sig * (1 + gate * (1 - sig))) ** 2).sum(-1).clamp(min=1.0)
        gain_up = (column_energy * (gate * sig) ** 2).sum(-1).clamp(min=1.0)
    return gain_gate, gain_up


def swiglu_gradients(weights: Dict[str, torch.Tensor], n: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Gradient of `1/2 || swiglu(n) - target ||^2` w.r.t. gate, up, down (hand-derived)."""
    out, gate, up, hidden = swiglu(weights, n)
    error = out - target
    grad_hidden = torch.einsum("bdi,bd->bi", weights["down"], error)
    sig = torch.sigmoid(gate)
    grad_gate = grad_hidden * up * sig * (1 + gate * (1 - sig))
    grad_up = grad_hidden * torch.nn.functional.silu(gate)
    return {
        "gate": grad_gate.unsqueeze(-1) * n.unsqueeze(-2),
        "up": grad_up.unsqueeze(-1) * n.unsqueeze(-2),
        "down": error.unsqueeze(-1) * hidden.unsqueeze(-2),
    }


def cms_scan(
    n: torch.Tensor,
    theta: Dict[str, torch.Tensor],
    buffer: Optional[torch.Tensor],
    num_updates: torch.Tensor,
    seen: torch.Tensor,
    mask: torch.Tensor,
    value_weight: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    chunk_size: int,
    updates: bool,
):
    """One Continuum Memory System level (paper Eq. 31, SPEC section 4), one token at a time.

    Tokens of a chunk are processed with the chunk-start fast weights `theta` and kept in
    `buffer`; when the chunk is complete, `theta <- alpha * theta - eta * sum_t grad_t / max(1,
    sum_t ||u_t||^2 g_t)` with the gradients of `1/2 ||MLP_theta(n_t) - n_t W_V||^2` over the
    chunk's tokens (`u_t` each weight's layer input, `g_t` its gain, `swiglu_gains`), and the
    buffer is emptied. n: [B, T, Dm]; mask: [B, T]; seen, num_updates: [B]; buffer: [B, C, Dm], rows
    `[0, seen % C)` filled, the rest zero (None: empty); value_weight: [Dm, Dm] (nn.Linear
    layout); eta, alpha: scalars. Returns (y [B, T, Dm], theta, buffer, num_updates).
    """
    batch = n.shape[0]
    if buffer is None:
        buffer = n.new_zeros(batch, chunk_size, n.shape[-1])
    counter = seen.clone()
    slots = torch.arange(chunk_size, device=n.device)
    outputs = []
    for t in range(n.shape[1]):
        n_t, active = n[:, t], mask[:, t]
        outputs.append(swiglu(theta, n_t)[0])
        if not updates:
            continue
        write = (active[:, None] & (slots == counter[:, None] % chunk_size))[..., None]  # [B, C, 1]
        buffer = torch.where(write, n_t[:, None, :], buffer)
        counter = counter + active.long()
        boundary = active & (counter % chunk_size == 0)
        if not bool(boundary.any()):
            continue
        grad_sum = {name: torch.zeros_like(w.expand(batch, *w.shape[1:])) for name, w in theta.items()}
        # sum_t ||u_t||^2 * gain_t per weight: its layer input's energy times its output gain
        scale = {name: n.new_zeros(batch) for name in theta}
        column_energy = (theta["down"] ** 2).sum(1)  # [B, I]
        for j in range(chunk_size):  # the chunk's tokens, read at the chunk-start weights
            n_j = buffer[:, j]
            grads = swiglu_gradients(theta, n_j, n_j @ value_weight.t())
            grad_sum = {name: grad_sum[name] + grads[name] for name in grads}
            _, gate, up, hidden = swiglu(theta, n_j)
            gain_gate, gain_up = swiglu_gains(column_energy, gate, up)
            energy_in = (n_j * n_j).sum(-1)
            scale["gate"] = scale["gate"] + energy_in * gain_gate
            scale["up"] = scale["up"] + energy_in * gain_up
            scale["down"] = scale["down"] + (hidden * hidden).sum(-1)
        # [choice] Normalised step, as in memory_hope.dgd_step: each weight's summed gradient is
        # divided by max(1, sum_t ||u_t||^2 g_t), its layer input's energy (n for gate/up, the
        # hidden activation for down) times the gain g_t of the path from the layer to the output
        # (`swiglu_gains`; 1 for down). This bounds the step's curvature, so it is stable for eta < 2
        # per layer. Unnormalised, a chunk of C RMS-normalised inputs has curvature up to C * d
        # (eta = 1e-3 diverged for C >= 8 at d = 256); without the gains, trained gate/up weights
        # reached an effective rate of 4.5 at eta = 0.1 and diverged (results/diagnostics/repro_formal_nan.py).
        done = boundary.view(-1, 1, 1)
        theta = {
            name: torch.where(done, alpha * theta[name] - eta * grad_sum[name] / scale[name].clamp(min=1.0).view(-1, 1, 1),
                              theta[name])
            for name in theta
        }
        buffer = torch.where(done, torch.zeros_like(buffer), buffer)
        num_updates = num_updates + boundary.long()
    return torch.stack(outputs, dim=1), theta, buffer, num_updates
