"""Accuracy of a causal LM on the labelled positions of a batch (``labels != -100``)."""

from __future__ import annotations

import torch

from .collate import IGNORE_INDEX

__all__ = ["labelled_predictions", "masked_next_token_accuracy", "sequence_exact_match"]


def labelled_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(logits_at_predictions, targets)`` for every labelled position.

    Labels are unshifted (Hugging Face convention): the target ``labels[b, t]``
    is predicted by ``logits[b, t - 1]``.

    Args:
        logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]`` with ``-100`` at unlabelled positions.

    Returns:
        ``[n, vocab]`` logits and ``[n]`` targets, ``n`` = number of labelled positions.

    Raises:
        ValueError: on mismatched shapes, no labelled position, or a label at position 0.
    """
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            "logits must be [batch, seq, vocab] and labels [batch, seq]; "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    rows, cols = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    if rows.numel() == 0 or bool((cols == 0).any()):
        raise ValueError("labels must mark at least one position, and none at position 0")
    return logits[rows, cols - 1], labels[rows, cols]


def masked_next_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of labelled positions whose target is the arg-max prediction (e.g. MQAR recall)."""
    predicted, targets = labelled_predictions(logits, labels)
    return float((predicted.argmax(dim=-1) == targets).float().mean())


def sequence_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of examples (rows with at least one label) whose labelled positions are *all* predicted right
    by the arg-max: with teacher forcing this is exactly "greedy decoding writes the whole answer" (e.g. the
    needle's number in NIAH).

    Raises:
        ValueError: as :func:`labelled_predictions`.
    """
    labelled_predictions(logits, labels)  # validates shapes and labels
    predicted = logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    wrong = (predicted != targets) & labelled
    rows = labelled.any(dim=1)
    return float((~wrong.any(dim=1))[rows].float().mean())
