"""Optimizers of the Nested Learning paper, as ordinary `torch.optim.Optimizer`s.

* `Muon`: momentum + Newton-Schulz orthogonalisation of matrix updates (paper Eq. 24).
* `M3`: Multi-scale Momentum Muon (the paper's arXiv Algorithm 1).
* `DeltaMomentum`: delta-rule momentum (paper Eq. 22), normalised.
* `DeepMomentum`: Deep Momentum Gradient Descent, an MLP memory as momentum (Eq. 23/24).
* `MultiFrequency`: wraps any optimizer; each param group steps every `update_period` steps
  on its accumulated gradient (the Continuum Memory System at the parameter level, Eq. 31).

The four matrix optimizers use AdamW for parameters that are not matrices (per-group flag
`use_muon`; `build_param_groups(model)` sets it from module types and names). All of them
work in plain PyTorch loops, with `transformers.Trainer(optimizers=(opt, None))` and with
`accelerate.Accelerator.prepare`, and their `state_dict()` round trip resumes bit-identically.
"""

from ._base import MatrixOptimizer, adamw_step
from .deep_momentum import DeepMomentum
from .delta_momentum import DeltaMomentum
from .m3 import M3
from .multi_frequency import MultiFrequency
from .muon import Muon
from .newton_schulz import NS_COEFFICIENTS, matrix_view, newton_schulz, shape_scale
from .param_groups import (
    DEFAULT_FALLBACK_NAMES,
    build_multi_frequency_groups,
    build_param_groups,
    hope_cms_periods,
    is_matrix_param,
)

__all__ = [
    "Muon",
    "M3",
    "DeltaMomentum",
    "DeepMomentum",
    "MultiFrequency",
    "MatrixOptimizer",
    "adamw_step",
    "newton_schulz",
    "matrix_view",
    "shape_scale",
    "NS_COEFFICIENTS",
    "build_param_groups",
    "build_multi_frequency_groups",
    "hope_cms_periods",
    "is_matrix_param",
    "DEFAULT_FALLBACK_NAMES",
]
