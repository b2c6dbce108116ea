"""Configuration of HOPE models (self-modifying Titans + Continuum Memory System).

Every knob of the model lives here (see `SPEC.md` sections 1-4 and 9). Invalid values raise
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
MEMORY_READS = ("token", "chunk")


# Fields whose default changed after hope-hf 0.1.0 in a way that changes what a model computes (not
# just how it is initialised), with the value 0.1.0 computed with. A saved config that lacks one
# (`HopeConfig.from_dict`), or a v1 adapter's `hope_kwargs`, gets that value, so a checkpoint keeps
# computing what it computed when it was saved.
LEGACY_DEFAULTS = {"memory_read": "chunk", "eta_max": 0.5}


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
            inside a chunk they are read, and their gradients taken, at the chunk-start state.
        memory_chunk_size: `C_mem`, the same for the main memory `M_mem` (and the titans memory): its
            inner gradients are taken at the chunk-start state.
        memory_read: Which state of the main memory `M_mem` a token reads: `"token"` the current
            state, `o_t = M_{t-1}(q_t)` (paper Eq. 88: a write is visible to the next token), or
            `"chunk"` the state at the start of the token's chunk (paper Eq. 90: nothing written
            in a chunk is visible before it ends). Default `"token"` (issue 12, measured on MQAR 4 pairs,
            64 tokens, default chunk sizes 16/64, 300 steps, 2 seeds: 0.322 / 0.300 against 0.0125 /
            0.0125 (chance) for `"chunk"`, at ~1.3x the time per step; results/in_context/README.md).
        eta_max: Upper bound of the per-token inner learning rate `eta_t = eta_max * sigmoid(.)`, in
            (0, 2]. Above 1 the DGD transition `alpha I - eta u~ u~^T` gets eigenvalues below 0 along
            the key (state tracking, Grazzi et al. 2024); `memory_hope.step_bound` keeps the step
            stable at any eta below 2. Default 2 (issue 12; formal languages, 300 steps, seed 0:
            parity 1.0 / 0.795 at training / longer lengths against 0.5 / 0.5 with eta_max 1;
            results/in_context/README.md).
        eta_init: Initial inner learning rate as a fraction of `eta_max` (SPEC section 9: eta = 0.5 at
            init, like DeltaNet's beta; 0.05 x 0.5 left the memory inert).
        alpha_init: Initial retention `alpha_t` (SPEC section 9: keep it near 1; 0.97 decayed the
            state 20x faster than the writes changed it).
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
            chunk-parallel, `ops_chunked.py`) or `"reference"` (the per-token loop of
            `ops_reference.py` that reads like the equations). Both give the same outputs and
            states; `hope_hf.scan_implementation(name)` overrides it for a block of code.
        scan_recompute_threshold: Training memory of the chunked path: a call that spans more than
            this many chunks of a memory recomputes the scan's activations in the backward
            (checkpoints every ~sqrt(#chunks) chunks) instead of keeping them; `None` never
            recomputes. It trades ~1/3 more mixer compute for ~5x less mixer memory; outputs and
            gradients are identical.
        in_context_updates: If `False`, no memory and no CMS level is ever updated inside the
            forward pass (the ablation "without in-context learning"): memories are read at their
            initial state.
        rms_norm_eps: Epsilon of every RMSNorm.
        norm_eps: Epsilon of the L2 normalisations of keys and queries.
        initializer_range: Standard deviation of the normal initialisation of linear layers.
        memory_init_range: Standard deviation of the initial states of the deep memories'
            weights (small, so that a residual memory starts near the identity).
        key_value_init_range: The same for the key and value memories `M_k`, `M_v` of the
            self-modifying mixer, deep memories only (None: `memory_init_range`; linear memories
            always use `memory_init_range`, the larger init was not measured for them). Larger, k and the self-generated
            target start apart, so the memory writes from the first token (issue 12). Default 0.3:
            MQAR 4 pairs (64 tokens, 16/64 chunks, token reads, 300 steps, lr 3e-3) 0.343 / 0.345
            (seeds 0/1) against 0.322 / 0.300 with 0.02; the far-token reach at init (40 tokens)
            0.14 / 0.19 against 0.013 / 0.018 (results/in_context/README.md).
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
        chunk_size: int = 16,
        memory_chunk_size: int = 64,
        memory_read: str = "token",
        eta_max: float = 2.0,
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
        self.eta_max = eta_max
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
        """Raise `ValueError` naming the first invalid field."""

        def positive_int(name: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HopeConfig.{name} must be a positive int, got {value!r}")

        def choice(name: str, value, accepted: Sequence[str]) -> None:
            if value not in accepted:
                raise ValueError(f"HopeConfig.{name} must be one of {list(accepted)}, got {value!r}")

        def open_unit(name: str, value) -> None:
            if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
                raise ValueError(f"HopeConfig.{name} must be a float in (0, 1), got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "chunk_size",
                     "memory_chunk_size", "conv_window"):
            positive_int(name, getattr(self, name))
        if self.scan_recompute_threshold is not None and (
            isinstance(self.scan_recompute_threshold, bool) or not isinstance(self.scan_recompute_threshold, int)
            or self.scan_recompute_threshold < 0
        ):
            raise ValueError(f"HopeConfig.scan_recompute_threshold must be a non-negative int or None, "
                             f"got {self.scan_recompute_threshold!r}")
        if self.key_value_init_range is not None and (
            not isinstance(self.key_value_init_range, (int, float)) or self.key_value_init_range <= 0
        ):
            raise ValueError(f"HopeConfig.key_value_init_range must be a positive float or None, "
                             f"got {self.key_value_init_range!r}")
        for name in ("memory_hidden_size", "cms_intermediate_size"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"HopeConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        choice("mixer", self.mixer, MIXERS)
        choice("memory_type", self.memory_type, MEMORY_TYPES)
        choice("memory_activation", self.memory_activation, ACTIVATIONS)
        choice("cms_variant", self.cms_variant, CMS_VARIANTS)
        choice("scan_implementation", self.scan_implementation, SCAN_IMPLEMENTATIONS)
        choice("memory_read", self.memory_read, MEMORY_READS)
        if self.mixer == "attention" and self.head_dim % 2 != 0:
            raise ValueError(f"HopeConfig: mixer='attention' needs an even head_dim (RoPE), got {self.head_dim}")
        if not isinstance(self.eta_max, (int, float)) or not 0.0 < self.eta_max <= 2.0:
            raise ValueError(f"HopeConfig.eta_max must be a float in (0, 2], got {self.eta_max!r}")
        open_unit("eta_init", self.eta_init)
        open_unit("alpha_init", self.alpha_init)
        open_unit("cms_alpha_init", self.cms_alpha_init)
        if not isinstance(self.cms_eta_init, (int, float)) or self.cms_eta_init <= 0:
            raise ValueError(f"HopeConfig.cms_eta_init must be a positive float, got {self.cms_eta_init!r}")
        if not isinstance(self.cms_chunk_sizes, list):
            raise ValueError(f"HopeConfig.cms_chunk_sizes must be a list of positive ints or None, "
                             f"got {self.cms_chunk_sizes!r}")
        for size in self.cms_chunk_sizes:
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(
                    f"HopeConfig.cms_chunk_sizes entries must be positive ints or None, got {self.cms_chunk_sizes!r}"
                )
        if not isinstance(self.in_context_updates, bool):
            raise ValueError(f"HopeConfig.in_context_updates must be a bool, got {self.in_context_updates!r}")
        for name in ("rms_norm_eps", "norm_eps", "initializer_range", "memory_init_range", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"HopeConfig.{name} must be a positive float, got {value!r}")

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
