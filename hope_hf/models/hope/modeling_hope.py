"""HOPE: self-modifying Titans + Continuum Memory System (docs/design.md §1).

`HopeForCausalLM` = token embedding -> num_hidden_layers x HopeBlock -> RMSNorm -> LM head.
`HopeBlock` = h + Mixer(RMSNorm(h)), then the CMS levels (fastest first).

Each block reads its `LayerState` (`cache_hope`) and returns a new one; the model commits them to
the `HopeCache` when every block has run. The memories and CMS levels run through the scans of
`config.scan_implementation` (`SCANS`): `"chunked"` (`dgd_chunk`, `cms_chunk`) or `"reference"`
(`dgd_naive`, `cms_naive`). The DGD step is `dgd_naive.dgd_step`; the CMS step `primitives.cms_step`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_hope import CMSState, HopeCache, LayerState, MemoryState
from .cms_chunk import cms_chunk, complete_chunk
from .cms_naive import cms_naive
from .configuration_hope import SELF_MODIFYING_MEMORIES, HopeConfig
from .dgd_chunk import self_modifying_titans_chunk, titans_chunk
from .dgd_naive import self_modifying_titans_naive, titans_naive
from .hf_compat import CACHE_NAME, generation_cache, resolve_cache
from .primitives import MemoryRule, activation, l2norm


@dataclass(frozen=True)
class Scans:
    """One implementation of the three scans; each is keyword-only and returns (output, end state)."""

    self_modifying_titans: Callable
    titans: Callable
    cms: Callable


# `HopeConfig.scan_implementation` -> its scans (like transformers' `attn_implementation`).
SCANS: Dict[str, Scans] = {
    "chunked": Scans(self_modifying_titans_chunk, titans_chunk, cms_chunk),
    "reference": Scans(self_modifying_titans_naive, titans_naive, cms_naive),
}


@contextlib.contextmanager
def scan_implementation(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run `model` with the given scan implementation inside the block, whatever its config says:
    `with scan_implementation(model, "reference"): model(ids)` runs the per-token reference loops.
    Sets `scan_implementation` on every HOPE config the model's modules hold, and restores it."""
    if name not in SCANS:
        raise ValueError(f"scan_implementation must be one of {list(SCANS)}, got {name!r}")
    configs = {id(c): c for m in model.modules() for c in [getattr(m, "config", None)] if isinstance(c, HopeConfig)}
    previous = {key: config.scan_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config.scan_implementation = name
        yield model
    finally:
        for key, config in configs.items():
            config.scan_implementation = previous[key]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Fast weights are kept in float32 (or float64) even when the parameters are half precision:
    thousands of small DGD steps would be rounded away in bf16."""
    return torch.promote_types(dtype, torch.float32)


def touch_parameters(x: torch.Tensor, parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """`x` plus zero times every trainable one of `parameters`, when gradients are on.

    Some parameters only shape the state a call writes (the projection memories before the first
    chunk completes, a CMS level's value map before its first update), so a short call does not
    reach them; DDP then stops with "Expected to have finished reduction". This gives every
    parameter a gradient (zero where nothing read it) on any sequence length."""
    if not torch.is_grad_enabled():
        return x
    firsts = [p.reshape(-1)[:1] for p in parameters if p.requires_grad and p.numel() > 0]
    if not firsts:
        return x
    return x + 0.0 * torch.cat([f.to(x.dtype) for f in firsts]).sum()


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def token_mask(attention_mask: Optional[torch.Tensor], batch: int, length: int, past_columns: int,
               device: torch.device) -> torch.Tensor:
    """The [B, T] bool mask of real tokens of this call, from a 2-D attention_mask over either
    this call's tokens or past + this call's tokens (None: every token is real)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must be a 2-D [batch, seq_len] tensor of 0/1, got shape {shape}")
    if attention_mask.shape[0] != batch or attention_mask.shape[1] not in (length, past_columns + length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected [{batch}, {length}] or "
            f"[{batch}, {past_columns + length}] (past + new tokens)"
        )
    return attention_mask[:, -length:].to(device=device).bool()


@contextlib.contextmanager
def staged_folder(save_directory: Union[str, os.PathLike]) -> Iterator[str]:
    """Write a folder all or nothing: yields a temporary sibling folder to write into; when the block
    succeeds, its files replace their namesakes in `save_directory` (created if needed) and weight
    files of an older save that this one did not write are removed; other files there stay. When
    the block fails, `save_directory` is left as it was."""
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.isfile(target):
        raise OSError(f"save_directory {target!r} is a file, not a folder")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".hope-save-", dir=parent)
    try:
        yield staging
        os.makedirs(target, exist_ok=True)
        written = set(os.listdir(staging))
        for name in os.listdir(target):
            if name not in written and re.match(r"(model|pytorch_model).*\.(safetensors|bin|json)$", name):
                os.remove(os.path.join(target, name))
        for name in written:
            destination = os.path.join(target, name)
            if os.path.isdir(destination):
                shutil.rmtree(destination)
            os.replace(os.path.join(staging, name), destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class HopeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float() if dtype in (torch.float16, torch.bfloat16) else hidden_states
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over the last `window` real tokens (paper's conv4).

    The tail (last `window - 1` real inputs, [B, window - 1, d]) is carried in the state, and a
    padding token does not shift it, so a padded batch sees what each sequence sees alone."""

    def __init__(self, hidden_size: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.weight = nn.Parameter(torch.zeros(hidden_size, window))

    def forward(self, x: torch.Tensor, tail: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, d]; tail: [B, window - 1, d]; mask: [B, T] -> ([B, T, d], new tail)."""
        if self.window == 1:
            return x * self.weight[:, 0], tail
        if x.shape[1] == 1:  # decoding: no host read of the mask (it would break a compiled decoding step)
            padded = torch.cat([tail, x], dim=1)  # [B, W, d]
            out = (padded.unfold(1, self.window, 1) * self.weight).sum(-1)  # as below, for T = 1
            return out, torch.where(mask[:, :1, None], padded[:, 1:], tail)
        if bool(mask.all()):
            padded = torch.cat([tail, x], dim=1)  # [B, W-1+T, d]
            windows = padded.unfold(1, self.window, 1)  # [B, T, d, W]
            return (windows * self.weight).sum(-1), padded[:, -(self.window - 1):]
        outputs = []
        for t in range(x.shape[1]):
            window = torch.cat([tail, x[:, t : t + 1]], dim=1)  # [B, W, d]
            outputs.append(torch.einsum("bwd,dw->bd", window, self.weight))
            tail = torch.where(mask[:, t, None, None], window[:, 1:], tail)
        return torch.stack(outputs, dim=1), tail


class MemoryInitialState(nn.Module):
    """The meta-learned initial state of one in-context memory, per head (docs/design.md §2.5)."""

    def __init__(self, config: HopeConfig, name: str = "mem") -> None:
        super().__init__()
        heads, dim = config.num_heads, config.head_dim
        # std of the initial state's W1 (deep; key_value_init_range for M_k, M_v) or of its noise around
        # the identity (linear memories: memory_init_range; docs/design.md §8.8)
        kv_range = config.key_value_init_range
        deep_kv = name in ("k", "v") and kv_range is not None and config.memory_type == "deep"
        self.init_range = kv_range if deep_kv else config.memory_init_range
        if config.memory_type == "deep":
            self.W1 = nn.Parameter(torch.zeros(heads, dim, config.memory_dim))
            self.W2 = nn.Parameter(torch.zeros(heads, config.memory_dim, dim))
        else:
            self.W = nn.Parameter(torch.zeros(heads, dim, dim))

    def expand(self, batch_size: int) -> Dict[str, torch.Tensor]:
        return {name: p.to(state_dtype(p.dtype)).unsqueeze(0).expand(batch_size, *p.shape)
                for name, p in self.named_parameters()}


class HopeMemoryMixer(nn.Module):
    """What the titans and self-modifying mixers share: the non-adaptive stage
    `a = act(conv(x W_x))`, the static query, the memories' state handling and the output
    `W_o concat_heads(RMSNorm_head(o))`."""

    memory_names: Tuple[str, ...] = ("mem",)

    def __init__(self, config: HopeConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.in_proj = nn.Linear(d, d, bias=False)
        self.conv = ShortConvolution(d, config.conv_window)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.memories = nn.ModuleDict({name: MemoryInitialState(config, name) for name in self.memory_names})
        self.o_norm = HopeRMSNorm(config.head_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.rule = MemoryRule(
            activation=config.memory_activation, eps=config.norm_eps, updates=config.in_context_updates,
            memory_read=config.memory_read, step_bound=config.dgd_step_bound, recompute_above=config.scan_recompute_threshold,
            use_fla=config.use_fla_kernels, fla_dtype=getattr(torch, config.fla_dtype),
            compile_chunks=config.compile_chunks,
            linear_gradient=config.linear_gradient, deep_output_gradient=config.deep_output_gradient,
        )

    @property
    def scans(self) -> Scans:
        return SCANS[self.config.scan_implementation]

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.config.num_heads, self.config.head_dim)

    def features(self, x: torch.Tensor, state: LayerState, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, d] -> (a [B, T, H, D], q [B, T, H, D]); updates the conv tail in `state`."""
        tail = state.conv
        if tail is None:
            tail = x.new_zeros(x.shape[0], self.config.conv_window - 1, x.shape[-1])
        projected = self.in_proj(x)
        # The tail is in the compute dtype of the call that wrote it (bf16 under autocast).
        a, state.conv = self.conv(projected, tail.to(projected.dtype), mask)
        a = activation(self.config.memory_activation, a)
        # Normalised in the state's dtype: a half-precision sum of squares underflows in the backward.
        q = l2norm(self.split_heads(self.q_proj(a)).to(self.state_dtype), self.config.norm_eps)
        return a, q

    def load_memories(self, state: LayerState, batch_size: int) -> Dict[str, MemoryState]:
        """Every memory's state, from the layer state or (first call) the initial states."""
        return {name: state.memories.get(name) or MemoryState.fresh(initial.expand(batch_size))
                for name, initial in self.memories.items()}

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype of the fast weights and of the scans' inputs (float32 for half-precision weights)."""
        return state_dtype(self.o_proj.weight.dtype)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o: [B, T, H, D] -> [B, T, d]."""
        return self.o_proj(self.o_norm(o).flatten(-2))


class SelfModifyingTitansMixer(HopeMemoryMixer):
    """Self-modifying Titans (paper Eq. 83-91): k, v, eta, alpha are memories that generate their
    own values and are updated in context by DGD, like the main memory."""

    memory_names = SELF_MODIFYING_MEMORIES

    def __init__(self, config: HopeConfig) -> None:
        super().__init__(config)
        heads, dim = config.num_heads, config.head_dim
        self.eta_readout = nn.Parameter(torch.zeros(heads, dim))
        self.eta_bias = nn.Parameter(torch.zeros(heads))
        self.alpha_readout = nn.Parameter(torch.zeros(heads, dim))
        self.alpha_bias = nn.Parameter(torch.zeros(heads))

    def forward(self, x: torch.Tensor, state: LayerState, mask: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        a, q = self.features(x, state, mask)
        dtype = self.state_dtype  # the scans run in the state's dtype, whatever the weights' precision
        o, memories = self.scans.self_modifying_titans(
            a=self.split_heads(a).to(dtype), q=q.to(dtype), state=self.load_memories(state, x.shape[0]),
            seen=seen, mask=mask, eta_readout=self.eta_readout.to(dtype), eta_bias=self.eta_bias.to(dtype),
            alpha_readout=self.alpha_readout.to(dtype), alpha_bias=self.alpha_bias.to(dtype),
            eta_max=self.config.eta_max, chunk_size=self.config.chunk_size,
            memory_chunk_size=self.config.memory_chunk_size, rule=self.rule,
        )
        state.memories.update(memories)
        return self.output(o.to(a.dtype))


class TitansMixer(HopeMemoryMixer):
    """Titans with static projections (paper Eq. 76-78) and one DGD-updated memory."""

    def __init__(self, config: HopeConfig) -> None:
        super().__init__(config)
        d, heads = config.hidden_size, config.num_heads
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.eta_proj = nn.Linear(d, heads)
        self.alpha_proj = nn.Linear(d, heads)
        # Their biases set the initial rates. `_init_weights` applies these when it initialises each layer
        # itself: a parent module is initialised before its children, whose default init would reset them.
        self.eta_proj.bias_init = _logit(config.eta_init)
        self.alpha_proj.bias_init = _logit(config.alpha_init)

    def forward(self, x: torch.Tensor, state: LayerState, mask: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        a, q = self.features(x, state, mask)
        k = l2norm(self.split_heads(self.k_proj(a)).to(self.state_dtype), self.config.norm_eps)
        v = self.split_heads(self.v_proj(a))
        eta = self.config.eta_max * torch.sigmoid(self.eta_proj(a))
        alpha = torch.sigmoid(self.alpha_proj(a))
        dtype = self.state_dtype  # the scans run in the state's dtype, whatever the weights' precision
        o, state.memories["mem"] = self.scans.titans(
            q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), eta=eta.to(dtype), alpha=alpha.to(dtype),
            state=self.load_memories(state, x.shape[0])["mem"], seen=seen, mask=mask,
            memory_chunk_size=self.config.memory_chunk_size, rule=self.rule,
        )
        return self.output(o.to(a.dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AttentionMixer(nn.Module):
    """Causal softmax attention with RoPE and a KV cache (Hope-Attention's mixer), through SDPA.

    Positions count real tokens per sample, and padded keys are masked, so a left-padded batch
    gives each sequence the logits it has alone."""

    def __init__(self, config: HopeConfig) -> None:
        super().__init__()
        self.config = config
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """RoPE frequencies [D/2], computed on the fly: a buffer made in `__init__` is left
        uninitialised by `from_pretrained`'s meta-device init (non-persistent buffers are not
        loaded), and this costs D/2 values per call."""
        dim = self.config.head_dim
        return 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, D]; positions: [B, T]."""
        freqs = positions.float()[..., None] * self.inv_freq(x.device)  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)

    def forward(self, x: torch.Tensor, state: LayerState, mask: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, dim = self.config.num_heads, self.config.head_dim
        shape = (batch, length, heads, dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        positions = (seen[:, None] + mask.long().cumsum(1) - 1).clamp(min=0)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if state.keys is not None:  # stored in the compute dtype of the call that wrote them
            k = torch.cat([state.keys.to(k.dtype), k], dim=2)
            v = torch.cat([state.values.to(v.dtype), v], dim=2)
            key_mask = torch.cat([state.key_mask, mask], dim=1)
        else:
            key_mask = mask
        state.keys, state.values, state.key_mask = k, v, key_mask
        past = k.shape[2] - length
        query_idx = torch.arange(length, device=x.device)[:, None] + past
        key_idx = torch.arange(k.shape[2], device=x.device)[None, :]
        # A query always sees itself, so rows of padding tokens are never empty (no NaN).
        allowed = ((key_idx <= query_idx) & key_mask[:, None, :]) | (key_idx == query_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class CMSLevel(nn.Module):
    """One Continuum Memory System level: a SwiGLU MLP (Llama's MLP shape, so pretrained MLPs can
    seed it) whose fast weights are updated every `chunk_size` tokens (None: static level)."""

    def __init__(self, config: HopeConfig, chunk_size: Optional[int]) -> None:
        super().__init__()
        self.config = config
        self.chunk_size = chunk_size
        d, inner = config.hidden_size, config.cms_hidden_size
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)
        if chunk_size is not None:
            self.value_proj = nn.Linear(d, d, bias=False)  # W_V^l: what the level should store
            self.eta_logit = nn.Parameter(torch.zeros(()))
            self.alpha_logit = nn.Parameter(torch.zeros(()))

    def forward(self, n: torch.Tensor, state: LayerState, level: int, mask: torch.Tensor, seen: torch.Tensor,
                defer_chunk_end: bool = False) -> torch.Tensor:
        """n: [B, T, d] (normalised input) -> [B, T, d]; reads and replaces `state.cms[level]`.
        `defer_chunk_end` (one token, chunked scan): the update of a chunk the token completes is left to
        `complete_chunk` (`cms_chunk.cms_chunk`)."""
        if self.chunk_size is None:
            return self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))
        dtype = state_dtype(self.gate_proj.weight.dtype)  # fast weights stay float32 for half-precision weights
        scan = SCANS[self.config.scan_implementation].cms
        deferred = {"defer_chunk_end": True} if defer_chunk_end else {}  # only the chunked scan takes it
        y, state.cms[level] = scan(
            n=n.to(dtype), state=state.cms.get(level) or self.initial_state(n.shape[0], dtype, n.device), seen=seen,
            mask=mask, **self.update_rule(dtype), chunk_size=self.chunk_size, updates=self.config.in_context_updates,
            recompute_above=self.config.cms_recompute_threshold, **deferred,
        )
        return y.to(n.dtype)

    def update_rule(self, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """What the level's chunk update learns with: its value map W_V^l, rate eta and retention alpha."""
        return dict(value_weight=self.value_proj.weight.to(dtype), eta=F.softplus(self.eta_logit).to(dtype),
                    alpha=torch.sigmoid(self.alpha_logit).to(dtype))

    def complete_chunk(self, state: LayerState, level: int, mask: torch.Tensor, seen: torch.Tensor) -> None:
        """The chunk-end update that a `defer_chunk_end` call left (a no-op for tokens that end no chunk)."""
        if self.chunk_size is not None and self.config.in_context_updates:
            cms = state.cms[level]
            state.cms[level] = complete_chunk(cms, seen, mask, **self.update_rule(cms.buffer.dtype))

    def initial_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> CMSState:
        """The level before its first token: the fast weights are the parameters, the buffer empty."""
        params = {"gate": self.gate_proj.weight, "up": self.up_proj.weight, "down": self.down_proj.weight}
        theta = {k: p.to(dtype).unsqueeze(0).expand(batch_size, *p.shape) for k, p in params.items()}
        return CMSState(theta, None, torch.zeros(batch_size, dtype=torch.long, device=device))


class ContinuumMemorySystem(nn.Module):
    """A chain (or a mixture, `cms_variant="independent"`) of CMS levels, fastest first."""

    def __init__(self, config: HopeConfig) -> None:
        super().__init__()
        self.variant = config.cms_variant
        self.levels = nn.ModuleList([CMSLevel(config, size) for size in config.cms_chunk_sizes])
        num_norms = len(self.levels) if self.variant == "sequential" else min(1, len(self.levels))
        self.norms = nn.ModuleList([HopeRMSNorm(config.hidden_size, config.rms_norm_eps) for _ in range(num_norms)])
        if self.variant == "independent" and len(self.levels) > 0:
            self.level_weights = nn.Parameter(torch.ones(len(self.levels)))

    def forward(self, h: torch.Tensor, state: LayerState, mask: torch.Tensor, seen: torch.Tensor,
                defer_chunk_ends: bool = False) -> torch.Tensor:
        if self.variant == "sequential":
            for i, (norm, level) in enumerate(zip(self.norms, self.levels)):
                h = h + level(norm(h), state, i, mask, seen, defer_chunk_ends)
            return h
        if len(self.levels) == 0:
            return h
        n = self.norms[0](h)
        for i, level in enumerate(self.levels):
            h = h + self.level_weights[i] * level(n, state, i, mask, seen, defer_chunk_ends)
        return h

    def complete_chunks(self, state: LayerState, mask: torch.Tensor, seen: torch.Tensor) -> None:
        """Every level's deferred chunk-end update (`CMSLevel.complete_chunk`)."""
        for i, level in enumerate(self.levels):
            level.complete_chunk(state, i, mask, seen)


MIXER_CLASSES = {"self_modifying": SelfModifyingTitansMixer, "titans": TitansMixer, "attention": AttentionMixer}


class HopeBlock(GradientCheckpointingLayer):
    def __init__(self, config: HopeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_norm = HopeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = MIXER_CLASSES[config.mixer](config)
        self.cms = ContinuumMemorySystem(config)

    def forward(
        self, hidden_states: torch.Tensor, layer_state: LayerState, mask: torch.Tensor, seen: torch.Tensor,
        defer_cms_chunk_ends: bool = False,
    ) -> Tuple[torch.Tensor, LayerState]:
        """hidden_states: [B, T, d]; layer_state: this layer's state (read, not modified);
        mask: [B, T] bool; seen: [B]. Returns the new hidden states and the new layer state.
        `defer_cms_chunk_ends`: see `CMSLevel.forward` (then call `self.cms.complete_chunks`)."""
        state = layer_state.copy()
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), state, mask, seen)
        hidden_states = self.cms(hidden_states, state, mask, seen, defer_cms_chunk_ends)
        return hidden_states, state


def _decoding_step(block: HopeBlock, hidden_states: torch.Tensor, layer_state: Dict[str, torch.Tensor],
                   mask: torch.Tensor, seen: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One token per sample through `block`, on a flat layer state (`LayerState.flatten`, name -> tensor)
    and with the CMS chunk-end updates left out: free of host reads, so that it compiles to one graph."""
    hidden_states, new_state = block(hidden_states, LayerState.unflatten(layer_state), mask, seen,
                                     defer_cms_chunk_ends=True)
    return hidden_states, new_state.flatten()


@functools.lru_cache(maxsize=None)
def _compiled_decoding_step():
    """`_decoding_step` through `torch.compile` (inductor; `HopeConfig.compile_decoding`): a block's few
    hundred small ops (norms, conv, the five memories' stacked DGD step, the CMS reads) fuse into one
    graph. Compiled on the first decoding call of a process for each input signature, then reused."""
    return torch.compile(_decoding_step, dynamic=False)


class HopePreTrainedModel(PreTrainedModel):
    config_class = HopeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HopeBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _is_stateful = True
    _supports_sdpa = True

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, made atomic (`staged_folder`): a failed save (full disk,
        interrupted process) never leaves a half-written checkpoint that would load."""
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(os.fspath(save_directory))))
        with staged_folder(save_directory) as staging:
            super().save_pretrained(staging, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        config = self.config
        if isinstance(module, HopeRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ShortConvolution):
            # Start near the identity (the current token passes through), plus small noise.
            identity = torch.zeros_like(module.weight)
            identity[:, -1] = 1.0
            init.copy_(module.weight, identity + config.initializer_range * torch.randn_like(identity))
        elif isinstance(module, MemoryInitialState):
            if hasattr(module, "W"):
                eye = torch.eye(config.head_dim).expand_as(module.W)
                init.copy_(module.W, eye + module.init_range * torch.randn_like(module.W))
            else:
                # W2 ~ N(0, 1): unit keys give an O(1) hidden layer, so the W1 step is a true normalised
                # step; W1 small: M starts near the identity (docs/design.md §8.7).
                init.normal_(module.W1, std=module.init_range)
                init.normal_(module.W2, std=1.0)
        elif isinstance(module, SelfModifyingTitansMixer):
            init.normal_(module.eta_readout, std=config.initializer_range)
            init.normal_(module.alpha_readout, std=config.initializer_range)
            init.constant_(module.eta_bias, _logit(config.eta_init))
            init.constant_(module.alpha_bias, _logit(config.alpha_init))
        elif isinstance(module, nn.Linear) and getattr(module, "bias_init", None) is not None:
            init.constant_(module.bias, module.bias_init)  # TitansMixer's eta / alpha rates
        elif isinstance(module, CMSLevel) and module.chunk_size is not None:
            init.constant_(module.eta_logit, _inverse_softplus(config.cms_eta_init))
            init.constant_(module.alpha_logit, _logit(config.cms_alpha_init))
        elif isinstance(module, ContinuumMemorySystem) and hasattr(module, "level_weights"):
            init.constant_(module.level_weights, 1.0 / len(module.levels))


class HopeModel(HopePreTrainedModel):
    def __init__(self, config: HopeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([HopeBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = HopeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[HopeCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values: Optional[HopeCache] = None,
        **kwargs,
    ) -> Union[BaseModelOutputWithPast, Tuple]:
        r"""input_ids: [B, T]; attention_mask: [B, T] or [B, past + T] (1 = real token);
        cache: a `HopeCache` to continue from and update (`past_key_values=` is the same argument
        under the name transformers <= 5.23 uses). The cache is updated only when every layer has
        run: a call that fails leaves it as it was."""
        cache = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq_len, {self.config.hidden_size}], "
                                 f"got shape {tuple(inputs_embeds.shape)}")
            if not bool(torch.isfinite(inputs_embeds).all()):
                raise ValueError("inputs_embeds contains NaN or inf")
        batch, length, _ = inputs_embeds.shape
        if length == 0:
            raise ValueError("input_ids/inputs_embeds must hold at least one token")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is not None and not isinstance(cache, HopeCache):
            raise TypeError(f"cache must be a HopeCache (HOPE carries fast-weight state, not KV pairs), "
                            f"got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = HopeCache(self.config)
        if cache is not None:
            cache.check_compatible(self.config, batch, self.state_dtype)
        past_columns = cache.seen_columns if cache is not None else 0
        mask = token_mask(attention_mask, batch, length, past_columns, inputs_embeds.device)
        if cache is not None and cache.seen_tokens is not None:
            seen = cache.seen_tokens.to(inputs_embeds.device)
        else:
            seen = torch.zeros(batch, dtype=torch.long, device=inputs_embeds.device)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        new_states = []
        compiled_step = self.compiles_decoding and length == 1
        for i, block in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            layer_state = cache.layers[i].state if cache is not None else LayerState()
            if compiled_step:
                hidden_states, flat = _compiled_decoding_step()(block, hidden_states, layer_state.flatten(), mask, seen)
                new_state = LayerState.unflatten(flat)
                block.cms.complete_chunks(new_state, mask, seen)  # eager: most tokens end no chunk (a host read)
            else:
                hidden_states, new_state = block(hidden_states, layer_state, mask, seen)
            new_states.append(new_state)
        hidden_states = self.norm(touch_parameters(hidden_states, self.parameters()))
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None:
            cache.commit(new_states, seen + mask.long().sum(1), past_columns + length)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_NAME: cache if use_cache else None}
        )
        return output if return_dict else output.to_tuple()

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype of the fast-weight state (float32 for half-precision weights)."""
        return state_dtype(self.embed_tokens.weight.dtype)

    @property
    def compiles_decoding(self) -> bool:
        """Whether single-token calls run `_compiled_decoding_step` (`HopeConfig.compile_decoding`; the
        self-modifying mixer with in-context updates and the chunked scans, whose decoding step has no
        host reads)."""
        config = self.config
        return (config.compile_decoding and config.mixer == "self_modifying" and config.in_context_updates
                and config.scan_implementation == "chunked")


class StatefulGenerationMixin:
    """generate() integration of a model that carries its own cache of fast weights (HOPE, and the
    HOPE-adapted Llama): no default DynamicCache, no `cache_implementation`, a user's cache of the
    model's `cache_class` is used (and expanded for beams), otherwise a fresh one per call.
    Put it before the `PreTrainedModel` / `GenerationMixin` bases."""

    cache_class: type

    def new_cache(self):
        """A fresh, empty cache for this model."""
        return self.cache_class(self.config)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length) -> None:
        user_cache = generation_cache(model_kwargs)
        name = self.cache_class.__name__
        if user_cache is not None:
            if not isinstance(user_cache, self.cache_class):
                raise TypeError(f"{CACHE_NAME} must be a {name}, got {type(user_cache).__name__}")
            if generation_config.cache_implementation is not None:
                raise ValueError(f"Pass either cache_implementation or {CACHE_NAME} to generate(), not both")
            user_cache._is_user_defined = True
            return
        if generation_config.cache_implementation is not None:
            raise ValueError(f"{type(self).__name__} carries its own {name}; cache_implementation="
                             f"{generation_config.cache_implementation!r} is not supported (leave it None)")
        if generation_config.use_cache is not False:
            model_kwargs[CACHE_NAME] = self.new_cache()

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None,
                                      **model_kwargs):
        # generate() expands inputs for beams / num_return_sequences but not a cache passed in by
        # the user: expand its per-sample state the same way.
        cache = generation_cache(model_kwargs)
        if expand_size > 1 and isinstance(cache, self.cache_class) and cache.seen_tokens is not None:
            cache.batch_repeat_interleave(expand_size)
        return super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )


class HopeForCausalLM(StatefulGenerationMixin, HopePreTrainedModel, GenerationMixin):
    cache_class = HopeCache
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HopeConfig) -> None:
        super().__init__(config)
        self.model = HopeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[HopeCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        past_key_values: Optional[HopeCache] = None,
        **kwargs,
    ) -> Union[CausalLMOutputWithPast, Tuple]:
        r"""labels: [B, T] token ids (or -100 to ignore); the model shifts them internally.
        cache: a `HopeCache` to continue from (`past_key_values=` is the same argument under the
        name transformers <= 5.23 uses); the output carries it under the installed version's name."""
        cache = resolve_cache(cache, past_key_values)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        kwargs.pop("output_attentions", None)  # HOPE's memories have no attention maps to return
        if labels is not None:
            reference = input_ids if input_ids is not None else inputs_embeds
            if reference is not None and tuple(labels.shape) != tuple(reference.shape[:2]):
                # Checked before the forward: a failed call must not have updated the cache.
                raise ValueError(f"labels must be [batch, seq_len] = {list(reference.shape[:2])}, "
                                 f"got shape {list(labels.shape)}")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **{CACHE_NAME: outputs.get(CACHE_NAME)}
        )
        return output if return_dict else output.to_tuple()


__all__ = ["HopePreTrainedModel", "HopeModel", "HopeForCausalLM", "scan_implementation"]
