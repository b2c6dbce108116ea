"""What differs between the transformers versions hope-hf supports (5.23 and 5.24+), in one place.

transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`:
`generate()` passes `cache=` to `forward` and reads `outputs["cache"]`, model outputs have a `cache`
field, and `past_key_values=` is a deprecated alias (until 5.40). transformers 5.23 only knows
`past_key_values`. Our models accept both names and write the cache under the name the installed
version reads (`CACHE_NAME`).

(A flat sibling of `modeling_hope.py`: `register_for_auto_class` copies relative imports flat.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from transformers.modeling_outputs import CausalLMOutputWithPast

# The name under which the installed transformers passes the cache to `forward`, keeps it in
# generate()'s model_kwargs, and reads it from model outputs.
CACHE_NAME: str = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)


def resolve_cache(cache: Optional[Any], past_key_values: Optional[Any]) -> Optional[Any]:
    """The cache a caller passed, under either name (`cache=`, or `past_key_values=` as in
    transformers <= 5.23). Passing two different objects is an error."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache as either `cache=` or `past_key_values=`, not both")
    return cache if cache is not None else past_key_values


def generation_cache(model_kwargs: dict) -> Optional[Any]:
    """The cache in generate()'s model_kwargs. A cache the user passed under the other name
    (`generate(ids, cache=...)` on transformers 5.23) is moved to the installed version's name
    first, so both names work on every supported version."""
    other = "past_key_values" if CACHE_NAME == "cache" else "cache"
    if model_kwargs.get(other) is not None:
        model_kwargs[CACHE_NAME] = resolve_cache(model_kwargs.get(CACHE_NAME), model_kwargs.pop(other))
    return model_kwargs.get(CACHE_NAME)


def output_cache(output: Any) -> Optional[Any]:
    """The cache a model output (or a generate() output) carries, on any supported version,
    without tripping transformers' deprecation warning for the old name."""
    return output.get(CACHE_NAME) if hasattr(output, "get") else getattr(output, CACHE_NAME)


__all__ = ["CACHE_NAME", "generation_cache", "output_cache", "resolve_cache"]
