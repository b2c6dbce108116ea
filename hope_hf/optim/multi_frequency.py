"""Multi-frequency parameter learning: the Continuum Memory System at the parameter level.

Paper Eq. 31: the parameters of level `l` change only every `C^(l)` steps, by the sum of
the updates of the steps in between:

    theta^(l)_{i+1} = theta^(l)_i - sum_{t=i-C^(l)}^{i} eta_t f(theta^(l)_t; x_t)   if i = 0 mod C^(l)
                                  - 0                                               otherwise.

`MultiFrequency` wraps any optimizer: every param group has an `update_period`; a group's
gradients accumulate while its period has not elapsed, and at the boundary the wrapped
optimizer steps that group once on the accumulated gradient.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from ._base import check_choice, check_range

__all__ = ["MultiFrequency"]

Reduction = Literal["sum", "mean"]


class MultiFrequency(torch.optim.Optimizer):
    r"""Step each param group of `optimizer` only every `update_period` steps.

    On every `step()` (call it after every backward, as usual):

    * a group with `update_period = 1` is stepped normally;
    * otherwise its gradients are added into a buffer; on the steps that are multiples of
      its period (`4, 8, ...` for period 4) the parameters' `.grad` is replaced by the
      accumulated gradient (`reduction="sum"`, the default, as in Eq. 31; `"mean"` divides it
      by the period, which keeps the scale of a per-step gradient: prefer it with optimizers
      that are not scale-invariant, such as SGD) and the wrapped optimizer steps **only the
      due groups**: the others are hidden from it during the call, so their state (e.g.
      AdamW's step counts and moments, group-level counters) does not advance. `.grad` is
      put back afterwards.

    The wrapped optimizer sees the accumulated gradient once per period, so its notion of a
    step is a chunk (e.g. AdamW's bias correction counts chunks).

    `param_groups`, `state` and `defaults` are those of the wrapped optimizer (the same objects),
    so LR schedulers, `Trainer` and `accelerate` work on it unchanged; `update_period` is an
    ordinary group key and is saved with the groups. `state_dict()` is the wrapped optimizer's,
    plus a `"multi_frequency"` entry with the step count and the accumulation buffers, so a
    resumed run is bit-identical to an uninterrupted one.

    Contract: call `zero_grad()` after each `step()` (or let `backward` overwrite the
    grads); gradients accumulated by the user across several backwards *before* a `step()` are
    one step's gradient.

    Args:
        optimizer: any `torch.optim.Optimizer`, built on the param groups to schedule.
        update_periods: one int per group of `optimizer` (in order), or one int for all
            groups; `None` keeps each group's own `update_period` key (default
            `default_period`).
        reduction: `"sum"` (Eq. 31) or `"mean"`.
        default_period: period of groups that set none.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        update_periods: Optional[Union[int, Sequence[int]]] = None,
        reduction: Reduction = "sum",
        default_period: int = 1,
    ) -> None:
        # torch.optim.Optimizer.__init__ is not called on purpose: the wrapped optimizer owns
        # the groups and the state (the same pattern as accelerate's AcceleratedOptimizer).
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"Invalid optimizer: {type(optimizer).__name__} (must be a torch.optim.Optimizer)")
        check_choice("reduction", reduction, ("sum", "mean"))
        check_range("default_period", default_period, 1, integer=True)
        self.optimizer = optimizer
        self.reduction: Reduction = reduction
        self.default_period = default_period
        self._step_count_mf = 0
        self._accumulators: dict[Tensor, Tensor] = {}
        # Hook registries of torch.optim.Optimizer, so register_*_hook calls do not fail.
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()

        groups = optimizer.param_groups
        if update_periods is None:
            periods = [g.get("update_period", default_period) for g in groups]
        elif isinstance(update_periods, int):
            periods = [update_periods] * len(groups)
        else:
            periods = list(update_periods)
            if len(periods) != len(groups):
                raise ValueError(
                    f"Invalid update_periods: {len(periods)} periods for {len(groups)} param groups "
                    f"(param groups: {[len(g['params']) for g in groups]} params each)"
                )
        for group, period in zip(groups, periods):
            check_range("update_period", period, 1, integer=True)
            group["update_period"] = period

    # ------------------------------------------------------------ delegation
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def num_steps(self) -> int:
        """How many times `step()` was called (the clock of the periods)."""
        return self._step_count_mf

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        period = param_group.setdefault("update_period", self.default_period)
        check_range("update_period", period, 1, integer=True)
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The accumulation buffers are separate tensors: zeroing the grads does not touch them.
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        periods = [g.get("update_period", self.default_period) for g in self.param_groups]
        return f"MultiFrequency(periods={periods}, reduction={self.reduction!r}, optimizer={self.optimizer!r})"

    # ------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Accumulate, and step the groups whose period has elapsed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_count_mf += 1
        n = self._step_count_mf
        due: list[dict[str, Any]] = []
        saved_grads: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            period = group.get("update_period", self.default_period)
            boundary = n % period == 0
            if boundary:
                due.append(group)
            if period == 1:
                continue
            for p in group["params"]:
                acc = self._accumulators.get(p)
                if p.grad is None:
                    if boundary and acc is not None:
                        # Gradients earlier in the chunk but none now: still apply the chunk.
                        p.grad = acc.div_(period) if self.reduction == "mean" else acc
                        saved_grads.append((p, None))
                        del self._accumulators[p]
                    continue
                if not boundary:
                    if acc is None:
                        self._accumulators[p] = p.grad.detach().clone(memory_format=torch.preserve_format)
                    else:
                        acc.add_(p.grad)
                    continue
                total = acc.add_(p.grad) if acc is not None else p.grad.clone()
                if self.reduction == "mean":
                    total.div_(period)
                saved_grads.append((p, p.grad))
                p.grad = total
                self._accumulators.pop(p, None)

        if due:
            all_groups = self.optimizer.param_groups
            if len(due) == len(all_groups):
                self.optimizer.step()
            else:
                self.optimizer.param_groups = due
                try:
                    self.optimizer.step()
                finally:
                    self.optimizer.param_groups = all_groups
        for p, grad in saved_grads:
            p.grad = grad
        return loss

    # ------------------------------------------------------------ state
    def _indexed_params(self) -> list[Tensor]:
        # The order of torch.optim.Optimizer.state_dict's integer ids.
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = self.optimizer.state_dict()
        index = {p: i for i, p in enumerate(self._indexed_params())}
        sd["multi_frequency"] = {
            "step": self._step_count_mf,
            "reduction": self.reduction,
            "accumulators": {index[p]: acc.clone() for p, acc in self._accumulators.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        mf = state_dict.pop("multi_frequency", None)
        self.optimizer.load_state_dict(state_dict)  # restores the groups' update_period too
        self._accumulators = {}
        if mf is None:
            self._step_count_mf = 0
            return
        self._step_count_mf = int(mf["step"])
        params = self._indexed_params()
        for i, acc in mf["accumulators"].items():
            p = params[int(i)]
            self._accumulators[p] = acc.detach().to(device=p.device, dtype=p.dtype).clone()
