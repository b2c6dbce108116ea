"""Configuration of HOPE models (self-modifying Titans + Continuum Memory System).

Every knob of the model lives here (the math: docs/design.md). Invalid values raise
`ValueError` naming the field and what is accepted, at construction time.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from transformers import PretrainedConfig

MIXERS = ("self_modifying", "titans", "attention")
MEMORY_TYPES = ("deep", "linear")
CMS_VARIANTS = ("sequential", "independent")
ACTIVATIONS = ("silu", "gelu", "tanh")
SELF_MODIFYING_MEMORIES = ("k", "v", "eta", "alpha", "mem")
SCAN_IMPLEMENTATIONS = ("chunked", "reference")
MEMORY_READS = ("token", "chunk", "token_output")
LINEAR_GRADIENTS = ("token", "chunk")
DEEP_OUTPUT_GRADIENTS = ("token", "chunk")
FLA_DTYPES = ("bfloat16", "float16", "float32")
# The fields that take one of a fixed set of strings.
CHOICES = {
    "mixer": MIXERS, "memory_type": MEMORY_TYPES, "memory_activation": ACTIVATIONS, "cms_variant": CMS_VARIANTS,
    "scan_implementation": SCAN_IMPLEMENTATIONS, "memory_read": MEMORY_READS, "fla_dtype": FLA_DTYPES,
    "linear_gradient": LINEAR_GRADIENTS, "deep_output_gradient": DEEP_OUTPUT_GRADIENTS,
}


# Fields whose default changed after hope-hf 0.1.0 in a way that changes what a model computes (not
# just how it is initialised), with the value 0.1.0 computed with. A saved config that lacks one
# (`HopeConfig.from_dict`), or a v1 adapter's `hope_kwargs`, gets that value, so a checkpoint keeps
# computing what it computed when it was saved.
LEGACY_DEFAULTS = {"memory_read": "chunk", "eta_max": 0.5, "dgd_step_bound": False, "linear_gradient": "chunk",
                   "chunk_size": 16, "deep_output_gradient": "chunk"}


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_float(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_float(value) -> bool:
    return _is_float(value) and value > 0


def _optional(test):
    return lambda value: value is None or test(value)


def _check(config, name: str, test, accepted: str) -> None:
    value = getattr(config, name)
    if not test(value):
        raise ValueError(f"HopeConfig.{name} must be {accepted}, got {value!r}")


class HopeConfig(PretrainedConfig):
    r"""Configuration of a [`HopeModel`] / [`HopeForCausalLM`].

    Args:
        vocab_size: Number of tokens of the vocabulary.
        hidden_size: Model width `d`.
        num_hidden_layers: Number of `HopeBlock`s.
        num_heads: Heads `H` of the sequence mixer; `head_dim = hidden_size // num_heads`.
        mixer: `"self_modifying"` (self-modifying Titans, paper Eq. 83-91), `"titans"` (static
            projections, one deep memory) or `"attention"` (Hope-Attention: causal softmax attention).
        memory_type: `"deep"` (residual 2-layer MLP memory, paper Eq. 89) or `"linear"` (`M(z) = W z`).
        memory_hidden_size: Hidden width `d_mem` of a deep memory (per head). Defaults to `head_dim`.
        memory_activation: Activation inside deep memories and after the short convolution.
        chunk_size: `C`, chunk size of the adaptive projections' memories (`M_k, M_v, M_eta, M_alpha`):
            inside a chunk they are read, and their gradients taken, at the chunk-start state. Default 64
            (was 16; docs/design.md §8.21): holding the keys and values a token gets fixed over 64 tokens
            lets a pair written early be found by a later query (MQAR 4 pairs 0.462 against 0.308 at 16,
            Llama 0.455), and trains ~1.4x faster.
        memory_chunk_size: `C_mem`, the same for the main memory `M_mem` (and the titans memory): its
            inner gradients are taken at the chunk-start state.
        memory_read: Which state of the main memory `M_mem` a token reads: `"token"` the current
            state, `o_t = M_{t-1}(q_t)` (paper Eq. 88: a write is visible to the next token), or
            `"chunk"` the state at the start of the token's chunk (paper Eq. 90: nothing written
            in a chunk is visible before it ends). Default `"token"`: with `"chunk"` a prompt shorter
            than `memory_chunk_size` cannot recall through `M_mem` (docs/design.md §8.6). `"token_output"`
            (deep memories; a linear one reads as with `"token"`): the output layer at the current state and
            the hidden layer at the chunk start, `o_t = q_t + W1_{t-1} act(W2_S q_t)`, the hidden features
            that W1's writes of the chunk were computed on (W2's DGD erase at eta ~1 removes the hidden
            layer's response to each written key; docs/design.md §8.22).
        linear_gradient: Where a linear memory takes its inner gradient (and a self-generated target):
            `"token"` at the current state `W_{t-1}` (the per-token DGD of paper Eq. 88, exact in the
            chunked path as one triangular solve), or `"chunk"` at the chunk-start state, as deep memories
            do (the Titans approximation). Default (None): `"token"` for the self-modifying mixer, whose
            linear memories can grow without bound over a long chunk with `"chunk"`, and `"chunk"` for
            the titans mixer, which learns recall better with it and stays bounded (docs/design.md §8.20);
            the resolved value is what the config holds and saves. Checkpoints saved before this field
            existed compute with `"chunk"`. Deep memories ignore it.
        deep_output_gradient: Where a deep memory `M(z) = z + W1 act(W2 z)` takes the inner gradient of its
            output layer W1: `"chunk"` at the chunk-start state like W2 (paper Eq. 90, the Titans
            approximation: the writes of one chunk cannot correct each other), or `"token"` at the current
            `W1_{t-1}`, with the hidden features `act(W2 k)` still at the chunk-start W2: a delta rule on
            those features (exact in the chunked path as one triangular solve, like `linear_gradient`).
            W2's gradient is always taken at the chunk-start state. Linear memories ignore it.
        eta_max: Upper bound of the per-token inner learning rate `eta_t = eta_max * sigmoid(.)`, in
            (0, 2]. Above 1 the DGD transition `alpha I - eta u~ u~^T` gets eigenvalues below 0 along
            the key (state tracking, Grazzi et al. 2024); `primitives.step_bound` keeps the step
            stable at any eta below 2. Default 2 (docs/design.md §8.5).
        dgd_step_bound: Bound each DGD gradient step by the curvature of the whole inner loss, the
            self-generated target's dependence on the state included (`primitives.step_bound`, a
            stop-gradient factor >= 1; docs/design.md §3.2, §8.4). `False` takes the plain normalised
            step, which can diverge for trained weights at large eta (what checkpoints saved before
            the bound existed compute with).
        eta_init: Initial inner learning rate as a fraction of `eta_max` (eta = 1 at init with the
            default eta_max 2; docs/design.md §8.7).
        alpha_init: Initial retention `alpha_t`, near 1 so that decay does not drown the writes
            (docs/design.md §8.7).
        conv_window: Window of the causal depthwise convolution of the non-adaptive stage.
        cms_chunk_sizes: One Continuum Memory System level per entry, fastest first; an int `C_l` is
            a level whose fast weights are updated every `C_l` tokens, `None` a static level
            (updated only by the outer optimizer). `[None]` is a plain Transformer-style MLP.
        cms_intermediate_size: Hidden width of each CMS level (SwiGLU). Defaults to `~8/3 d`
            rounded up to a multiple of 32.
        cms_variant: `"sequential"` (chained levels, paper Eq. 73) or `"independent"` (levels read
            the same input, outputs mixed with learned weights, paper Eq. 74).
        cms_eta_init: Initial inner learning rate `eta_l = softplus(.)` of the CMS levels' normalised
            step (each update moves a level about this fraction of the way to fitting its chunk;
            stable below 2).
        cms_alpha_init: Initial retention `alpha_l = sigmoid(.)` of the CMS levels.
        scan_implementation: How the memories and CMS levels are computed: `"chunked"` (default,
            chunk-parallel: `dgd_chunk.py`, `cms_chunk.py`) or `"reference"` (the per-token loops of
            `dgd_naive.py`, `cms_naive.py` that read like the equations). Both give the same outputs
            and states; `hope_hf.scan_implementation(model, name)` overrides it for a block of code.
        scan_recompute_threshold: Training memory of the chunked path: a call that spans more than
            this many chunks of a memory recomputes the scan's activations in the backward
            (checkpoints every ~sqrt(#chunks) chunks) instead of keeping them; `None` never
            recomputes. It trades ~1/3 more mixer compute for ~5x less mixer memory; outputs and
            gradients are identical.
        cms_recompute_threshold: Training memory of a CMS level's hand-written backward on aligned
            batches: above this many chunks its fast weights are kept only every ~sqrt(#chunks)
            chunks and recomputed inside a block; results are identical.
        compile_decoding: Run each block's single-token (decoding) step through `torch.compile`
            (inductor), one graph per block (self-modifying mixer, chunked scans; docs/design.md
            §4.7). The first decoding call of a process compiles it (~40 s for the default d=256
            model on a CPU core). Results equal the eager step within float rounding.
        compile_chunks: Run the chunked path's per-chunk step of every in-context memory (training and
            prefill) through `torch.compile` (inductor), forward and backward. The first call of a
            process compiles it (up to ~2 min on a CPU core, again for a new grad mode or chunk shape);
            after that the default d=256 model trains 1.66x faster and prefills 1.29x faster on one CPU
            thread (`results/bench_speed/compile_2026-12-01`). The CMS levels (their own hand-written
            backward) run eagerly. Results equal the eager path within float rounding.
        use_fla_kernels: On CUDA with flash-linear-attention installed, compute a linear memory's
            end-of-chunk state with fla's `chunk_gated_delta_rule` (with `linear_gradient="chunk"` only,
            and not where per-token reads need the torch solve). `False`: always the torch solve.
        fla_dtype: The dtype fla's kernel computes in (`"bfloat16"`, `"float16"` or `"float32"`); the
            state stays float32.
        in_context_updates: If `False`, no memory and no CMS level is ever updated inside the
            forward pass (the ablation "without in-context learning"): memories are read at their
            initial state.
        rms_norm_eps: Epsilon of every RMSNorm.
        norm_eps: Epsilon of the L2 normalisations of keys and queries.
        initializer_range: Standard deviation of the normal initialisation of linear layers.
        memory_init_range: Standard deviation of the initial states of the deep memories'
            weights (small, so that a residual memory starts near the identity).
        key_value_init_range: The same for the key and value memories `M_k`, `M_v` of the
            self-modifying mixer, deep memories only (None: `memory_init_range`). Larger, k and the
            self-generated target start apart, so the memory writes from the first token
            (docs/design.md §8.8).
        rope_theta: RoPE base of the attention mixer.
        attention_bias: Whether the attention mixer's projections have biases.
        tie_word_embeddings: Tie the LM head to the token embedding.
        use_cache: Whether `forward` returns a `HopeCache` by default (in eval mode).
    """

    model_type = "hope"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_heads: int = 4,
        mixer: str = "self_modifying",
        memory_type: str = "deep",
        memory_hidden_size: Optional[int] = None,
        memory_activation: str = "silu",
        chunk_size: int = 64,
        memory_chunk_size: int = 64,
        memory_read: str = "token",
        linear_gradient: Optional[str] = None,
        deep_output_gradient: str = "chunk",
        eta_max: float = 2.0,
        dgd_step_bound: bool = True,
        eta_init: float = 0.5,
        alpha_init: float = 0.999,
        conv_window: int = 4,
        cms_chunk_sizes: Optional[Sequence[Optional[int]]] = (16, 256, None),
        cms_intermediate_size: Optional[int] = None,
        cms_variant: str = "sequential",
        cms_eta_init: float = 0.1,
        cms_alpha_init: float = 0.999,
        in_context_updates: bool = True,
        scan_implementation: str = "chunked",
        scan_recompute_threshold: Optional[int] = 128,
        cms_recompute_threshold: int = 16,
        compile_decoding: bool = False,
        compile_chunks: bool = False,
        use_fla_kernels: bool = True,
        fla_dtype: str = "bfloat16",
        rms_norm_eps: float = 1e-6,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        memory_init_range: float = 0.02,
        key_value_init_range: Optional[float] = 0.3,
        rope_theta: float = 10000.0,
        attention_bias: bool = False,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.mixer = mixer
        self.memory_type = memory_type
        self.memory_hidden_size = memory_hidden_size
        self.memory_activation = memory_activation
        self.chunk_size = chunk_size
        self.memory_chunk_size = memory_chunk_size
        self.memory_read = memory_read
        if linear_gradient is None:  # the measured best per mixer (docs/design.md §8.20)
            linear_gradient = "chunk" if mixer == "titans" else "token"
        self.linear_gradient = linear_gradient
        self.deep_output_gradient = deep_output_gradient
        self.eta_max = eta_max
        self.dgd_step_bound = dgd_step_bound
        self.eta_init = eta_init
        self.alpha_init = alpha_init
        self.conv_window = conv_window
        if cms_chunk_sizes is None:
            cms_chunk_sizes = []
        self.cms_chunk_sizes = list(cms_chunk_sizes) if isinstance(cms_chunk_sizes, (list, tuple)) else cms_chunk_sizes
        self.cms_intermediate_size = cms_intermediate_size
        self.cms_variant = cms_variant
        self.cms_eta_init = cms_eta_init
        self.cms_alpha_init = cms_alpha_init
        self.in_context_updates = in_context_updates
        self.scan_implementation = scan_implementation
        self.scan_recompute_threshold = scan_recompute_threshold
        self.cms_recompute_threshold = cms_recompute_threshold
        self.compile_decoding = compile_decoding
        self.compile_chunks = compile_chunks
        self.use_fla_kernels = use_fla_kernels
        self.fla_dtype = fla_dtype
        self.rms_norm_eps = rms_norm_eps
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.memory_init_range = memory_init_range
        self.key_value_init_range = key_value_init_range
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_hope()

    # Derived sizes: properties, so a saved config holds only the knobs.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def memory_dim(self) -> int:
        return self.memory_hidden_size if self.memory_hidden_size is not None else self.head_dim

    @property
    def cms_hidden_size(self) -> int:
        if self.cms_intermediate_size is not None:
            return self.cms_intermediate_size
        return 32 * math.ceil(8 * self.hidden_size / 3 / 32)

    def validate_hope(self) -> None:
        """Raise `ValueError` naming the first invalid field and what it accepts."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "chunk_size",
                     "memory_chunk_size", "conv_window"):
            _check(self, name, _is_positive_int, "a positive int")
        for name in ("memory_hidden_size", "cms_intermediate_size"):
            _check(self, name, _optional(_is_positive_int), "a positive int or None")
        _check(self, "scan_recompute_threshold", _optional(_is_non_negative_int), "a non-negative int or None")
        _check(self, "cms_recompute_threshold", _is_non_negative_int, "a non-negative int")
        for name in ("rms_norm_eps", "norm_eps", "initializer_range", "memory_init_range", "rope_theta", "cms_eta_init"):
            _check(self, name, _is_positive_float, "a positive float")
        _check(self, "key_value_init_range", _optional(_is_positive_float), "a positive float or None")
        for name in ("eta_init", "alpha_init", "cms_alpha_init"):
            _check(self, name, lambda v: _is_float(v) and 0.0 < v < 1.0, "a float in (0, 1)")
        _check(self, "eta_max", lambda v: _is_float(v) and 0.0 < v <= 2.0, "a float in (0, 2]")
        for name in ("in_context_updates", "use_fla_kernels", "dgd_step_bound", "compile_decoding",
                     "compile_chunks"):
            _check(self, name, lambda v: isinstance(v, bool), "a bool")
        for name, accepted in CHOICES.items():
            _check(self, name, lambda v, accepted=accepted: v in accepted, f"one of {list(accepted)}")
        _check(self, "cms_chunk_sizes", lambda v: isinstance(v, list), "a list of positive ints or None")
        bad = [size for size in self.cms_chunk_sizes if size is not None and not _is_positive_int(size)]
        if bad:
            raise ValueError(f"HopeConfig.cms_chunk_sizes entries must be positive ints or None, got {bad[0]!r} "
                             f"in {self.cms_chunk_sizes!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"HopeConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.mixer == "attention" and self.head_dim % 2 != 0:
            raise ValueError(f"HopeConfig: mixer='attention' needs an even head_dim (RoPE), got {self.head_dim}")

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "HopeConfig":
        """`PretrainedConfig.from_dict` (what `from_pretrained` calls), where a field that a saved
        config lacks takes the value the version that saved it computed with (`LEGACY_DEFAULTS`),
        not today's default: a checkpoint keeps computing what it computed when it was saved."""
        return super().from_dict({**LEGACY_DEFAULTS, **config_dict}, **kwargs)

    def state_signature(self) -> dict:
        """The fields that fix the shapes and meaning of a `HopeCache`: a cache made for one
        signature is refused by a model with another."""
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_heads": self.num_heads,
            "mixer": self.mixer,
            "memory_type": self.memory_type,
            "memory_dim": self.memory_dim,
            "chunk_size": self.chunk_size,
            "memory_chunk_size": self.memory_chunk_size,
            "conv_window": self.conv_window,
            "cms_chunk_sizes": list(self.cms_chunk_sizes),
            "cms_hidden_size": self.cms_hidden_size,
            "cms_variant": self.cms_variant,
        }


__all__ = ["HopeConfig"]
