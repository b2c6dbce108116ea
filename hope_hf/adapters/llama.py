"""HOPE adapter for pretrained Llama models (paper arXiv section 7.3, "level stacking").

`apply_hope_adapter(llama, HopeAdapterConfig(...))` turns a `LlamaForCausalLM` into a
`HopeLlamaForCausalLM`, in place (like `peft.get_peft_model`, the model you pass is the model you
get back). In every chosen decoder layer:

```
x = input_layernorm(h)
h = h + self_attn(x) + hope_gate * hope_mixer(x)      # self-modifying Titans beside attention
for level in hope_cms.levels (fastest first):          # added CMS levels
    h = h + level(norm(h))
h = h + mlp(post_attention_layernorm(h))               # the pretrained MLP = the slowest CMS level
```

The added modules are the core's (`SelfModifyingTitansMixer`, `ContinuumMemorySystem`,
`CMSLevel`, built from a `HopeConfig`); the pretrained MLP's `gate/up/down_proj` are moved into a
`CMSLevel` (same SwiGLU), so the base keeps its parameter names. At initialisation the adapted
model computes exactly the pretrained function: the gate is zero, and the added levels start with
`down_proj = 0` and value map `W_V = 0`, so their in-context update (the gradient of
`1/2 ||MLP(n) - n W_V||^2`) is exactly zero too and they output zero for any sequence length.

State (KV pairs of attention plus the HOPE fast weights, chunk buffers and per-sample counters of
every adapted layer) lives in one `HopeLlamaCache`; the streaming contract of the core holds:
any split of a sequence into calls gives the logits of one call, and a left-padded batch gives
each sequence its own logits (positions count real tokens per sample).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP
from transformers.utils.generic import can_return_tuple

from ..models.hope.cache_hope import BatchFirstOps, HopeCacheLayer, LayerState, signature_diff
from ..models.hope.configuration_hope import LEGACY_DEFAULTS, MEMORY_TYPES, HopeConfig
from ..models.hope.hf_compat import CACHE_NAME, resolve_cache
from ..models.hope.modeling_hope import (
    CMSLevel,
    ContinuumMemorySystem,
    HopePreTrainedModel,
    SelfModifyingTitansMixer,
    StatefulGenerationMixin,
    token_mask,
    touch_parameters,
)

ADAPTER_CONFIG_NAME = "hope_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "hope_adapter.safetensors"
_FORMAT = "hope-adapter-v3"
# HopeConfig fields that the adapter sets itself (from the base model or its own fields): they
# may not appear in `HopeAdapterConfig.hope_kwargs`.
_MANAGED_HOPE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "mixer", "memory_type",
    "memory_hidden_size", "chunk_size", "memory_chunk_size", "cms_chunk_sizes",
    "cms_intermediate_size", "cms_variant", "rms_norm_eps", "initializer_range",
)
# What older formats' modules computed with, for the HopeConfig fields that did not exist when they were
# written; loading puts these values under the saved `hope_kwargs`. v1 was written before
# `HopeConfig.memory_read` (`LEGACY_DEFAULTS`, less the fields the adapter config saves itself, such as
# `chunk_size`), v2 before `HopeConfig.linear_gradient`.
_LEGACY_FORMATS = {
    "hope-adapter-v1": {k: v for k, v in LEGACY_DEFAULTS.items() if k not in _MANAGED_HOPE_FIELDS},
    "hope-adapter-v2": {"linear_gradient": "chunk"},
}


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        accepted = "a positive int" + (" or None" if allow_none else "")
        raise ValueError(f"HopeAdapterConfig.{name} must be {accepted}, got {value!r}")


@dataclass
class HopeAdapterConfig:
    r"""What the HOPE adapter adds to a Llama model.

    Args:
        layers: Indices of the decoder layers to adapt (negative indices count from the end, as in
            Python); `None` adapts every layer.
        cms_chunk_sizes: Chunk sizes `C_l` of the CMS levels added before the pretrained MLP,
            fastest first (strictly increasing). Each added level is a SwiGLU MLP whose fast
            weights are updated in context every `C_l` tokens. May be empty.
        cms_intermediate_size: Hidden width of each added level (default: the model width).
        mlp_chunk_size: Chunk size of the pretrained MLP as the slowest CMS level: `None` (default)
            keeps it static (changed only by an outer optimizer, e.g. `MultiFrequency`); an int
            makes it update in context too (then it must exceed every added chunk size).
        self_modifying: Add the self-modifying Titans branch beside attention (behind a
            zero-initialised per-channel output gate).
        num_heads: Heads of the self-modifying memories (default: the model's attention heads).
        memory_type: `"deep"` or `"linear"` memories (see `HopeConfig`).
        memory_hidden_size: Hidden width of a deep memory (default: its head dim).
        chunk_size: `C` of the adaptive projections' memories (see `HopeConfig`).
        memory_chunk_size: `C_mem` of the main memory (see `HopeConfig`).
        trainable_pretrained_levels: Count the pretrained MLPs of the adapted layers as adapter
            parameters: `freeze_base` leaves them trainable and `save_hope_adapter` saves them
            (for continual learning where the slowest level learns too, at a low frequency).
        hope_kwargs: Further `HopeConfig` fields for the added modules (e.g. `eta_init`,
            `alpha_init`, `cms_eta_init`, `in_context_updates`, `scan_implementation`); the CMS
            levels' inner learning rate is HopeConfig's (`cms_eta_init`, the normalised step: stable
            at any width).
    """

    layers: Optional[List[int]] = None
    cms_chunk_sizes: List[int] = field(default_factory=lambda: [16, 128])
    cms_intermediate_size: Optional[int] = None
    mlp_chunk_size: Optional[int] = None
    self_modifying: bool = True
    num_heads: Optional[int] = None
    memory_type: str = "deep"
    memory_hidden_size: Optional[int] = None
    chunk_size: int = 16
    memory_chunk_size: int = 64
    trainable_pretrained_levels: bool = False
    hope_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, tuple):
                self.layers = list(self.layers)
            if (not isinstance(self.layers, list) or not self.layers
                    or any(isinstance(i, bool) or not isinstance(i, int) for i in self.layers)):
                raise ValueError(f"HopeAdapterConfig.layers must be None or a non-empty list of ints, "
                                 f"got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"HopeAdapterConfig.layers has duplicates: {self.layers!r}")
        if isinstance(self.cms_chunk_sizes, tuple):
            self.cms_chunk_sizes = list(self.cms_chunk_sizes)
        if not isinstance(self.cms_chunk_sizes, list):
            raise ValueError(f"HopeAdapterConfig.cms_chunk_sizes must be a list of positive ints, "
                             f"got {self.cms_chunk_sizes!r}")
        for size in self.cms_chunk_sizes:
            _positive_int("cms_chunk_sizes[...]", size)
        if any(b <= a for a, b in zip(self.cms_chunk_sizes, self.cms_chunk_sizes[1:])):
            raise ValueError(f"HopeAdapterConfig.cms_chunk_sizes must be strictly increasing (fastest level first), "
                             f"got {self.cms_chunk_sizes!r}")
        _positive_int("mlp_chunk_size", self.mlp_chunk_size, allow_none=True)
        if self.mlp_chunk_size is not None and self.cms_chunk_sizes and self.mlp_chunk_size <= self.cms_chunk_sizes[-1]:
            raise ValueError(f"HopeAdapterConfig.mlp_chunk_size ({self.mlp_chunk_size}) must exceed every added chunk "
                             f"size {self.cms_chunk_sizes} (the pretrained MLP is the slowest level), or be None")
        for name in ("cms_intermediate_size", "num_heads", "memory_hidden_size"):
            _positive_int(name, getattr(self, name), allow_none=True)
        for name in ("chunk_size", "memory_chunk_size"):
            _positive_int(name, getattr(self, name))
        for name in ("self_modifying", "trainable_pretrained_levels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HopeAdapterConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.memory_type not in MEMORY_TYPES:
            raise ValueError(f"HopeAdapterConfig.memory_type must be one of {list(MEMORY_TYPES)}, "
                             f"got {self.memory_type!r}")
        if not isinstance(self.hope_kwargs, dict):
            raise ValueError(f"HopeAdapterConfig.hope_kwargs must be a dict of HopeConfig fields, "
                             f"got {self.hope_kwargs!r}")
        managed = sorted(set(self.hope_kwargs) & set(_MANAGED_HOPE_FIELDS))
        if managed:
            raise ValueError(f"HopeAdapterConfig.hope_kwargs may not set {managed}: the adapter derives them from the "
                             f"base model or from its own fields")
        # Let HopeConfig validate the remaining knobs now (on a stand-in base) rather than at apply time.
        heads = self.num_heads or 1
        self.hope_config(LlamaConfig(hidden_size=8 * heads, intermediate_size=8, num_attention_heads=heads,
                                     num_key_value_heads=heads, num_hidden_layers=1, vocab_size=8), [], None)

    # --- derived --------------------------------------------------------------------------------
    def resolved_layers(self, num_hidden_layers: int) -> List[int]:
        """The adapted layer indices, non-negative and sorted; ValueError if one is out of range."""
        if self.layers is None:
            return list(range(num_hidden_layers))
        bad = [i for i in self.layers if not -num_hidden_layers <= i < num_hidden_layers]
        if bad:
            raise ValueError(f"HopeAdapterConfig.layers {bad} out of range for a model with {num_hidden_layers} "
                             f"decoder layers (accepted: {-num_hidden_layers} .. {num_hidden_layers - 1})")
        resolved = sorted(i % num_hidden_layers for i in self.layers)
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"HopeAdapterConfig.layers {self.layers} name the same layer twice")
        return resolved

    def hope_config(self, base: LlamaConfig, cms_chunk_sizes: List[Optional[int]],
                    intermediate_size: Optional[int]) -> HopeConfig:
        """A `HopeConfig` for modules of width `base.hidden_size` with the given CMS levels."""
        kwargs = dict(self.hope_kwargs)
        return HopeConfig(
            vocab_size=base.vocab_size, hidden_size=base.hidden_size, num_hidden_layers=base.num_hidden_layers,
            num_heads=self.num_heads or base.num_attention_heads, mixer="self_modifying",
            memory_type=self.memory_type, memory_hidden_size=self.memory_hidden_size, chunk_size=self.chunk_size,
            memory_chunk_size=self.memory_chunk_size, cms_chunk_sizes=cms_chunk_sizes,
            cms_intermediate_size=intermediate_size or base.hidden_size, cms_variant="sequential",
            rms_norm_eps=base.rms_norm_eps, initializer_range=base.initializer_range, **kwargs,
        )

    def check_base(self, base: LlamaConfig) -> None:
        """Raise ValueError if the adapter cannot be applied to a model with this config."""
        self.resolved_layers(base.num_hidden_layers)
        if getattr(base, "hidden_act", "silu") != "silu" or getattr(base, "mlp_bias", False):
            raise ValueError(f"The HOPE adapter turns the Llama MLP into a CMS level, a bias-free SwiGLU: it needs "
                             f"hidden_act='silu' and mlp_bias=False, got hidden_act={base.hidden_act!r}, "
                             f"mlp_bias={base.mlp_bias!r}")
        heads = self.num_heads or base.num_attention_heads
        if base.hidden_size % heads != 0:
            raise ValueError(f"HopeAdapterConfig.num_heads ({heads}) must divide the model's hidden_size "
                             f"({base.hidden_size})")

    # --- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "HopeAdapterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown HopeAdapterConfig fields {unknown}; accepted: {sorted(known)}")
        return cls(**data)


def base_signature(config: LlamaConfig) -> Dict[str, Any]:
    """The base-model fields an adapter's weights depend on (an adapter refuses another base)."""
    return {name: getattr(config, name, None) for name in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    )}


