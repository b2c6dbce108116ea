"""Deterministic train / validation splits of text corpora."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import overload

from ._validation import check_fraction

__all__ = ["split_text"]

# Boundaries tried in order when a single string has to be cut.
_STRING_BOUNDARIES = ("\n\n", "\n", " ")


def _split_string(text: str, val_fraction: float) -> tuple[str, str]:
    """Cut ``text`` near ``(1 - val_fraction) * len(text)`` at the best boundary.

    A paragraph break is preferred, then a line break, then a space; a boundary
    is accepted when it lies within half the validation size of the target, so
    the realised fraction stays within a factor 1.5 of the requested one.
    """
    if len(text) < 2:
        raise ValueError(f"text must hold at least 2 characters to be split, got {len(text)}")
    target = round(len(text) * (1.0 - val_fraction))
    target = min(max(target, 1), len(text) - 1)
    tolerance = max(1, (len(text) - target) // 2)
    for boundary in _STRING_BOUNDARIES:
        candidates = []
        before = text.rfind(boundary, 0, target + len(boundary))
        if before >= 0:
            candidates.append(before + len(boundary))
        after = text.find(boundary, target)
        if after >= 0:
            candidates.append(after + len(boundary))
        candidates = [c for c in candidates if 0 < c < len(text) and abs(c - target) <= tolerance]
        if candidates:
            cut = min(candidates, key=lambda c: (abs(c - target), c))
            return text[:cut], text[cut:]
    return text[:target], text[target:]


def _split_documents(docs: Sequence[str], val_fraction: float, seed: int | None) -> tuple[list[str], list[str]]:
    order = list(range(len(docs)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    total = sum(len(doc) for doc in docs)
    wanted = val_fraction * total
    val_indices: list[int] = []
    val_chars = 0
    # Take documents from the end until the validation share is reached, always
    # keeping at least one document for training.
    for index in reversed(order[1:]):
        if val_indices and abs(val_chars + len(docs[index]) - wanted) > abs(val_chars - wanted):
            break
        val_indices.append(index)
        val_chars += len(docs[index])
    chosen = set(val_indices)
    train = [docs[i] for i in order if i not in chosen]
    val = [docs[i] for i in order if i in chosen]
    return train, val


@overload
def split_text(text: str, val_fraction: float = ..., seed: int | None = ...) -> tuple[str, str]: ...
@overload
def split_text(
    text: Sequence[str], val_fraction: float = ..., seed: int | None = ...
) -> tuple[list[str], list[str]]: ...


def split_text(text, val_fraction: float = 0.05, seed: int | None = None):
    """Split a corpus into ``(train, validation)`` deterministically.

    * A **list of documents** (e.g. :func:`~hope_hf.data.load_shakespeare_plays`,
      :func:`~hope_hf.data.load_paul_graham_essays`) is split on document
      boundaries: the last documents (in the given order, or in an order
      shuffled by ``seed``) whose total size is closest to ``val_fraction`` of
      the characters go to validation. At least one document stays on each side;
      a single document is split like a string, giving one-element lists.
    * A **string** is cut near ``(1 - val_fraction)`` of its length, at a
      paragraph break if one is close enough, else a line break, else a space,
      else exactly there.

    Args:
        text: a string or a sequence of document strings.
        val_fraction: share of characters for validation, strictly between 0 and 1.
        seed: only for document lists: shuffle the documents with
            ``random.Random(seed)`` before splitting; ``None`` keeps the order.

    Returns:
        ``(train, val)``: two strings for a string input, two lists otherwise.

    Raises:
        ValueError: on an invalid ``val_fraction``, an empty corpus, or a
            ``text`` that is neither a string nor a sequence of strings.
    """
    check_fraction("val_fraction", val_fraction, inclusive=False)
    if isinstance(text, str):
        return _split_string(text, val_fraction)
    if not isinstance(text, Sequence) or not all(isinstance(doc, str) for doc in text):
        raise ValueError(f"text must be a string or a sequence of strings, got {type(text).__name__}")
    docs = [doc for doc in text if doc]
    if not docs:
        raise ValueError("text: the document list is empty")
    if len(docs) == 1:
        train, val = _split_string(docs[0], val_fraction)
        return [train], [val]
    return _split_documents(docs, val_fraction, seed)
