"""hope-hf: Nested Learning and HOPE for the Hugging Face ecosystem.

Importing the package registers `"hope"` with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .models.hope import HopeCache, HopeConfig, HopeForCausalLM, HopeModel, HopePreTrainedModel, scan_implementation

__version__ = "0.1.0"

AutoConfig.register("hope", HopeConfig, exist_ok=True)
AutoModel.register(HopeConfig, HopeModel, exist_ok=True)
AutoModelForCausalLM.register(HopeConfig, HopeForCausalLM, exist_ok=True)

__all__ = ["HopeConfig", "HopeModel", "HopeForCausalLM", "HopePreTrainedModel", "HopeCache", "scan_implementation"]
