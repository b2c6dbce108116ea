"""The math that the per-token reference (`dgd_naive`, `cms_naive`) and the chunked fast path
(`dgd_chunk`, `cms_chunk`) share, written once (docs/design.md §2, §3, §5):

- activations and their derivatives (`silu_prime`, `silu_second`), `l2norm`;
- a memory's read `memory_read` and the rank-1 factors of its inner-loss gradient (`gradient_factors`);
- `dgd_terms`: the DGD update of every weight of a memory as `W (alpha I - eta u~ u~^T) + eta r u~^T`,
  with the stop-gradient step bound (`step_bound`, `inner_curvature`);
- `SwiGLUPass`: a CMS level's SwiGLU on a block of tokens, with its inner-loss gradient and the step's
  normalisers; `cms_step`: the CMS level's normalised update.

A memory's weights are a dict of per-sample, per-head tensors: deep `M(z) = z + W1 act(W2 z)` holds
`{"W1": [..., D, M], "W2": [..., M, D]}`, linear `M(z) = W z` holds `{"W": [..., D, D]}`. Vectors are
`[..., C, D]`: C tokens (C = 1 for a single token), leading dims matching the weights'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Weights = Dict[str, torch.Tensor]
ACTIVATIONS = ("silu", "gelu", "tanh")


@dataclass(frozen=True)
class MemoryRule:
    """The static settings of the in-context memories' update (from `HopeConfig`)."""

    activation: str
    eps: float  # of the l2 normalisations
    updates: bool  # False: memories stay at their initial state (the no-in-context-learning ablation)
    # "token": M_mem read at the current state (Eq. 88); "chunk": at the chunk start (Eq. 90); "token_output": a deep
    # memory's output layer at the current state, its hidden layer at the chunk start (`read_state`)
    memory_read: str
    step_bound: bool  # bound every gradient step by the inner curvature (`step_bound`)
    recompute_above: Optional[int] = None  # chunked path: recompute the scan in the backward above this many chunks
    use_fla: bool = True  # linear memories on CUDA: fla's gated-delta-rule kernel for the end state, when installed
    fla_dtype: torch.dtype = torch.bfloat16  # the dtype fla's kernel computes in (the state stays float32)
    compile_chunks: bool = False  # run the chunked path's per-chunk step of every memory through torch.compile
    # linear memories: "token" takes the inner gradient (and a self-generated target) at the current state
    # W_{t-1} (`linear_dgd_terms`), "chunk" at the chunk-start state like a deep memory
    linear_gradient: str = "token"
    # deep memories: "token" takes the output layer W1's inner gradient at the current W1_{t-1} (hidden
    # features at the chunk-start W2, `deep_output_dgd_terms`), "chunk" at the chunk-start state like W2
    deep_output_gradient: str = "chunk"

    def gradient_at_current(self, weights: "Weights") -> bool:
        """Whether these weights' inner gradient is taken at the current state (a linear memory under
        `linear_gradient="token"`) rather than at the chunk-start state."""
        return "W" in weights and self.linear_gradient == "token"

    def read_state(self, start: "Weights", current: "Weights") -> "Weights":
        """The weights the main memory is read at, given its chunk-start and current states."""
        if self.memory_read == "chunk":
            return start
        if self.memory_read == "token_output" and "W1" in current:
            return output_layer_current(start, current)
        return current

    def output_layer_at_current(self, weights: "Weights") -> bool:
        """Whether a deep memory's output layer W1 takes its inner gradient at the current W1_{t-1}
        (`deep_output_gradient="token"`); its W2 always takes it at the chunk-start state."""
        return "W1" in weights and self.deep_output_gradient == "token"


def output_layer_current(start: Weights, current: Weights) -> Weights:
    """A deep memory with its output layer W1 at the current state and its hidden layer W2 at the chunk
    start: the state `memory_read="token_output"` reads, and the one `deep_output_gradient="token"` takes W1's
    inner gradient at."""
    return {"W1": current["W1"], "W2": start["W2"]}


