"""Tokenization of formal-language examples for a causal LM classifier.

One small vocabulary serves all languages of
:mod:`hope_hf.data.synthetic.formal_languages`::

    0 <pad>  1 <bos>  2 <cls>  3 0  4 1  5 a  6 b  7 c  8 (  9 )  10 [  11 ]  12 <no>  13 <yes>

An example ``s`` with label ``y`` becomes ``<bos> s_1 ... s_n <cls> <y>``, where
``<y>`` is ``<yes>`` for members and ``<no>`` otherwise. ``labels`` is ``-100``
everywhere except at the label token, which holds its id; a Hugging Face causal
LM shifts labels itself, so the loss trains the prediction made at ``<cls>``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..collate import IGNORE_INDEX, pad_collate
from ..metrics import labelled_predictions
from .formal_languages import FormalLanguageExample, generate_formal_language_examples

__all__ = [
    "FORMAL_VOCAB",
    "FORMAL_TOKEN_TO_ID",
    "PAD_ID",
    "BOS_ID",
    "CLS_ID",
    "NO_ID",
    "YES_ID",
    "EncodedFormalExample",
    "encode_formal_example",
    "FormalLanguageDataset",
    "formal_language_collate",
    "make_length_generalization_datasets",
    "formal_language_accuracy",
]

FORMAL_VOCAB: tuple[str, ...] = (
    "<pad>",
    "<bos>",
    "<cls>",
    "0",
    "1",
    "a",
    "b",
    "c",
    "(",
    ")",
    "[",
    "]",
    "<no>",
    "<yes>",
)
"""The shared vocabulary; a model needs ``vocab_size >= len(FORMAL_VOCAB)`` (14)."""

FORMAL_TOKEN_TO_ID: dict[str, int] = {token: i for i, token in enumerate(FORMAL_VOCAB)}
PAD_ID = FORMAL_TOKEN_TO_ID["<pad>"]
BOS_ID = FORMAL_TOKEN_TO_ID["<bos>"]
CLS_ID = FORMAL_TOKEN_TO_ID["<cls>"]
NO_ID = FORMAL_TOKEN_TO_ID["<no>"]
YES_ID = FORMAL_TOKEN_TO_ID["<yes>"]
_SYMBOLS = "01abc()[]"


@dataclass(frozen=True)
class EncodedFormalExample:
    """``input_ids`` and ``labels`` (``-100`` but at ``label_position``) of one example."""

    input_ids: list[int]
    labels: list[int]
    label_position: int


def encode_formal_example(example: FormalLanguageExample | str, label: int | None = None) -> EncodedFormalExample:
    """Encode ``<bos> string <cls> <yes|no>``.

    Args:
        example: a :class:`FormalLanguageExample`, or a raw string (then
            ``label`` must be given).
        label: 0 or 1; only with a raw string.

    Raises:
        ValueError: on a symbol outside the vocabulary alphabet, a missing or
            invalid ``label``, or a ``label`` passed together with an example.
    """
    if isinstance(example, FormalLanguageExample):
        if label is not None:
            raise ValueError("label must be None when example is a FormalLanguageExample (it has its own label)")
        string, label = example.string, example.label
    elif isinstance(example, str):
        string = example
    else:
        raise ValueError(f"example must be a FormalLanguageExample or a str, got {type(example).__name__}")
    if label not in (0, 1) or isinstance(label, bool):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    unknown = sorted(set(string) - set(_SYMBOLS))
    if unknown:
        raise ValueError(f"example string has symbols outside the alphabet {_SYMBOLS!r}: {unknown}")
    label_id = YES_ID if label == 1 else NO_ID
    input_ids = [BOS_ID, *(FORMAL_TOKEN_TO_ID[ch] for ch in string), CLS_ID, label_id]
    position = len(input_ids) - 1
    labels = [IGNORE_INDEX] * position + [label_id]
    return EncodedFormalExample(input_ids, labels, position)


class FormalLanguageDataset(Dataset):
    """Encoded examples as ``{"input_ids", "labels", "attention_mask"}`` (variable length).

    Batch them with :data:`formal_language_collate`. ``examples`` keeps the
    underlying :class:`FormalLanguageExample` list.
    """

    def __init__(self, examples: Sequence[FormalLanguageExample]) -> None:
        self.examples = list(examples)
        self._encoded = [encode_formal_example(example) for example in self.examples]

    @classmethod
    def generate(
        cls, language: str, num_examples: int, min_len: int, max_len: int, seed: int = 0
    ) -> FormalLanguageDataset:
        """Build from :func:`generate_formal_language_examples` (same arguments)."""
        return cls(generate_formal_language_examples(language, num_examples, min_len, max_len, seed))

    def __len__(self) -> int:
        return len(self._encoded)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        encoded = self._encoded[index]
        input_ids = torch.tensor(encoded.input_ids, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "attention_mask": torch.ones_like(input_ids),
        }


formal_language_collate = functools.partial(pad_collate, pad_token_id=PAD_ID)
"""``collate_fn`` that right-pads formal-language items (pad id 0, labels -100)."""


def make_length_generalization_datasets(
    language: str,
    num_train: int,
    num_test: int,
    train_lengths: tuple[int, int] = (1, 50),
    test_lengths: tuple[int, int] = (51, 100),
    seed: int = 0,
) -> tuple[FormalLanguageDataset, FormalLanguageDataset]:
    """Train on short strings, test on longer ones (the paper's protocol).

    Both sets are balanced; the test set uses a generator seeded differently
    (``seed + 1``) from the training set.

    Args:
        language: a name in :data:`~hope_hf.data.synthetic.FORMAL_LANGUAGES`.
        num_train, num_test: sizes of the two sets.
        train_lengths, test_lengths: inclusive ``(min_len, max_len)`` ranges.
        seed: seed of the training set.

    Raises:
        ValueError: as :func:`generate_formal_language_examples`, or if a
            length range is not a pair of integers.
    """
    for name, bounds in (("train_lengths", train_lengths), ("test_lengths", test_lengths)):
        if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
            raise ValueError(f"{name} must be a (min_len, max_len) pair, got {bounds!r}")
    train = FormalLanguageDataset.generate(language, num_train, *train_lengths, seed=seed)
    test = FormalLanguageDataset.generate(language, num_test, *test_lengths, seed=seed + 1)
    return train, test


def formal_language_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the yes/no decision of a causal LM on a formal-language batch.

    The prediction for the label token at position ``p`` is read from
    ``logits[:, p - 1]`` (causal shift), restricted to the ``<no>``/``<yes>``
    tokens.

    Args:
        logits: ``[batch, seq, vocab]`` model outputs.
        labels: ``[batch, seq]`` labels as produced by :func:`encode_formal_example`.

    Raises:
        ValueError: as :func:`~hope_hf.data.metrics.labelled_predictions`.
    """
    predicted, targets = labelled_predictions(logits, labels)
    choice = predicted[:, [NO_ID, YES_ID]].argmax(dim=-1)
    return float((torch.where(choice == 1, YES_ID, NO_ID) == targets).float().mean())
