"""HOPE for transformers: exactly the files a `trust_remote_code` checkpoint carries (flat, relative
imports only). The math as implemented: docs/design.md."""

from .cache_hope import CMSState, HopeCache, LayerState, MemoryState
from .configuration_hope import HopeConfig
from .modeling_hope import HopeForCausalLM, HopeModel, HopePreTrainedModel, scan_implementation

__all__ = ["HopeConfig", "HopeModel", "HopeForCausalLM", "HopePreTrainedModel", "HopeCache", "LayerState",
           "MemoryState", "CMSState", "scan_implementation"]
