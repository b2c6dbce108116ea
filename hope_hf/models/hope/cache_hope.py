"""`HopeCache`: the fast-weight state of a HOPE model, carried across forward and generate() calls,
and the typed state it holds (docs/design.md §6).

Per layer a `LayerState`: the short-convolution tail, each in-context memory's `MemoryState`
(chunk-start and current weights), the attention KV pairs of `mixer="attention"`, and each updated
CMS level's `CMSState` (fast weights, the open chunk's inputs, update counter). Everything is per
sample and batch-first (counters are `[B]` tensors), so beam reordering, `batch_select_indices`
and left padding are plain indexing. Cache-wide: `seen_tokens` [B] (real tokens per sample) and
`seen_columns` (input columns, pads included: what `generate()` asks `get_seq_length()` for).

`LayerState.flatten` / `unflatten` name every tensor as the cache file stores it:
- memories: `mem.<X>.<W>` (current) and `mem.<X>.<W>.start` (chunk start), X in k, v, eta, alpha, mem;
- `conv` [B, conv_window - 1, d]; attention `keys`/`values` [B, H, L, D] and `key_mask` [B, L];
- CMS level l: `cms.<l>.<gate|up|down>`, `cms.<l>.buffer` [B, C_l, d] (rows `[0, seen % C_l)` filled,
  the rest zero), `cms.<l>.num_updates` [B].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from transformers.cache_utils import Cache

from .configuration_hope import SELF_MODIFYING_MEMORIES

Tensors = Dict[str, torch.Tensor]


@dataclass
class MemoryState:
    """One in-context memory (docs/design.md §4): its weights at the start of the open chunk, where the
    inner gradients are taken, and now. Each: name -> [B, H, O, I] (`W1`, `W2` or `W`)."""

    start: Tensors
    current: Tensors

    @classmethod
    def fresh(cls, weights: Tensors) -> "MemoryState":
        """A memory at the start of a chunk: both states are `weights`."""
        return cls(dict(weights), dict(weights))

    def map(self, fn) -> "MemoryState":
        """`fn(name, tensor)` applied to both states; a weight the two share (one tensor, as in a fresh
        state or after a completed chunk) is mapped once and stays shared."""
        start = {name: fn(name, t) for name, t in self.start.items()}
        return MemoryState(start, {name: start[name] if t is self.start[name] else fn(name, t)
                                   for name, t in self.current.items()})

    def flatten(self, prefix: str = "") -> Tensors:
        out = {}
        for name, tensor in self.current.items():
            out[f"{prefix}{name}"] = tensor
            out[f"{prefix}{name}.start"] = self.start[name]
        return out

    @classmethod
    def unflatten(cls, tensors: Tensors, prefix: str = "") -> "MemoryState":
        names = [key[len(prefix):] for key in tensors if key.startswith(prefix) and not key.endswith(".start")]
        return cls({n: tensors[f"{prefix}{n}.start"] for n in names}, {n: tensors[f"{prefix}{n}"] for n in names})


@dataclass
class CMSState:
    """One in-context-updated CMS level (docs/design.md §5): the fast weights `theta` (`gate`, `up`
    [B, I, d], `down` [B, d, I]), the inputs of the open chunk `buffer` [B, C, d] (None: empty) and
    the updates made so far `num_updates` [B]."""

    theta: Tensors
    buffer: Optional[torch.Tensor]
    num_updates: torch.Tensor

    def flatten(self, prefix: str = "") -> Tensors:
        out = {f"{prefix}{name}": tensor for name, tensor in self.theta.items()}
        if self.buffer is not None:
            out[f"{prefix}buffer"] = self.buffer
        out[f"{prefix}num_updates"] = self.num_updates
        return out

    @classmethod
    def unflatten(cls, tensors: Tensors, prefix: str = "") -> "CMSState":
        theta = {key[len(prefix):]: t for key, t in tensors.items()
                 if key.startswith(prefix) and key[len(prefix):] not in ("buffer", "num_updates")}
        return cls(theta, tensors.get(f"{prefix}buffer"), tensors[f"{prefix}num_updates"])


# State tensors that hold projections' outputs: kept in the compute dtype of the call that wrote them
# (bf16 under autocast); every other floating-point tensor is in the state dtype.
COMPUTE_DTYPE_STATE = ("conv", "keys", "values")


@dataclass
class LayerState:
    """The state of one `HopeBlock` (all optional: an empty state is a layer before its first call)."""

    conv: Optional[torch.Tensor] = None  # [B, conv_window - 1, d]
    memories: Dict[str, MemoryState] = field(default_factory=dict)  # memory name -> state
    keys: Optional[torch.Tensor] = None  # [B, H, L, D]
    values: Optional[torch.Tensor] = None
    key_mask: Optional[torch.Tensor] = None  # [B, L] bool
    cms: Dict[int, CMSState] = field(default_factory=dict)  # level index -> state

    def copy(self) -> "LayerState":
        """A new state holding the same tensors, whose fields a forward may replace without touching this one."""
        return LayerState(self.conv, dict(self.memories), self.keys, self.values, self.key_mask, dict(self.cms))

    def flatten(self) -> Tensors:
        """name -> tensor, with the names of the cache file (module docstring)."""
        out = {name: getattr(self, name) for name in ("conv", "keys", "values", "key_mask") if getattr(self, name) is not None}
        for name, memory in self.memories.items():
            out.update(memory.flatten(f"mem.{name}."))
        for level, cms in self.cms.items():
            out.update(cms.flatten(f"cms.{level}."))
        return out

    @classmethod
    def unflatten(cls, tensors: Tensors) -> "LayerState":
        """The inverse of `flatten`."""
        memories = sorted({key.split(".")[1] for key in tensors if key.startswith("mem.")})
        levels = sorted({int(key.split(".")[1]) for key in tensors if key.startswith("cms.")})
        return cls(
            tensors.get("conv"),
            {name: MemoryState.unflatten(tensors, f"mem.{name}.") for name in memories},
            tensors.get("keys"), tensors.get("values"), tensors.get("key_mask"),
            {level: CMSState.unflatten(tensors, f"cms.{level}.") for level in levels},
        )

    def apply(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> "LayerState":
        """A state with `fn(name, tensor)` in place of every tensor."""
        return LayerState.unflatten({name: fn(name, tensor) for name, tensor in self.flatten().items()})

    def __bool__(self) -> bool:
        return bool(self.flatten())


CACHE_FORMAT = "hope-cache-v2"


def signature_diff(cached: dict, expected: dict) -> dict:
    """The fields where two state signatures differ: name -> (cached, expected)."""
    return {k: (cached.get(k), v) for k, v in expected.items() if cached.get(k) != v}


def _in_state_dtype(name: str, tensor: torch.Tensor) -> bool:
    """Whether a state tensor is kept in the state dtype: every floating-point tensor but the
    projections' outputs (attention KV pairs, the conv tail), which are in the compute dtype."""
    return tensor.is_floating_point() and name not in COMPUTE_DTYPE_STATE


