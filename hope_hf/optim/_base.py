"""Shared machinery of the matrix optimizers (Muon, M3, DeltaMomentum, DeepMomentum).

Each of them applies its own rule to *matrix* parameters and AdamW to everything else
(embeddings, LM head, norms, biases: Newton-Schulz is meaningless on a vector, and
orthogonalising an embedding table row-mixes unrelated tokens). Which rule a parameter gets
is decided by the per-group flag `use_muon`:

* a group that sets `use_muon` explicitly is taken as is (use
  `hope_hf.optim.build_param_groups(model)` to make such groups from module types/names);
* a group without it is split in two groups at construction: parameters with `ndim >= 2`
  get `use_muon=True`, the others `use_muon=False`.

A `use_muon=False` group that does not set `lr` / `weight_decay` itself gets the
optimizer's `adamw_lr` / `adamw_weight_decay`, so every group is homogeneous and LR
schedulers (which scale `group["lr"]`) act on both rules.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from .newton_schulz import ShapeScale

__all__ = ["MatrixOptimizer", "adamw_step", "check_range", "ADAMW_DEFAULTS"]

#: Defaults of the AdamW fallback shared by all matrix optimizers.
ADAMW_DEFAULTS: dict[str, Any] = dict(
    adamw_lr=3e-4,
    adamw_betas=(0.9, 0.95),
    adamw_eps=1e-8,
    adamw_weight_decay=0.0,
)


def check_range(
    name: str,
    value: Any,
    low: Optional[float] = None,
    high: Optional[float] = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> None:
    """Raise `ValueError` naming the hyperparameter `name` if `value` is out of range."""
    if integer:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok_type or (not integer and not math.isfinite(value)):
        kind = "an int" if integer else "a finite number"
        raise ValueError(f"Invalid {name}: {value!r} (must be {kind})")
    bad_low = low is not None and (value < low if low_inclusive else value <= low)
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{low} {'<=' if low_inclusive else '<'} "
        hi = "" if high is None else f" {'<=' if high_inclusive else '<'} {high}"
        raise ValueError(f"Invalid {name}: {value!r} (must satisfy {lo}{name}{hi})")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise `ValueError` naming `name` if `value` is not one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {choices})")


def _check_adamw(group: dict[str, Any]) -> None:
    check_range("lr", group["lr"], 0.0)
    check_range("weight_decay", group["weight_decay"], 0.0)
    betas = group["adamw_betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid adamw_betas: {betas!r} (must be a pair (beta1, beta2))")
    check_range("adamw_betas[0]", betas[0], 0.0, 1.0, high_inclusive=False)
    check_range("adamw_betas[1]", betas[1], 0.0, 1.0, high_inclusive=False)
    check_range("adamw_eps", group["adamw_eps"], 0.0, low_inclusive=False)


def adamw_step(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step (Loshchilov & Hutter) on `p`, in place; `state["step"]` already counts it.

    The operations are those of `torch.optim.AdamW(foreach=False)`, in the same order, so the
    fallback is bit-identical to it (tested).

    Args:
        p: parameter, any shape.
        grad: `p.shape`.
        state: the optimizer's `state[p]`; gains `exp_avg`, `exp_avg_sq` (`p.shape`).
    """
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    beta1, beta2 = betas
    step = state["step"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def descend(p: Tensor, update: Tensor, group: dict[str, Any], scale: float = 1.0) -> None:
    """The last step every matrix rule shares: decoupled weight decay, then `p -= lr * scale * update`.

    Args:
        p: the parameter (updated in place).
        update: any shape with `p.numel()` entries (a matrix view is reshaped back to `p.shape`).
        group: the parameter group (`lr`, `weight_decay`).
        scale: the rule's shape factor (`shape_scale`), 1 for an unnormalised update.
    """
    lr = group["lr"]
    if group["weight_decay"] != 0:
        p.mul_(1 - lr * group["weight_decay"])
    p.add_(update.reshape(p.shape), alpha=-lr * scale)


def _tensor_of(p: Any) -> Tensor:
    # torch accepts (name, tensor) pairs as params since 2.5.
    return p[1] if isinstance(p, tuple) else p


class MatrixOptimizer(torch.optim.Optimizer, ABC):
    """Base class: the matrix rule of a subclass on `use_muon` groups, AdamW on the others.

    Subclasses implement `_matrix_update` (and `_check_matrix_group` for their
    hyperparameters); the base class does the group split, validation, step counting,
    closure handling and the AdamW fallback. All state lives in `self.state[p]` as tensors or
    ints, so `state_dict()` / `load_state_dict()` round-trip it exactly.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        defaults = {**ADAMW_DEFAULTS, **defaults}
        # Validate the defaults even if no group ends up using the matrix rule (groups that
        # override a hyperparameter are validated again in add_param_group).
        self._check_matrix_group(defaults)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; one without `use_muon` is split by the `ndim >= 2` rule."""
        if "use_muon" in param_group:
            self._add_homogeneous_group(dict(param_group))
            return
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        matrices = [p for p in params if _tensor_of(p).ndim >= 2]
        others = [p for p in params if _tensor_of(p).ndim < 2]
        if not matrices and not others:
            # Let torch raise its usual error for an empty group.
            super().add_param_group(param_group)
            return
        for flag, subset in ((True, matrices), (False, others)):
            if subset:
                self._add_homogeneous_group({**param_group, "params": subset, "use_muon": flag})

    def _add_homogeneous_group(self, group: dict[str, Any]) -> None:
        if not isinstance(group["use_muon"], bool):
            raise ValueError(f"Invalid use_muon: {group['use_muon']!r} (must be True or False)")
        if not group["use_muon"]:
            # A fallback group lives on AdamW's scale unless the user said otherwise.
            group.setdefault("lr", self.defaults["adamw_lr"])
            group.setdefault("weight_decay", self.defaults["adamw_weight_decay"])
        super().add_param_group(group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"use_muon=True group holds a parameter of shape {tuple(p.shape)}; the matrix "
                        "rule needs ndim >= 2 (put vectors in a use_muon=False group)"
                    )
            self._check_matrix_group(group)
        else:
            _check_adamw(group)

    def _check_matrix_group(self, group: dict[str, Any]) -> None:
        """Validate the hyperparameters of a `use_muon=True` group (raise `ValueError`)."""
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        _check_adamw({**group, "lr": group["adamw_lr"], "weight_decay": group["adamw_weight_decay"]})

    # ------------------------------------------------------------------ step
    @abstractmethod
    def _matrix_update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Apply the subclass's rule to the matrix parameter `p` (in place, under no_grad)."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Perform one optimisation step; parameters whose `grad` is None are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                if group["use_muon"]:
                    self._matrix_update(p, p.grad, state, group)
                else:
                    adamw_step(
                        p,
                        p.grad,
                        state,
                        lr=group["lr"],
                        betas=tuple(group["adamw_betas"]),
                        eps=group["adamw_eps"],
                        weight_decay=group["weight_decay"],
                    )
        return loss


def check_shape_scale(value: ShapeScale) -> None:
    check_choice("shape_scale", value, ("keller", "rms", "none"))


def check_ns(group: dict[str, Any]) -> None:
    """Validate `ns_steps` and `ns_dtype` of a group."""
    check_range("ns_steps", group["ns_steps"], 0, integer=True)
    dtype = group["ns_dtype"]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Invalid ns_dtype: {dtype!r} (must be a floating torch.dtype, e.g. torch.float32)")
