"""Adapters that retrofit HOPE (self-modifying memory + Continuum Memory System) onto pretrained
models. `hope_hf.adapters.llama`: Llama-architecture causal LMs (paper arXiv section 7.3)."""

from .llama import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    HopeAdapterConfig,
    HopeLlamaCache,
    HopeLlamaContext,
    HopeLlamaDecoderLayer,
    HopeLlamaForCausalLM,
    adapter_state_dict,
    apply_hope_adapter,
    base_signature,
    freeze_base,
    load_hope_adapter,
    save_hope_adapter,
)

from .llama import __all__  # noqa: E402,F401  (one list of public names)