def expected_layer_state(config, batch_size: int, seen_columns: int) -> Dict[str, tuple]:
    """The tensors one layer's state holds after a call, for `config`: name -> (shape, kind),
    kind "float" (fast weights and chunk buffers: the state dtype, one for all), "any-float"
    (`COMPUTE_DTYPE_STATE`: projections' outputs in the compute dtype), "long" (counters) or
    "bool" (masks)."""
    d, heads, dim = config.hidden_size, config.num_heads, config.head_dim
    spec: Dict[str, tuple] = {}
    if config.mixer == "attention":
        spec["keys"] = spec["values"] = ((batch_size, heads, seen_columns, dim), "float")
        spec["key_mask"] = ((batch_size, seen_columns), "bool")
    else:
        spec["conv"] = ((batch_size, config.conv_window - 1, d), "float")
        names = ("mem",) if config.mixer == "titans" else SELF_MODIFYING_MEMORIES
        if config.memory_type == "deep":
            weights = {"W1": (heads, dim, config.memory_dim), "W2": (heads, config.memory_dim, dim)}
        else:
            weights = {"W": (heads, dim, dim)}
        for name in names:
            for w, shape in weights.items():
                spec[f"mem.{name}.{w}"] = spec[f"mem.{name}.{w}.start"] = ((batch_size, *shape), "float")
    inner = config.cms_hidden_size
    for level, size in enumerate(config.cms_chunk_sizes):
        if size is None:
            continue
        spec[f"cms.{level}.gate"] = spec[f"cms.{level}.up"] = ((batch_size, inner, d), "float")
        spec[f"cms.{level}.down"] = ((batch_size, d, inner), "float")
        spec[f"cms.{level}.buffer"] = ((batch_size, size, d), "float")
        spec[f"cms.{level}.num_updates"] = ((batch_size,), "long")
    return {name: ((shape, "any-float") if name in COMPUTE_DTYPE_STATE else (shape, kind))
            for name, (shape, kind) in spec.items()}