# --- the adapted decoder layer ------------------------------------------------------------------
@dataclass
class HopeLlamaContext:
    """What `HopeLlamaForCausalLM.forward` hands every adapted layer (through the decoder layers'
    `**kwargs`): this call's real-token mask [B, T], the real tokens seen before it [B], and the
    HOPE state of each adapted layer at the start of the call. Layers write their end state into
    `states_out` and never modify `states_in`, so a gradient-checkpointing recompute reads the
    same state as the first pass."""

    mask: torch.Tensor
    seen: torch.Tensor
    states_in: Dict[int, LayerState]
    states_out: Dict[int, LayerState] = field(default_factory=dict)


def _init_new_modules(config: HopeConfig, *modules: nn.Module) -> None:
    """Initialise freshly built HOPE modules exactly as a `HopePreTrainedModel` would."""
    initializer = HopePreTrainedModel(config)
    for module in modules:
        for submodule in module.modules():
            initializer._init_weights(submodule)


def _pretrained_level(mlp: LlamaMLP, config: HopeConfig) -> CMSLevel:
    """The pretrained Llama MLP as a CMS level (`config.cms_chunk_sizes[0]`): the level's SwiGLU
    weights *are* the MLP's linear layers (moved, not copied, so they keep their names)."""
    level = CMSLevel(config, config.cms_chunk_sizes[0])
    _init_new_modules(config, level)  # value map and inner rates of an in-context-updated level
    level.gate_proj, level.up_proj, level.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    return level