# --- activations ----------------------------------------------------------------------------------
def silu_prime(x: torch.Tensor) -> torch.Tensor:
    """d silu(x) / dx = s (1 + x (1 - s)), s = sigmoid(x)."""
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def silu_second(x: torch.Tensor) -> torch.Tensor:
    """d^2 silu(x) / dx^2 = s (1 - s) (2 + x (1 - 2 s))."""
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "tanh":
        return torch.tanh(x)
    raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {name!r}")


def activation_derivative(name: str, x: torch.Tensor) -> torch.Tensor:
    """d act(x) / dx, elementwise (hand-derived: the inner loop takes no autograd gradients)."""
    if name == "silu":
        return silu_prime(x)
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return cdf + x * pdf
    if name == "tanh":
        return 1 - torch.tanh(x) ** 2
    raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {name!r}")


def l2norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# `flush_subnormals` adds and subtracts this: float32 entries below ~2^-88 (3e-27) become 0, entries above
# 2^-39 (2e-12) are unchanged, and none moves by more than 2^-63 (1e-19).
FLUSH_OFFSET = 2.0 ** -64


def flush_subnormals(x: torch.Tensor) -> torch.Tensor:
    """`x` with its entries below ~3e-27 in magnitude set to zero (float32); entries above 2e-12 are
    unchanged and none moves by more than 1e-19. A fast weight that decays where nothing writes (the erase term
    alone removes its component along every key) reaches the subnormal range after enough updates, and
    x86 arithmetic on subnormals is ~100x slower; flushing only true subnormals is not enough, since
    products of near-subnormal weights with small activations are subnormal again (decode after 16K
    tokens was 1.4x slower that way). Two elementwise ops, no process-wide flush-to-zero flag: adding
    `FLUSH_OFFSET` = 2^-64 rounds every smaller magnitude away."""
    return (x + FLUSH_OFFSET) - FLUSH_OFFSET


def flush_subnormals_(x: torch.Tensor) -> torch.Tensor:
    """`flush_subnormals` in place, for a fresh result that nothing else holds (no temporaries)."""
    return x.add_(FLUSH_OFFSET).sub_(FLUSH_OFFSET)


# --- memories -------------------------------------------------------------------------------------
def memory_read(state: Weights, z: torch.Tensor, act: str) -> torch.Tensor:
    """`M[state](z)`: weights [..., O, I], z [..., C, D] -> [..., C, D]."""
    if "W" in state:
        return z @ state["W"].transpose(-1, -2)
    hidden = activation(act, z @ state["W2"].transpose(-1, -2))
    return z + hidden @ state["W1"].transpose(-1, -2)