def validate_state(tensors: Dict[str, torch.Tensor], config, seen_columns: int) -> List[str]:
    """What is wrong with the tensors of a saved cache (`seen_tokens`, `layers.<i>.<name>`) for
    `config`: missing, unexpected, misshapen or mistyped tensors, one message each."""
    seen = tensors.get("seen_tokens")
    if seen is None:
        return ["missing tensor 'seen_tokens'"]
    if seen.dim() != 1 or seen.dtype != torch.long:
        return [f"'seen_tokens' must be a [batch] int64 tensor, got {tuple(seen.shape)} {seen.dtype}"]
    expected = {"seen_tokens": ((seen.shape[0],), "long")}
    for i in range(config.num_hidden_layers):
        for name, spec in expected_layer_state(config, seen.shape[0], seen_columns).items():
            expected[f"layers.{i}.{name}"] = spec
    problems = [f"missing tensor {k!r}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k!r}" for k in tensors if k not in expected]
    float_dtypes = set()
    for key, (shape, kind) in expected.items():
        tensor = tensors.get(key)
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            problems.append(f"{key!r} has shape {tuple(tensor.shape)}, expected {shape}")
        if kind == "long" and tensor.dtype != torch.long or kind == "bool" and tensor.dtype != torch.bool:
            problems.append(f"{key!r} has dtype {tensor.dtype}, expected {'torch.int64' if kind == 'long' else 'torch.bool'}")
        if kind in ("float", "any-float") and not tensor.is_floating_point():
            problems.append(f"{key!r} has dtype {tensor.dtype}, expected a floating-point dtype")
        if kind == "float" and tensor.is_floating_point():
            float_dtypes.add(tensor.dtype)
    if len(float_dtypes) > 1:
        problems.append(f"the state mixes dtypes {sorted(str(d) for d in float_dtypes)}; a cache holds one")
    return problems


