"""A map-style dataset of aligned tensors, yielding dicts (``transformers.Trainer`` style)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["DictTensorDataset"]


class DictTensorDataset(Dataset):
    """Rows of several equally long tensors, returned as ``{name: tensor[row]}``.

    ``DictTensorDataset(input_ids=x, labels=y)[i] == {"input_ids": x[i], "labels": y[i]}``.
    With fixed-length rows the items batch with
    ``transformers.default_data_collator`` or ``torch.utils.data.default_collate``.

    Raises:
        ValueError: if no tensor is given or the tensors differ in their first dimension.
    """

    def __init__(self, **tensors: torch.Tensor) -> None:
        if not tensors:
            raise ValueError("DictTensorDataset needs at least one named tensor")
        lengths = {name: int(t.shape[0]) for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all tensors must have the same first dimension, got {lengths}")
        self.tensors = dict(tensors)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}={tuple(t.shape)}" for name, t in self.tensors.items())
        return f"{type(self).__name__}({shapes})"