def readout_rates(eta_read: torch.Tensor, alpha_read: torch.Tensor, eta_readout: torch.Tensor, eta_bias: torch.Tensor,
                  alpha_readout: torch.Tensor, alpha_bias: torch.Tensor,
                  eta_max: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The DGD rates of the self-modifying mixer (paper Eq. 86-87): `eta = eta_max sigmoid(<M_eta(a), w_eta> + b_eta)`,
    `alpha = sigmoid(<M_alpha(a), w_alpha> + b_alpha)`. Reads [B, H, ..., D] (one token or a chunk of them); readouts
    [H, D] and biases [H] broadcast over the dims between H and D. Returns eta, alpha: [B, H, ...]."""
    between = (1,) * (eta_read.dim() - 3)
    heads, dim = eta_readout.shape

    def logit(read: torch.Tensor, readout: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return (read * readout.view(heads, *between, dim)).sum(-1) + bias.view(heads, *between)

    eta = eta_max * torch.sigmoid(logit(eta_read, eta_readout, eta_bias))
    return eta, torch.sigmoid(logit(alpha_read, alpha_readout, alpha_bias))


def gradient_factors(state: Weights, key: torch.Tensor, target: torch.Tensor, act: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The gradient of `1/2 ||M[S](key) - target||^2` with respect to each weight is rank-1 per token,
    `e u^T`: returns name -> (output factor e [..., C, O], layer input u [..., C, I]); `u` is `key` for
    W2 and W, `act(W2 key)` for W1 (docs/design.md §2)."""
    if "W" in state:
        error = key @ state["W"].transpose(-1, -2) - target
        return {"W": (error, key)}
    pre = key @ state["W2"].transpose(-1, -2)  # [..., C, M]
    hidden = activation(act, pre)
    error = key + hidden @ state["W1"].transpose(-1, -2) - target  # [..., C, D]
    grad_pre = (error @ state["W1"]) * activation_derivative(act, pre)  # [..., C, M]
    return {"W1": (error, hidden), "W2": (grad_pre, key)}


def dgd_terms(
    state: Weights, key: torch.Tensor, target: torch.Tensor, act: str, eps: float,
    target_key: Optional[torch.Tensor] = None, eta: Optional[torch.Tensor] = None,
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The DGD update of every weight of a memory (docs/design.md §3), written as

        W_t = W_{t-1} (alpha I - eta u~ u~^T) + eta r u~^T,    r = -||u|| / (max(1, ||u||^2) b) e,

    i.e. the gradient term `-eta / (max(1, ||u||^2) b) e u^T` with the inner gradient `e u^T` taken at
    the chunk-start weights `state`, `u~ = u / ||u||`, and `b` the stop-gradient `step_bound` factor
    (it needs `eta`; `target_key` is the key of a self-generated target, None for a plain one; without
    eta, b = 1: the unbounded step, `HopeConfig.dgd_step_bound=False`). The max(1, ||u||^2) normalisation keeps the step a contraction for a deep memory's
    hidden input (||u|| >> 1); it is the identity for unit keys.

    state: weights [..., O, I]; key, target, target_key: [..., C, D]; eta: [..., C].
    Returns name -> (unit inputs u~ [..., C, I], writes per unit learning rate r [..., C, O]).
    """
    bound = None if eta is None else step_bound(state, key, target_key, eta, act)
    terms = {}
    for name, (out_factor, inputs) in gradient_factors(state, key, target, act).items():
        squared = (inputs * inputs).sum(-1)  # [..., C]
        scale = torch.rsqrt(squared + eps)
        # ||u|| written as (||u||^2 + eps) * rsqrt(||u||^2 + eps), so that u = u~ * that, exactly as
        # l2norm defines u~.
        normaliser = squared.clamp(min=1.0) if bound is None else squared.clamp(min=1.0) * bound[name]
        write_scale = -(squared + eps) * scale / normaliser
        terms[name] = (inputs * scale.unsqueeze(-1), out_factor * write_scale.unsqueeze(-1))
    return terms


def linear_dgd_terms(
    key: torch.Tensor, target: Optional[torch.Tensor], target_key: Optional[torch.Tensor], eps: float,
    eta: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DGD step of a linear memory `M(z) = W z` with its inner gradient taken at the current state
    `W_{t-1}` (`HopeConfig.linear_gradient="token"`: the per-token recurrence of paper Eq. 88 itself,
    docs/design.md §8.20), written as one rank-1 transition plus a write:

        W_t = W_{t-1} (alpha I + eta a u~^T) + eta r u~^T

    The inner error is `W_{t-1} (k - v^) - v`: a plain target `v` (v^ = 0), a self-generated target
    `W_{t-1} v^` (v = 0), or both (a deep memory's output layer, `deep_output_dgd_terms`). `dgd_terms` at
    `W_{t-1}` gives the gradient term `eta c (error) u~^T` with the scale `c = -||k|| / (max(1, ||k||^2) b)`
    (b: the `step_bound` factor; 1 without eta). Its part linear in `W_{t-1}` joins the erase term:

        a = -u~ + c (k - v^),    r = -c v

    Both sides are known before the chunk is solved, so the chunk stays one triangular solve
    (`dgd_chunk.ChunkSolve` with `erase_per_eta=a`).

    key: k [..., C, I]; target: v [..., C, O] or None; target_key: v^ [..., C, I] or None (not both None);
    eta: [..., C] (None: the unbounded step). Returns (u~ [..., C, I], a [..., C, I], r [..., C, O])."""
    squared = (key * key).sum(-1)  # [..., C]
    scale = torch.rsqrt(squared + eps)
    normaliser = squared.clamp(min=1.0)
    if eta is not None:  # a linear memory's bound depends on the keys only; the dict just names its weight
        normaliser = normaliser * step_bound({"W": key}, key, target_key, eta, "identity")["W"]
    c = (-(squared + eps) * scale / normaliser).unsqueeze(-1)  # [..., C, 1], as in dgd_terms
    unit = key * scale.unsqueeze(-1)
    erase = c * (key if target_key is None else key - target_key) - unit
    return unit, erase, (-c * target if target is not None else torch.zeros_like(key))


def deep_output_dgd_terms(
    state: Weights, key: torch.Tensor, target: torch.Tensor, target_key: Optional[torch.Tensor], act: str,
    eps: float, eta: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DGD step of a deep memory's output layer W1 with its inner gradient taken at the current
    `W1_{t-1}` and the hidden features `h(z) = act(W2 z)` at the chunk-start W2 (`state`;
    `HopeConfig.deep_output_gradient="token"`). The inner error `k + W1_{t-1} h(k) - target` is linear in
    `W1_{t-1}`; with a self-generated target `v^ + W1_{t-1} h(v^)` it is `W1_{t-1} (h(k) - h(v^)) + k - v^`.
    So the step is `linear_dgd_terms` on the hidden features with the plain target `target - k` (or
    `v^ - k`): a delta rule on the chunk-start features, one triangular solve per chunk.

    state: the chunk-start weights (W2 [..., M, D] is used); key, target, target_key (None: a plain target):
    [..., C, D]; eta: [..., C] (None: the unbounded step). Returns (u~, a, r) as `linear_dgd_terms`."""
    hidden = activation(act, key @ state["W2"].transpose(-1, -2))  # h(k), [..., C, M]
    if target_key is None:
        return linear_dgd_terms(hidden, target - key, None, eps, eta)
    target_hidden = activation(act, target_key @ state["W2"].transpose(-1, -2))
    return linear_dgd_terms(hidden, target_key - key, target_hidden, eps, eta)


def step_bound(state: Weights, key: torch.Tensor, target_key: Optional[torch.Tensor], eta: torch.Tensor, act: str) -> Weights:
    """Stop-gradient factor b >= 1 per weight and token that bounds the DGD gradient step by the
    curvature of the whole inner loss, the self-generated target's dependence on the state included
    (docs/design.md §3): `b = max(1, kappa * max(1, eta / (2 - eta)) / max(1, ||u||^2))` with `kappa`
    from `inner_curvature`, so that the step's contraction along its worst direction stays above -1.
    It is 1 wherever the normalised step is already stable, and it is not differentiated (a safeguard
    on the step size, like gradient clipping).

    state: weights [..., O, I]; key, target_key (None: a plain target): [..., C, D]; eta: [..., C].
    Returns name -> factor [..., C].
    """
    with torch.no_grad():
        rate = (eta / (2.0 - eta).clamp(min=1e-6)).clamp(min=1.0)  # max(1, eta / (2 - eta))
        return {name: (kappa * rate / (u * u).sum(-1).clamp(min=1.0)).clamp(min=1.0)
                for name, (kappa, u) in inner_curvature(state, key, target_key, act).items()}


def inner_curvature(state: Weights, key: torch.Tensor, target_key: Optional[torch.Tensor], act: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """An upper bound `kappa` of the spectral norm of the Jacobian, with respect to each weight, of the
    inner gradient `G_k^T (M[S](k) - target) u^T` (`G_k` the Jacobian from the weight's output to the
    memory's output: I for W1 and W, `W1 diag(act'(W2 k))` for W2):

        plain target:             kappa = ||u||^2 ||G_k||^2
        self-generated M[S](v):   kappa = ||u|| ||G_k|| (||G_k|| ||u - u_v|| + ||G_k - G_v|| ||u_v||)

    (`u_v`, `G_v` the same for the target key v; Frobenius norms). Returns name -> (kappa [..., C],
    the key-side layer input u [..., C, I])."""
    norm = lambda x: (x * x).sum(-1).sqrt()  # noqa: E731
    if "W" in state:
        inputs = {"W": (key, target_key, None, None)}
    else:
        pre_k = key @ state["W2"].transpose(-1, -2)  # [..., C, M]
        columns = (state["W1"] ** 2).sum(-2).unsqueeze(-2)  # ||W1[:, m]||^2, [..., 1, M]
        slope_k = activation_derivative(act, pre_k)
        gain_k = (columns * slope_k * slope_k).sum(-1).sqrt()  # ||W1 diag(act'(pre_k))||_F
        if target_key is None:
            inputs = {"W1": (activation(act, pre_k), None, None, None), "W2": (key, None, gain_k, None)}
        else:
            pre_v = target_key @ state["W2"].transpose(-1, -2)
            slope_v = activation_derivative(act, pre_v)
            gain_diff = (columns * (slope_k - slope_v) ** 2).sum(-1).sqrt()  # ||G_k - G_v||_F
            inputs = {"W1": (activation(act, pre_k), activation(act, pre_v), None, None),
                      "W2": (key, target_key, gain_k, gain_diff)}
    curvature = {}
    for name, (u, u_v, gain, gain_diff) in inputs.items():
        g = 1.0 if gain is None else gain
        if u_v is None:
            kappa = (u * u).sum(-1) * (g * g)  # (not norm(u)**2: exactly the normaliser's ||u||^2)
        else:
            kappa = norm(u) * g * (g * norm(u - u_v) + (0.0 if gain_diff is None else gain_diff * norm(u_v)))
        curvature[name] = (kappa, u)
    return curvature


# --- CMS levels -----------------------------------------------------------------------------------
SWIGLU_NAMES = ("gate", "up", "down")


def shared_weight(w: torch.Tensor) -> torch.Tensor:
    """A fast weight shared by the whole batch (an expanded parameter, stride 0) as one 2-D matrix,
    so that `[B, C, d] @ W^T` is one matmul over B*C rows."""
    return w[0] if w.dim() == 3 and w.stride(0) == 0 else w


def apply_weight(x: torch.Tensor, w: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """`x @ w^T` (or `x @ w`) for x [B, C, in] and a per-sample [B, out, in] or shared weight.
    A shared weight is applied to the B*C rows as one explicit matmul: `torch.matmul` chooses
    between folding and batching by `requires_grad`, which changes the last bits of the result."""
    w = shared_weight(w)
    w = w.transpose(-1, -2) if transpose else w
    if w.dim() == 2:
        return (x.reshape(-1, x.shape[-1]) @ w).view(*x.shape[:-1], w.shape[-1])
    return x @ w


def swiglu_gains(column_energy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token gains of a SwiGLU's gate and up layers for the CMS step's normaliser, at least 1.

    The gain of a layer is the squared Frobenius norm of `d out / d (its pre-activation)`:
    `sum_i ||down[:, i]||^2 a_i^2` with `a = up * silu'(gate)` for gate and `a = silu(gate)` for up,
    an upper bound of the curvature that the layer input's energy alone misses. Not differentiated
    (a safeguard on the step size, like gradient clipping). column_energy: `||down[:, i]||^2`,
    broadcastable against gate; gate (pre-activation), up: [..., I]. Returns (gain_gate, gain_up) [...]."""
    with torch.no_grad():
        gain_gate = (column_energy * (up * silu_prime(gate)) ** 2).sum(-1).clamp(min=1.0)
        gain_up = (column_energy * F.silu(gate) ** 2).sum(-1).clamp(min=1.0)
    return gain_gate, gain_up


class SwiGLUPass:
    """A SwiGLU `down (silu(gate n) * up n)` on a block of inputs, and, given a target, the hand-derived
    gradient of `1/2 ||out - target||^2` with respect to its three weights and the normalisers of
    the CMS step (docs/design.md §5).

    weights: (gate [B, I, d], up [B, I, d], down [B, d, I]), per sample or shared (stride-0 batch);
    n, target: [B, C, d]; active: [B, C] bool (None: every row is a real token), rows that are not
    real tokens enter neither the gradient nor the normalisers.
    """

    def __init__(self, weights: Sequence[torch.Tensor], n: torch.Tensor, target: Optional[torch.Tensor] = None,
                 active: Optional[torch.Tensor] = None) -> None:
        gate_w, up_w, down_w = weights
        self.n = n
        self.gate = apply_weight(n, gate_w)  # [B, C, I]
        self.up = apply_weight(n, up_w)
        self.sig = torch.sigmoid(self.gate)
        self.act = self.gate * self.sig  # silu(gate)
        self.hidden = self.act * self.up
        self.out = apply_weight(self.hidden, down_w)  # [B, C, d]
        self.dsilu = self.sig * (1 + self.gate * (1 - self.sig))  # silu_prime(gate), from the shared sigmoid
        if target is None:
            return
        self.error = self.out - target
        n_real, hidden_real = n, self.hidden
        if active is not None:
            keep = active.unsqueeze(-1).to(self.error.dtype)
            self.error = self.error * keep
            n_real, hidden_real = n * keep, self.hidden * keep
        self.grad_hidden = apply_weight(self.error, down_w, transpose=False)  # [B, C, I]
        self.grad_gate = self.grad_hidden * self.up * self.dsilu
        self.grad_up = self.grad_hidden * self.act
        with torch.no_grad():  # ||down[:, i]||^2: [I] or [B, I] (a safeguard, not differentiated)
            column_energy = (shared_weight(down_w) ** 2).sum(-2)
        if column_energy.dim() > 1:
            column_energy = column_energy.unsqueeze(1)
        self.gain_gate, self.gain_up = swiglu_gains(column_energy, self.gate, self.up)
        energy_in = (n_real * n_real).sum(-1)  # [B, C]
        # sum_t ||u_t||^2 g_t per weight: its layer input's energy times its output gain (1 for down)
        self.energies = ((energy_in * self.gain_gate).sum(1), (energy_in * self.gain_up).sum(1),
                         (hidden_real * hidden_real).sum((1, 2)))

    def gradient_factors(self) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
        """The block's summed gradient of each weight is `e^T u` (a sum of rank-1 terms over the block's
        tokens): (e [B, C, O], u [B, C, I]) for gate, up and down."""
        return (self.grad_gate, self.n), (self.grad_up, self.n), (self.error, self.hidden)

    def gradient_sums(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's summed gradients w.r.t. gate, up, down ([B, I, d], [B, I, d], [B, d, I])."""
        return tuple(e.transpose(-1, -2) @ u for e, u in self.gradient_factors())

    def rates(self, eta) -> Tuple[torch.Tensor, ...]:
        """eta / max(1, energy) for gate, up and down, [B, 1, 1] each."""
        return tuple((eta / energy.clamp(min=1.0)).view(-1, 1, 1) for energy in self.energies)

    def step(self, weights: Sequence[torch.Tensor], eta, alpha) -> Tuple[torch.Tensor, ...]:
        """`cms_step` with this block's gradients: the fast weights after the (complete) chunk."""
        return cms_step(weights, self.gradient_factors(), self.rates(eta), alpha)


def cms_step(weights: Sequence[torch.Tensor], gradient_factors: Sequence[Tuple[torch.Tensor, torch.Tensor]],
             rates: Sequence[torch.Tensor], alpha) -> Tuple[torch.Tensor, ...]:
    """The CMS level's update at the end of a chunk (docs/design.md §5), per weight:

        theta <- alpha * theta - eta / max(1, sum_t ||u_t||^2 g_t) * sum_{t in chunk} e_t u_t^T

    with `rates` = eta / max(1, ...) ([B, 1, 1] each, `SwiGLUPass.rates`) and the gradient as its
    factors (`SwiGLUPass.gradient_factors`), so that the decay, the gradient sum and the write are one
    `baddbmm` (the weights are the large operand: one pass over them instead of five); subnormals flushed
    (`flush_subnormals`). `alpha`: a float, or a 0-dim tensor (then differentiable)."""
    new = []
    for w, (e, u), r in zip(weights, gradient_factors, rates):
        scaled = (-r.to(w.dtype) * e.to(w.dtype)).transpose(-1, -2)  # [B, O, C]
        if isinstance(alpha, float):
            out = torch.baddbmm(w, scaled, u.to(w.dtype), beta=alpha)
        else:
            out = torch.baddbmm(alpha.to(w.dtype) * w, scaled, u.to(w.dtype))
        new.append(flush_subnormals_(out))
    return tuple(new)