class BatchFirstOps:
    """`reorder_cache`, `batch_repeat_interleave` and `batch_select_indices` (what generate() calls for
    beams and batch selection) for state whose tensors are all batch-first: each runs the next base
    class's version, if it has one, then indexes this object's own tensors through
    `_apply_per_sample(fn)`, which the class defines."""

    _apply_per_sample: Callable[[Callable[[torch.Tensor], torch.Tensor]], None]

    def _index_all(self, method: str, argument, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        base = getattr(super(), method, None)
        if base is not None:
            base(argument)
        self._apply_per_sample(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_all("reorder_cache", beam_idx, lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_all("batch_repeat_interleave", repeats, lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_all("batch_select_indices", indices, lambda x: x[indices.to(x.device)])


class HopeCacheLayer(BatchFirstOps):
    """The state of one `HopeBlock` in a cache: a `LayerState`."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        self.state = LayerState()

    @property
    def is_initialized(self) -> bool:
        return bool(self.state)

    def _apply_per_sample(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.state = self.state.apply(lambda name, tensor: fn(tensor))

    def reset(self) -> None:
        self.state = LayerState()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("HopeCache cannot be cropped: fast weights cannot forget the tokens they have learned from")

    def offload(self) -> None:  # the state is small; nothing to offload
        pass

    def prefetch(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"HopeCacheLayer({len(self.state.flatten())} tensors)"


class HopeCache(BatchFirstOps, Cache):
    """Fast-weight memory states, CMS chunk buffers and counters (and KV pairs for
    `mixer="attention"`) of a [`HopeModel`], per sample.

    Args:
        config: the model's `HopeConfig`; a cache made for one config is refused by a model with
            different state shapes (see `HopeConfig.state_signature`).
    """

    is_compileable = False

    def __init__(self, config) -> None:
        super().__init__(layers=[HopeCacheLayer() for _ in range(config.num_hidden_layers)])
        self.signature = config.state_signature()
        self.seen_tokens: Optional[torch.Tensor] = None
        self.seen_columns = 0

    # --- what generate() and users ask -------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_columns

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.seen_columns + query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.seen_tokens is None else int(self.seen_tokens.shape[0])

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens is not None

    def cms_update_counts(self, layer_idx: int) -> List[Optional[torch.Tensor]]:
        """Per CMS level of a layer: how many fast-weight updates each sample has made ([B]),
        or None for a static level."""
        out = []
        for level, size in enumerate(self.signature["cms_chunk_sizes"]):
            level_state = self.layers[layer_idx].state.cms.get(level)
            out.append(None if size is None or level_state is None else level_state.num_updates)
        return out

    # --- batch manipulation (beam search, batch selection) ------------------------------------
    def _apply_per_sample(self, fn) -> None:  # the layers index their own state (Cache's methods)
        if self.seen_tokens is not None:
            self.seen_tokens = fn(self.seen_tokens)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = None
        self.seen_columns = 0

    # --- a forward's result --------------------------------------------------------------------
    def commit(self, layer_states: List[LayerState], seen_tokens: torch.Tensor, seen_columns: int) -> None:
        """Swap in the state a forward computed, all layers at once: a forward that fails part way
        never reaches this, so the cache keeps the state from before that call."""
        if len(layer_states) != len(self.layers):
            raise ValueError(f"commit: got {len(layer_states)} layer states for {len(self.layers)} layers")
        for layer, state in zip(self.layers, layer_states):
            layer.state = state
        self.seen_tokens = seen_tokens
        self.seen_columns = seen_columns

    # --- validation -----------------------------------------------------------------------------
    @property
    def state_dtype(self) -> Optional[torch.dtype]:
        """The dtype of the fast weights and chunk buffers (None before the first call or for an
        attention-only model)."""
        for layer in self.layers:
            for name, tensor in layer.state.flatten().items():
                if _in_state_dtype(name, tensor):
                    return tensor.dtype
        return None

    def check_compatible(self, config, batch_size: int, state_dtype: Optional[torch.dtype] = None) -> None:
        """Raise ValueError if this cache was made for another config, batch size or state dtype."""
        signature = config.state_signature()
        if signature != self.signature:
            diff = signature_diff(self.signature, signature)
            raise ValueError(f"cache is a HopeCache made for another model config; differing fields "
                             f"(cache, model): {diff}")
        if self.seen_tokens is not None and self.seen_tokens.shape[0] != batch_size:
            raise ValueError(f"cache holds state for batch size {self.seen_tokens.shape[0]}, but the "
                             f"input has batch size {batch_size}; use cache.batch_repeat_interleave or "
                             f"batch_select_indices to adapt it")
        mine = self.state_dtype
        if state_dtype is not None and mine is not None and mine != state_dtype:
            raise ValueError(f"cache holds fast weights in {mine}, but the model keeps them in {state_dtype}; "
                             f"load it with HopeCache.load(path, config, dtype={state_dtype}) or call "
                             f"cache.to(dtype={state_dtype})")

    def to(self, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> "HopeCache":
        """Move the state to `device` and/or convert its floating-point tensors to `dtype`
        (counters and masks keep theirs). In place; returns the cache."""
        def convert(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)

        for layer in self.layers:
            layer._apply_per_sample(convert)
        if self.seen_tokens is not None:
            self.seen_tokens = self.seen_tokens.to(device)
        return self

    # --- keep a memory: save / load -------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to one safetensors file (atomically: a failed save leaves no file)."""
        from safetensors.torch import save_file

        if self.seen_tokens is None:
            raise ValueError("HopeCache.save: the cache is empty (no token has been processed yet)")
        tensors = {"seen_tokens": self.seen_tokens.detach().contiguous().cpu()}
        for i, layer in enumerate(self.layers):
            for name, tensor in layer.state.flatten().items():
                # clone: a chunk-start state may be the current state itself (a chunk just
                # completed), and safetensors refuses tensors that share memory.
                tensors[f"layers.{i}.{name}"] = tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
        metadata = {"signature": json.dumps(self.signature, sort_keys=True), "seen_columns": str(self.seen_columns),
                    "format": CACHE_FORMAT}
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, config, device: str | torch.device | None = None,
             dtype: Optional[torch.dtype] = None) -> "HopeCache":
        """Read a cache written by `save`, refusing one made for another config or one whose
        tensors are missing, extra, or of the wrong shape or dtype for that config (the error
        names them). `dtype` converts its floating-point tensors (e.g. a float64 model's cache
        for a float32 model)."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device=str(device or "cpu")) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") == "hope-cache-v1":
                raise ValueError(f"{path} is a hope-cache-v1 file (CMS levels stored summed gradients); this version "
                                 f"stores the open chunk's inputs (hope-cache-v2): recompute the cache")
            if metadata.get("format") != CACHE_FORMAT:
                raise ValueError(f"{path} is not a HopeCache file (format={metadata.get('format')!r})")
            saved = json.loads(metadata["signature"])
            cache = cls(config)
            if saved != cache.signature:
                diff = signature_diff(saved, cache.signature)
                raise ValueError(f"{path} holds a HopeCache for another config; differing fields (file, config): {diff}")
            cache.seen_columns = int(metadata["seen_columns"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        problems = validate_state(tensors, config, cache.seen_columns)
        if problems:
            raise ValueError(f"{path} is not a valid HopeCache for this config: " + "; ".join(problems))
        cache.seen_tokens = tensors.pop("seen_tokens")
        per_layer: List[Tensors] = [{} for _ in cache.layers]
        for key, tensor in tensors.items():
            _, index, name = key.split(".", 2)
            per_layer[int(index)][name] = tensor
        for layer, state in zip(cache.layers, per_layer):
            layer.state = LayerState.unflatten(state)
        return cache.to(dtype=dtype) if dtype is not None else cache

    def __repr__(self) -> str:
        return f"HopeCache(batch_size={self.batch_size}, seen_columns={self.seen_columns}, layers={len(self.layers)})"