class HopeLlamaDecoderLayer(LlamaDecoderLayer):
    """A `LlamaDecoderLayer` with a self-modifying Titans branch beside attention and CMS levels
    before its MLP, which becomes the slowest CMS level (see the module docstring).

    Built from a pretrained layer, whose modules it takes over (`self_attn`, the norms, the MLP
    weights) under their original names. HOPE state keys: the mixer's (`conv`, `mem.*`), the added
    levels' `cms.0 .. cms.{n-1}` and the pretrained level's `cms.{n}` (when it updates in context).
    """

    def __init__(
        self, base: LlamaDecoderLayer, layer_idx: int, adapter: HopeAdapterConfig, config: LlamaConfig
    ) -> None:
        # Not LlamaDecoderLayer.__init__: that would build a second attention and MLP.
        GradientCheckpointingLayer.__init__(self)
        self.layer_idx = layer_idx
        self.hidden_size = base.hidden_size
        self.self_attn = base.self_attn
        self.input_layernorm = base.input_layernorm
        self.post_attention_layernorm = base.post_attention_layernorm
        added = adapter.hope_config(config, adapter.cms_chunk_sizes, adapter.cms_intermediate_size)
        pretrained = adapter.hope_config(config, [adapter.mlp_chunk_size], config.intermediate_size)
        self.mlp = _pretrained_level(base.mlp, pretrained)
        self.hope_cms = ContinuumMemorySystem(added)
        _init_new_modules(added, self.hope_cms)
        with torch.no_grad():
            for level in self.hope_cms.levels:
                # Zero output and zero stored value: the level outputs 0 and its in-context
                # gradient is 0 until the outer optimiser moves these weights.
                level.down_proj.weight.zero_()
                level.value_proj.weight.zero_()
        if adapter.self_modifying:
            self.hope_mixer = SelfModifyingTitansMixer(added)
            _init_new_modules(added, self.hope_mixer)
        else:
            self.hope_mixer = None
        reference = base.input_layernorm.weight
        for module in (self.mlp, self.hope_cms, self.hope_mixer):
            if module is not None:
                module.to(device=reference.device, dtype=reference.dtype)
        gate = torch.zeros_like(reference) if adapter.self_modifying else None
        self.hope_gate = None if gate is None else nn.Parameter(gate)
        self._mlp_level = len(self.hope_cms.levels)  # the pretrained MLP's index among the layer's CMS levels
        self._trainable_pretrained_levels = adapter.trainable_pretrained_levels

    def adapter_named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """The parameters the adapter added (plus the pretrained MLP if `trainable_pretrained_levels`)."""
        pretrained = ("mlp.gate_proj.", "mlp.up_proj.", "mlp.down_proj.")
        for name, param in self.named_parameters():
            if not name.startswith(("hope_", "mlp.")):
                continue
            if self._trainable_pretrained_levels or not name.startswith(pretrained):
                yield name, param

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache=None,
        use_cache: Optional[bool] = False,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        hope_context: Optional[HopeLlamaContext] = None,
        past_key_values=None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states: [B, T, d] -> [B, T, d]. `cache` is Llama's attention cache (transformers
        <= 5.23 passes it as `past_key_values`)."""
        cache = resolve_cache(cache, past_key_values)
        if hope_context is None:
            raise ValueError("HopeLlamaDecoderLayer needs the hope_context that HopeLlamaForCausalLM.forward passes: "
                             "call the adapted model (not its inner LlamaModel)")
        mask, seen = hope_context.mask, hope_context.seen
        state = hope_context.states_in.get(self.layer_idx, LayerState()).copy()
        x = self.input_layernorm(hidden_states)
        mixed, _ = self.self_attn(
            hidden_states=x, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
            position_embeddings=position_embeddings, **{CACHE_NAME: cache}, **kwargs,
        )
        if self.hope_mixer is not None:
            mixed = mixed + self.hope_gate * self.hope_mixer(x, state, mask, seen)
        hidden_states = self.hope_cms(hidden_states + mixed, state, mask, seen)
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), state,
                                                 self._mlp_level, mask, seen)
        hope_context.states_out[self.layer_idx] = state
        # Every adapter parameter gets a gradient on any length (DDP needs it; see touch_parameters).
        return touch_parameters(hidden_states, (p for _, p in self.adapter_named_parameters()))


# --- the combined cache -------------------------------------------------------------------------
class HopeLlamaCache(BatchFirstOps, DynamicCache):
    """Llama's attention KV pairs (a `DynamicCache`) plus, per adapted layer, the HOPE state
    (a `HopeCacheLayer`: fast weights, chunk buffers, `cms.<l>.num_updates` [B]), the real tokens
    seen per sample (`seen_tokens` [B]) and the attention mask of the past columns
    (`token_mask` [B, L], so a later call may pass a mask over its own tokens only).

    Everything is batch-first, so beam reordering, `batch_select_indices` and
    `batch_repeat_interleave` index every piece the same way. It cannot be cropped: fast weights
    cannot forget what they have learned (assisted decoding is refused for this reason).
    """

    def __init__(self, model: "HopeLlamaForCausalLM") -> None:
        super().__init__(config=model.config)
        adapter = model.hope_adapter_config
        self.hope_layers: Dict[int, HopeCacheLayer] = {
            i: HopeCacheLayer() for i in adapter.resolved_layers(model.config.num_hidden_layers)
        }
        self.signature = _state_signature(model)
        self.seen_tokens: Optional[torch.Tensor] = None
        self.token_mask: Optional[torch.Tensor] = None

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("HopeLlamaCache cannot be cropped: fast weights cannot forget the tokens they have "
                         "learned from")

    def _apply_per_sample(self, fn) -> None:
        for layer in self.hope_layers.values():
            layer._apply_per_sample(fn)
        if self.seen_tokens is not None:
            self.seen_tokens = fn(self.seen_tokens)
            self.token_mask = fn(self.token_mask)

    def reset(self) -> None:
        # DynamicLayer.reset drops its tensors, so a reset cache starts a new stream.
        super().reset()
        for layer in self.hope_layers.values():
            layer.reset()
        self.seen_tokens = None
        self.token_mask = None

    def attention_snapshot(self) -> List[Dict[str, Any]]:
        """What each attention layer holds now. Its tensors are replaced, never written in place,
        by an update, so keeping the references is enough to restore them."""
        return [dict(vars(layer)) for layer in self.layers]

    def restore_attention(self, snapshot: List[Dict[str, Any]]) -> None:
        """Put back what `attention_snapshot` saw (layers created since are dropped)."""
        del self.layers[len(snapshot):]
        for layer, saved in zip(self.layers, snapshot):
            vars(layer).clear()
            vars(layer).update(saved)

    def hope_state(self, layer_idx: int) -> LayerState:
        """The HOPE state of one adapted layer (a `LayerState` of batch-first tensors)."""
        if layer_idx not in self.hope_layers:
            raise ValueError(f"layer_idx {layer_idx} is not an adapted layer; adapted: {sorted(self.hope_layers)}")
        return self.hope_layers[layer_idx].state

    def cms_update_counts(self, layer_idx: int) -> List[Optional[torch.Tensor]]:
        """Per CMS level of an adapted layer, fastest first and the pretrained MLP last: the in-context
        updates each sample has made ([B]), or None for a static level or before the first call."""
        state = self.hope_state(layer_idx)
        sizes = self.signature["adapter"]["cms_chunk_sizes"] + [self.signature["adapter"]["mlp_chunk_size"]]
        return [None if size is None or level not in state.cms else state.cms[level].num_updates
                for level, size in enumerate(sizes)]

    def check_compatible(self, model: "HopeLlamaForCausalLM", batch_size: int) -> None:
        """Raise ValueError if this cache was made for another model or batch size."""
        expected = _state_signature(model)
        if expected != self.signature:
            raise ValueError(f"cache is a HopeLlamaCache made for another adapted model; differing fields "
                             f"(cache, model): {signature_diff(self.signature, expected)}")
        if self.seen_tokens is not None and self.seen_tokens.shape[0] != batch_size:
            raise ValueError(f"cache holds state for batch size {self.seen_tokens.shape[0]}, but the input "
                             f"has batch size {batch_size}; use cache.batch_repeat_interleave or batch_select_indices")

    def __repr__(self) -> str:
        batch = -1 if self.seen_tokens is None else self.seen_tokens.shape[0]
        return (f"HopeLlamaCache(batch_size={batch}, seq_length={self.get_seq_length()}, "
                f"adapted_layers={sorted(self.hope_layers)})")


def _state_signature(model: "HopeLlamaForCausalLM") -> Dict[str, Any]:
    adapter = model.hope_adapter_config.to_dict()
    adapter["layers"] = model.hope_adapter_config.resolved_layers(model.config.num_hidden_layers)
    return {"base": base_signature(model.config), "adapter": adapter}


# --- the adapted model --------------------------------------------------------------------------
class HopeLlamaForCausalLM(StatefulGenerationMixin, LlamaForCausalLM):
    """A `LlamaForCausalLM` with the HOPE adapter (see the module docstring). Get one with
    `apply_hope_adapter(llama, adapter_config)` or `load_hope_adapter(llama, folder)`;
    `HopeLlamaForCausalLM(llama_config, adapter_config)` builds a randomly initialised one."""

    _is_stateful = True  # generate() refuses assisted decoding: the fast weights cannot roll back
    cache_class = HopeLlamaCache  # generate() hooks: `StatefulGenerationMixin`
    hope_adapter_config: HopeAdapterConfig

    def __init__(self, config: LlamaConfig, adapter_config: HopeAdapterConfig) -> None:
        super().__init__(config)
        _adapt_in_place(self, adapter_config)

    def adapted_layers(self) -> Dict[int, HopeLlamaDecoderLayer]:
        return {i: layer for i, layer in enumerate(self.model.layers) if isinstance(layer, HopeLlamaDecoderLayer)}

    def adapter_named_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """`(name, parameter)` of every adapter parameter, named as in this model's state dict."""
        for i, layer in self.adapted_layers().items():
            for name, param in layer.adapter_named_parameters():
                yield f"model.layers.{i}.{name}", param

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[HopeLlamaCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        past_key_values: Optional[HopeLlamaCache] = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""As `LlamaForCausalLM.forward`. `attention_mask` may cover this call's tokens or past + this
        call's tokens; `position_ids` default to the count of real tokens before each token, per sample.
        `cache` (or `past_key_values`, its name in transformers <= 5.23) is updated only if the whole
        call succeeds."""
        cache = resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is not None and not isinstance(cache, HopeLlamaCache):
            raise TypeError(f"cache must be a HopeLlamaCache (attention KV pairs plus the HOPE state), "
                            f"got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = HopeLlamaCache(self)
        if cache is not None:
            cache.check_compatible(self, batch)
        past_mask = cache.token_mask if cache is not None else None
        past_columns = 0 if past_mask is None else past_mask.shape[1]
        # Same mask rules as the core HopeModel.
        mask = token_mask(attention_mask, batch, length, past_columns, reference.device)
        full_mask = mask if past_mask is None else torch.cat([past_mask.to(mask.device), mask], dim=1)
        if cache is not None and cache.seen_tokens is not None:
            seen = cache.seen_tokens.to(reference.device)
        else:
            seen = torch.zeros(batch, dtype=torch.long, device=reference.device)
        if position_ids is None:
            # Positions count real tokens per sample, so a left-padded sequence sees the positions
            # (and RoPE angles) it sees alone.
            position_ids = (seen[:, None] + mask.long().cumsum(1) - 1).clamp(min=0)
        states_in = {i: layer.state for i, layer in cache.hope_layers.items()} if cache is not None else {}
        context = HopeLlamaContext(mask=mask, seen=seen, states_in=states_in)
        # Llama's layers append to the attention cache as they run: keep what it held, to put back
        # if the call fails part way (the HOPE state is only swapped in at the end).
        attention_snapshot = cache.attention_snapshot() if cache is not None else None
        try:
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=None if bool(full_mask.all()) else full_mask.long(),
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=cache is not None,
                logits_to_keep=logits_to_keep,
                hope_context=context,
                return_dict=True,
                **{CACHE_NAME: cache},
                **kwargs,
            )
        except BaseException:
            if cache is not None:
                cache.restore_attention(attention_snapshot)
            raise
        if cache is not None:
            for i, state in context.states_out.items():
                cache.hope_layers[i].state = state
            cache.seen_tokens = seen + mask.long().sum(1)
            cache.token_mask = full_mask
        return outputs  # Llama's forward returns the cache it was given, under CACHE_NAME

    def new_cache(self) -> HopeLlamaCache:
        return HopeLlamaCache(self)


def _adapt_in_place(model: LlamaForCausalLM, adapter_config: HopeAdapterConfig) -> None:
    adapter_config.check_base(model.config)
    for i in adapter_config.resolved_layers(model.config.num_hidden_layers):
        model.model.layers[i] = HopeLlamaDecoderLayer(model.model.layers[i], i, adapter_config, model.config)
    model.hope_adapter_config = adapter_config


def apply_hope_adapter(model: LlamaForCausalLM, adapter_config: HopeAdapterConfig) -> HopeLlamaForCausalLM:
    """Turn a `LlamaForCausalLM` into a `HopeLlamaForCausalLM`, in place, and return it.

    At this point its logits equal the original's for any input (the added branches are gated or
    zero-initialised); the pretrained weights are the same tensors, under the same names.
    Raises ValueError for another model class, an already adapted model, or a config that does not
    fit the model (layer index out of range, heads that do not divide the width, non-SwiGLU MLP).
    """
    if not isinstance(adapter_config, HopeAdapterConfig):
        raise ValueError(f"adapter_config must be a HopeAdapterConfig, got {type(adapter_config).__name__}")
    if isinstance(model, HopeLlamaForCausalLM):
        raise ValueError("model already carries a HOPE adapter; apply it to a plain LlamaForCausalLM")
    if type(model) is not LlamaForCausalLM:
        hint = " (apply the HOPE adapter before wrapping the model with peft)" if hasattr(model, "peft_config") else ""
        raise ValueError(f"apply_hope_adapter expects a transformers LlamaForCausalLM (model_type 'llama'), got "
                         f"{type(model).__name__}{hint}")
    _adapt_in_place(model, adapter_config)
    # In place, like peft: the Llama object becomes the adapted model (same modules, new forward).
    model.__class__ = HopeLlamaForCausalLM
    return model


# --- training helpers ---------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> HopeLlamaForCausalLM:
    """The HopeLlamaForCausalLM inside `model` (itself, or the base of a peft model)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, HopeLlamaForCausalLM):
        raise ValueError(f"model must be a HopeLlamaForCausalLM (or a peft model wrapping one), "
                         f"got {type(model).__name__}")
    return inner


