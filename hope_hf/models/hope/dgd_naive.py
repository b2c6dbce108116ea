"""The in-context memories one token at a time: the Delta Gradient Descent step and the per-token
reference scans of the two memory mixers (docs/design.md §2-4).

Plain loops over tokens, vectorised over batch and heads, that read like the equations; the chunked
twins in `dgd_chunk` are tested against them. Each scan takes a span of tokens, the memories' state
at its start (chunk-start *and* current weights, since a span may begin mid-chunk) and the real
tokens each sample has seen, and returns `(output, end state)`.

Chunks are counted per sample from the first real token of the stream: `seen [B]` is the number of
real tokens each sample has processed before the span; a token with `mask == False` (padding)
changes no state and no counter.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .cache_hope import MemoryState
from .chunk_grid import select_where
from .primitives import (MemoryRule, Weights, dgd_terms, flush_subnormals, l2norm, memory_read, output_layer_current,
                         readout_rates)


def dgd_step(current: Weights, terms: Dict[str, Tuple[torch.Tensor, torch.Tensor]], eta: torch.Tensor,
             alpha: torch.Tensor) -> Weights:
    """One Delta Gradient Descent step (paper Eq. 88/91; docs/design.md §3) of every weight W:

        W_t = W_{t-1} (alpha_t I - eta_t u~_t u~_t^T) + eta_t r_t u~_t^T

    current: `W_{t-1}` [B, H, O, I]; terms: name -> (u~ [B, H, I], r [B, H, O]) from
    `primitives.dgd_terms` (the inner gradient at the chunk-start state, normalised and bounded);
    eta, alpha: [B, H]. Subnormal entries of the result are flushed to zero (`flush_subnormals`)."""
    eta_, alpha_ = eta[..., None, None], alpha[..., None, None]
    new = {}
    for name, weight in current.items():
        unit, write = terms[name]
        erased = (weight @ unit.unsqueeze(-1)).squeeze(-1)  # W_{t-1} u~, [B, H, O]
        new[name] = flush_subnormals(alpha_ * weight + eta_ * (write - erased).unsqueeze(-1) * unit.unsqueeze(-2))
    return new


def _read(weights: Weights, z: torch.Tensor, act: str) -> torch.Tensor:
    """`M[weights](z)` for one token: z [B, H, D] -> [B, H, D]."""
    return memory_read(weights, z.unsqueeze(-2), act).squeeze(-2)


def _learn(state: MemoryState, key: torch.Tensor, target: torch.Tensor, target_key: Optional[torch.Tensor],
           eta: torch.Tensor, alpha: torch.Tensor, active: torch.Tensor, chunk_end: torch.Tensor,
           rule: MemoryRule) -> MemoryState:
    """One token's DGD step on one memory, kept for the samples where the token is real; where it
    completes a chunk, the current state becomes the chunk-start state. The inner gradient is taken at
    the chunk-start state, or at the current one for a linear memory under `linear_gradient="token"`;
    a deep memory's output layer W1 under `deep_output_gradient="token"` takes it at the current W1 with
    the chunk-start W2 (a self-generated target is re-read at the state the gradient is taken at).
    key, target, target_key: [B, H, D] (target_key: the key of a self-generated target, None for a plain
    one); eta, alpha: [B, H]; active, chunk_end: [B] bool."""

    def terms_at(weights: Weights, names, at_start: bool):
        """The DGD terms of the named weights with the inner gradient taken at `weights`."""
        target_there = target if at_start or target_key is None else _read(weights, target_key, rule.activation)
        terms = dgd_terms(weights, key.unsqueeze(-2), target_there.unsqueeze(-2), rule.activation, rule.eps,
                          None if target_key is None else target_key.unsqueeze(-2),
                          eta.unsqueeze(-1) if rule.step_bound else None)
        return {name: (terms[name][0].squeeze(-2), terms[name][1].squeeze(-2)) for name in names}

    if rule.gradient_at_current(state.current):
        terms = terms_at(state.current, ["W"], at_start=False)
    elif rule.output_layer_at_current(state.current):
        terms = {**terms_at(state.start, ["W2"], at_start=True),
                 **terms_at(output_layer_current(state.start, state.current), ["W1"], at_start=False)}
    else:
        terms = terms_at(state.start, list(state.start), at_start=True)
    current = select_where(active, dgd_step(state.current, terms, eta, alpha), state.current)
    return MemoryState(select_where(active & chunk_end, current, state.start), current)


def self_modifying_titans_naive(
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
    """Self-modifying Titans (paper Eq. 83-91), one token at a time.

    Every memory's keys, values, rates and inner gradient use its chunk-start state; the main memory
    `mem` is read at the state `rule.read_state` names (`M_{t-1}` with `memory_read="token"`).

    a, q: [B, T, H, D] (non-adaptive features and l2-normalised queries); mask: [B, T] bool;
    seen: [B]; readouts [H, D], biases [H]; state: memory name (`k, v, eta, alpha, mem`) -> state.
    Returns the reads `o` [B, T, H, D] and the end states.
    """
    state = dict(state)
    chunks = {name: (memory_chunk_size if name == "mem" else chunk_size) for name in state}
    counter = seen.clone()
    outputs = []
    for t in range(a.shape[1]):
        a_t, q_t, active = a[:, t], q[:, t], mask[:, t]
        start = {name: memory.start for name, memory in state.items()}
        k_t = l2norm(_read(start["k"], a_t, rule.activation), rule.eps)
        v_t = _read(start["v"], a_t, rule.activation)
        eta_t, alpha_t = readout_rates(_read(start["eta"], a_t, rule.activation),
                                       _read(start["alpha"], a_t, rule.activation),
                                       eta_readout, eta_bias, alpha_readout, alpha_bias, eta_max)
        outputs.append(_read(rule.read_state(start["mem"], state["mem"].current), q_t, rule.activation))
        if not rule.updates:
            continue
        counter = counter + active.long()
        v_unit = l2norm(v_t, rule.eps)  # the self-generated targets read unit values (docs/design.md §8)
        for name in state:
            target = _read(start[name], v_unit, rule.activation)  # the memory's self-generated value
            state[name] = _learn(state[name], k_t, target, v_unit, eta_t, alpha_t, active,
                                 counter % chunks[name] == 0, rule)
    return torch.stack(outputs, dim=1), state


def titans_naive(
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
    """Titans with static projections (paper Eq. 76-78) and the DGD update of its one memory.

    q, k, v: [B, T, H, D]; eta, alpha: [B, T, H]; mask: [B, T]; seen: [B]."""
    counter = seen.clone()
    outputs = []
    for t in range(q.shape[1]):
        active = mask[:, t]
        outputs.append(_read(rule.read_state(state.start, state.current), q[:, t], rule.activation))
        if not rule.updates:
            continue
        counter = counter + active.long()
        state = _learn(state, k[:, t], v[:, t], None, eta[:, t], alpha[:, t], active,
                       counter % memory_chunk_size == 0, rule)
    return torch.stack(outputs, dim=1), state
