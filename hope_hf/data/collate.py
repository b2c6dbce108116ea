"""Padding collator for variable-length causal-LM examples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ._validation import check_int

__all__ = ["IGNORE_INDEX", "pad_collate"]

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss of ``transformers`` models."""


def pad_collate(
    features: Sequence[Mapping[str, Sequence[int] | torch.Tensor]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch of ``LongTensor`` s.

    Every feature must hold ``input_ids``; ``labels`` and ``attention_mask``
    are optional and created when missing (labels = input_ids, mask = 1).
    Padding uses ``pad_token_id`` for ``input_ids``, ``-100`` for ``labels``
    and ``0`` for ``attention_mask``. Any other key is padded with 0.

    Use it as ``DataLoader(..., collate_fn=functools.partial(pad_collate, pad_token_id=...))``.

    Raises:
        ValueError: on an empty batch, a feature without ``input_ids``, keys that
            differ between features, a row whose fields differ in length, or an
            invalid ``pad_to_multiple_of``.
    """
    if not features:
        raise ValueError("features: the batch is empty")
    check_int("pad_to_multiple_of", pad_to_multiple_of, allow_none=True)
    keys = set(features[0])
    if "input_ids" not in keys:
        raise ValueError(f"features must contain 'input_ids', got keys {sorted(keys)}")
    if any(set(f) != keys for f in features):
        raise ValueError("features: all examples must have the same keys")
    keys |= {"labels", "attention_mask"}

    rows = []
    for feature in features:
        ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
        row = {key: torch.as_tensor(value, dtype=torch.long) for key, value in feature.items()}
        row.setdefault("labels", ids.clone())
        row.setdefault("attention_mask", torch.ones_like(ids))
        if any(value.shape != ids.shape for value in row.values()):
            raise ValueError(
                f"features: fields of one example differ in length: { {k: tuple(v.shape) for k, v in row.items()} }"
            )
        rows.append(row)

    length = max(int(row["input_ids"].shape[0]) for row in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    batch = {}
    for key in sorted(keys):
        out = torch.full((len(rows), length), pad_values.get(key, 0), dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : row[key].shape[0]] = row[key]
        batch[key] = out
    return batch