def freeze_base(model: nn.Module) -> int:
    """Make only the adapter parameters (and LoRA parameters, if `model` is a peft model) trainable.

    Works on a `HopeLlamaForCausalLM` or on a peft model wrapping one (call it after
    `get_peft_model`, which freezes everything but LoRA). Returns the number of trainable values.
    """
    adapter = {id(p) for _, p in _unwrap(model).adapter_named_parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in adapter or "lora_" in name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter's weights, keyed as in the `HopeLlamaForCausalLM` state dict (detached, CPU)."""
    state = {}
    for name, param in _unwrap(model).adapter_named_parameters():
        if "lora_" in name:
            # LoRA weights on an adapter module (target "q_proj" also matches hope_mixer.q_proj) are
            # peft's to save.
            continue
        # A LoRA-wrapped adapter module keeps its own weight as `<module>.base_layer.weight`: save it under
        # the plain name, so the file loads into an un-wrapped model (then peft re-applies its delta).
        state[name.replace(".base_layer.", ".")] = param.detach().cpu().contiguous()
    return state


def save_hope_adapter(model: nn.Module, save_directory: Union[str, os.PathLike]) -> None:
    """Save the adapter alone: `hope_adapter.safetensors` (its weights) and `hope_adapter_config.json`
    (its config and the base model's signature), a few MB rather than the whole model.

    Each file is written to a temporary name and renamed into place, so a failed save leaves no
    half-written file; the weights' metadata repeats the config, and `load_hope_adapter` refuses a
    folder whose two files do not belong together.
    """
    from safetensors.torch import save_file

    hope = _unwrap(model)
    tensors = adapter_state_dict(hope)
    payload = {"format": _FORMAT, "adapter_config": hope.hope_adapter_config.to_dict(),
               "base_signature": base_signature(hope.config)}
    text = json.dumps(payload, indent=2, sort_keys=True)
    directory = os.fspath(save_directory)
    if os.path.isfile(directory):
        raise ValueError(f"save_directory {directory!r} is a file, not a folder")
    os.makedirs(directory, exist_ok=True)

    def write_atomically(name: str, write) -> None:
        handle, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        os.close(handle)
        try:
            write(tmp)
            os.replace(tmp, os.path.join(directory, name))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_json(path: str) -> None:
        with open(path, "w") as f:
            f.write(text + "\n")

    metadata = {"format": _FORMAT, "config": text}
    write_atomically(ADAPTER_WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata=metadata))
    write_atomically(ADAPTER_CONFIG_NAME, write_json)


