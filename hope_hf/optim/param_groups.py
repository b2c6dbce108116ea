"""Param groups from a model: the matrix / fallback rule and the multi-frequency periods.

An optimizer only sees tensors, so it can tell a hidden-layer matrix from an embedding table
only by the `ndim` of the tensor (the default rule of `Muon` & co). With the model at hand,
`build_param_groups` can do better: it looks at module types and parameter names.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import Tensor, nn

from ._base import check_range

__all__ = [
    "DEFAULT_FALLBACK_NAMES",
    "is_matrix_param",
    "build_param_groups",
    "build_multi_frequency_groups",
    "hope_cms_periods",
]

#: Substrings of parameter names that always go to the AdamW fallback: input embeddings and
#: output heads are lookup tables / classifiers, not hidden-layer maps (Muon's authors
#: recommend AdamW for them).
DEFAULT_FALLBACK_NAMES: tuple[str, ...] = ("embed", "lm_head", "wte", "wpe")

#: Module types whose parameters always go to the fallback.
DEFAULT_FALLBACK_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def is_matrix_param(
    name: str,
    param: Tensor,
    module: Optional[nn.Module] = None,
    fallback_names: Sequence[str] = DEFAULT_FALLBACK_NAMES,
    fallback_modules: tuple[type[nn.Module], ...] = DEFAULT_FALLBACK_MODULES,
) -> bool:
    """The default rule: does this parameter get the matrix rule (`use_muon=True`)?

    True iff `param.ndim >= 2`, its owning `module` is not an instance of `fallback_modules`
    (embeddings) and no substring of `fallback_names` occurs in `name` (case-insensitive).
    Norm weights and biases are 1-D and therefore fall back.
    """
    if param.ndim < 2:
        return False
    if module is not None and isinstance(module, fallback_modules):
        return False
    lowered = name.lower()
    return not any(s.lower() in lowered for s in fallback_names)


def _owner_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Map each parameter name (as `named_parameters` spells it) to the module holding it."""
    owners: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{pname}" if module_name else pname] = module
    return owners


def _period_of(name: str, patterns: list[tuple[re.Pattern[str], int]], default: int) -> int:
    # The most specific match wins: the longest matched prefix of the parameter name.
    best_len, best = -1, default
    for pattern, period in patterns:
        m = pattern.match(name)
        if m is not None and m.end() > best_len:
            best_len, best = m.end(), period
    return best


def build_param_groups(
    model: nn.Module,
    *,
    is_matrix: Optional[Callable[[str, Tensor, nn.Module], bool]] = None,
    fallback_names: Sequence[str] = DEFAULT_FALLBACK_NAMES,
    periods: Optional[Mapping[str, int]] = None,
    default_period: int = 1,
    matrix_options: Optional[Mapping[str, Any]] = None,
    fallback_options: Optional[Mapping[str, Any]] = None,
) -> list[dict[str, Any]]:
    """Param groups with an explicit `use_muon` flag (and `update_period` if `periods`).

    Parameters with `requires_grad=False` are left out; tied parameters appear once.

    Args:
        model: the model.
        is_matrix: `(name, param, owner_module) -> bool`, overrides the default rule
            `is_matrix_param` (with `fallback_names`).
        fallback_names: name substrings that go to the fallback under the default rule.
        periods: optional `{pattern: update_period}` for `MultiFrequency`. A pattern is a
            regular expression matched at the start of the parameter name and ending at a
            `.` or at the end, so a plain module name such as `"model.layers.0.cms.1"` matches
            all its parameters; the longest match wins. Unmatched parameters get
            `default_period`.
        default_period: period of unmatched parameters.
        matrix_options: extra keys of the `use_muon=True` groups (e.g. `{"lr": 0.02}`).
        fallback_options: extra keys of the `use_muon=False` groups (e.g. `{"lr": 3e-4}`).

    Returns:
        A list of groups `{"params": [...], "use_muon": bool, ["update_period": int], ...}`,
        matrices first, by increasing period; empty groups are omitted. Pass it to `Muon`,
        `M3`, `DeltaMomentum`, `DeepMomentum`, or any torch optimizer (extra keys are ignored).
    """
    check_range("default_period", default_period, 1, integer=True)
    patterns: list[tuple[re.Pattern[str], int]] = []
    for key, period in (periods or {}).items():
        check_range(f"periods[{key!r}]", period, 1, integer=True)
        patterns.append((re.compile(f"(?:{key})(?=\\.|$)"), period))
    owners = _owner_modules(model)
    buckets: dict[tuple[bool, int], list[Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = owners.get(name)
        if is_matrix is not None:
            matrix = bool(is_matrix(name, param, module))
        else:
            matrix = is_matrix_param(name, param, module, fallback_names)
        period = _period_of(name, patterns, default_period) if patterns else default_period
        buckets.setdefault((matrix, period), []).append(param)
    groups = []
    for (matrix, period), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        group: dict[str, Any] = {"params": params, "use_muon": matrix}
        if periods is not None:
            group["update_period"] = period
        group.update((matrix_options if matrix else fallback_options) or {})
        groups.append(group)
    return groups


def build_multi_frequency_groups(
    model: nn.Module,
    periods: Mapping[str, int],
    default_period: int = 1,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """`build_param_groups` with `update_period` keys, ready for `MultiFrequency`.

    Example::

        groups = build_multi_frequency_groups(model, hope_cms_periods(model))
        opt = MultiFrequency(Muon(groups, lr=0.02))
    """
    return build_param_groups(model, periods=periods, default_period=default_period, **kwargs)


def hope_cms_periods(
    model: nn.Module,
    base_period: int = 1,
    min_chunk: Optional[int] = None,
    static_period: Optional[int] = None,
    class_name: str = "CMSLevel",
) -> dict[str, int]:
    """Periods of the Continuum Memory System levels of a HOPE model (paper Eq. 31).

    Looks for submodules whose class is named `class_name` and that have an attribute
    `chunk_size: Optional[int]` (the level's `C_l`; `None` = static level). A level with
    chunk size `C` gets `base_period * max(1, C // min_chunk)`, where `min_chunk` defaults to
    the smallest chunk size found, so the fastest level steps every `base_period` steps and a
    level with a 16x larger chunk 16x less often. Static levels get `static_period`
    (default `base_period`): they are ordinary parameters of the outer optimizer.

    Returns:
        `{module_name: period}` (module names escaped for `build_param_groups`' patterns);
        empty if the model has no such level.
    """
    check_range("base_period", base_period, 1, integer=True)
    if static_period is None:
        static_period = base_period
    check_range("static_period", static_period, 1, integer=True)
    levels: list[tuple[str, Optional[int]]] = []
    for name, module in model.named_modules():
        if type(module).__name__ != class_name or not hasattr(module, "chunk_size"):
            continue
        chunk = getattr(module, "chunk_size")
        if chunk is not None:
            check_range(f"{name}.chunk_size", chunk, 1, integer=True)
        levels.append((name, chunk))
    chunks = [c for _, c in levels if c is not None]
    if min_chunk is None:
        min_chunk = min(chunks) if chunks else 1
    check_range("min_chunk", min_chunk, 1, integer=True)
    return {
        re.escape(name): static_period if chunk is None else base_period * max(1, chunk // min_chunk)
        for name, chunk in levels
    }