def load_hope_adapter(model: LlamaForCausalLM, directory: Union[str, os.PathLike]) -> HopeLlamaForCausalLM:
    """Apply a saved adapter to a (fresh) base model, in place, and return the adapted model.

    Raises ValueError if the folder is not a complete adapter, was saved for another base model
    (vocabulary, sizes), or its weights do not match its config.
    """
    from safetensors import safe_open

    directory = os.fspath(directory)
    config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    missing = [p for p in (config_path, weights_path) if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{directory!r} is not a saved HOPE adapter: missing {[os.path.basename(p) for p in missing]}")
    with open(config_path) as f:
        text = f.read().strip()
    payload = json.loads(text)
    if payload.get("format") != _FORMAT and payload.get("format") not in _LEGACY_FORMATS:
        raise ValueError(f"{config_path} is not a HOPE adapter config (format={payload.get('format')!r})")
    adapter_config = dict(payload["adapter_config"])
    if payload["format"] in _LEGACY_FORMATS:
        adapter_config["hope_kwargs"] = {**_LEGACY_FORMATS[payload["format"]], **adapter_config.get("hope_kwargs", {})}
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        expected = base_signature(model.config)
        if payload["base_signature"] != expected:
            raise ValueError(f"The adapter in {directory!r} was saved for another base model; differing fields "
                             f"(adapter, model): {signature_diff(payload['base_signature'], expected)}")
    with safe_open(weights_path, framework="pt") as f:
        if (f.metadata() or {}).get("config", "").strip() != text:
            raise ValueError(f"{weights_path} and {config_path} do not belong to the same save (an interrupted "
                             f"save?); save the adapter again")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    hope = apply_hope_adapter(model, HopeAdapterConfig.from_dict(adapter_config))
    params = dict(hope.adapter_named_parameters())
    if set(params) != set(tensors):
        raise ValueError(f"The adapter weights do not match its config: missing {sorted(set(params) - set(tensors))}, "
                         f"unexpected {sorted(set(tensors) - set(params))}")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ValueError(f"Adapter weight {name} has shape {tuple(tensors[name].shape)}, the model expects "
                                 f"{tuple(param.shape)}")
            param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))
    return hope


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "HopeAdapterConfig",
    "HopeLlamaCache",
    "HopeLlamaContext",
    "HopeLlamaDecoderLayer",
    "HopeLlamaForCausalLM",
    "adapter_state_dict",
    "apply_hope_adapter",
    "base_signature",
    "freeze_base",
    "load_hope_adapter",
    "save_hope_adapter",
]
