"""Needle-in-a-haystack (NIAH) prompts on the Paul Graham essays.

A *needle* sentence ("The special magic number is 48213.") is hidden at a given
depth of a *haystack* made of essay text cut to a given context length; the
prompt then asks for the number. As in the original NIAH test, the needle is
placed at the sentence boundary at or before the requested depth.

Lengths are measured with ``tokenizer`` when one is given (tokens, no special
tokens), otherwise in whitespace-separated words.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._validation import check_fraction, check_int

__all__ = [
    "DEFAULT_QUESTION",
    "DEFAULT_ANSWER_PREFIX",
    "DEFAULT_NEEDLE_TEMPLATE",
    "NIAHExample",
    "encode_niah_example",
    "make_niah_example",
    "make_niah_grid",
    "score_niah",
]

DEFAULT_NEEDLE_TEMPLATE = "The special magic number is {answer}."
DEFAULT_QUESTION = "What is the special magic number mentioned in the text above?"
DEFAULT_ANSWER_PREFIX = "The special magic number is"

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class NIAHExample:
    """One NIAH prompt.

    Attributes:
        prompt: ``context + "\\n\\n" + question + "\\n" + answer_prefix``; feed
            it to the model and score the continuation with :func:`score_niah`.
        context: the haystack with the needle inside.
        answer: the expected answer (the magic number).
        needle: the inserted sentence.
        needle_position: character offset of the needle in ``context`` (and ``prompt``).
        depth: realised depth, ``needle_position / len(context)``.
        context_tokens: length of ``context`` (tokens, or words without tokenizer).
    """

    prompt: str
    context: str
    answer: str
    needle: str
    needle_position: int
    depth: float
    context_tokens: int


def _length_function(tokenizer) -> Callable[[str], int]:
    if tokenizer is None:
        return lambda text: len(text.split())
    return lambda text: len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _resolve_needle(needle: str | None, answer: str | None, rng: random.Random) -> tuple[str, str, bool]:
    """Return ``(needle, answer, answer_was_drawn)``."""
    if needle is None:
        drawn = answer is None
        answer = str(rng.randint(10_000, 99_999)) if drawn else answer
        return DEFAULT_NEEDLE_TEMPLATE.format(answer=answer), answer, drawn
    if answer is None:
        numbers = _NUMBER.findall(needle)
        if not numbers:
            raise ValueError(f"needle {needle!r} holds no number; pass answer= explicitly")
        return needle, numbers[-1], False
    if answer not in needle:
        raise ValueError(f"answer {answer!r} must appear in needle {needle!r}")
    return needle, answer, False


def _haystack_text(docs: Sequence[str], budget: int, measure: Callable[[str], int], rng: random.Random) -> str:
    """Essays from a random start, cycling, joined by blank lines, cut to ``budget`` units."""
    start = rng.randrange(len(docs))
    parts: list[str] = []
    chars = 0
    index = start
    # Grow in rounds: at least 8 characters per unit is plenty for text.
    while True:
        while chars < 8 * budget:
            parts.append(docs[index % len(docs)])
            chars += len(parts[-1]) + 2
            index += 1
        text = "\n\n".join(parts)
        if measure(text) >= budget:
            break
        chars *= 2
    # Largest prefix ending at a word boundary whose length fits the budget.
    cuts = [m.start() for m in re.finditer(r"\s+", text)] + [len(text)]
    low, high = 0, len(cuts) - 1
    best = 0
    while low <= high:
        mid = (low + high) // 2
        if measure(text[: cuts[mid]]) <= budget:
            best, low = cuts[mid], mid + 1
        else:
            high = mid - 1
    return text[:best]


def _insertion_point(haystack: str, depth_fraction: float) -> int:
    """Character offset of the last sentence boundary at or before the requested depth."""
    target = round(depth_fraction * len(haystack))
    if target <= 0:
        return 0
    if target >= len(haystack):
        return len(haystack)
    boundary = 0
    for match in _SENTENCE_END.finditer(haystack, 0, target + 1):
        boundary = match.end()
    if boundary == 0:
        space = haystack.rfind(" ", 0, target)
        boundary = space + 1 if space > 0 else 0
    return boundary


def make_niah_example(
    essays: Sequence[str] | str | None = None,
    *,
    context_tokens: int,
    depth_fraction: float,
    tokenizer=None,
    needle: str | None = None,
    answer: str | None = None,
    question: str = DEFAULT_QUESTION,
    answer_prefix: str = DEFAULT_ANSWER_PREFIX,
    seed: int = 0,
) -> NIAHExample:
    """Hide a needle at ``depth_fraction`` of a ``context_tokens`` long haystack.

    Args:
        essays: haystack documents; ``None`` loads the Paul Graham essays
            (:func:`~hope_hf.data.load_paul_graham_essays`). The haystack starts
            at a seeded random essay and continues with the next ones (cycling
            if needed), cut at a word boundary.
        context_tokens: length of the context (haystack + needle), measured with
            ``tokenizer`` or, without it, in words.
        depth_fraction: where the needle goes, 0.0 (start) to 1.0 (end); snapped
            back to the previous sentence end.
        tokenizer: a Hugging Face tokenizer used to measure lengths, or ``None``.
        needle: the sentence to hide; ``None`` uses
            ``"The special magic number is {answer}."``.
        answer: the expected answer; ``None`` draws a random 5-digit number
            (when ``needle`` is ``None``) or takes the last number of ``needle``.
        question, answer_prefix: appended after the context to form the prompt.
        seed: seed of the ``random.Random`` choosing the start essay and the number.

    Raises:
        ValueError: on an empty ``essays``, ``context_tokens`` too small to hold
            the needle, ``depth_fraction`` outside [0, 1], or a needle/answer mismatch.
    """
    check_fraction("depth_fraction", depth_fraction, inclusive=True)
    check_int("context_tokens", context_tokens)
    if essays is None:
        from ..corpora import load_paul_graham_essays

        essays = load_paul_graham_essays()
    docs = [essays] if isinstance(essays, str) else list(essays)
    docs = [doc for doc in docs if isinstance(doc, str) and doc.strip()]
    if not docs:
        raise ValueError("essays must hold at least one non-empty string")

    rng = random.Random(seed)
    needle, answer, drawn = _resolve_needle(needle, answer, rng)
    measure = _length_function(tokenizer)
    budget = context_tokens - measure(needle + " ")
    if budget < 1:
        raise ValueError(f"context_tokens={context_tokens} is too small to hold the needle {needle!r}")
    haystack = _haystack_text(docs, budget, measure, rng)
    while drawn and answer in haystack:  # the number must appear only in the needle
        answer = str(rng.randint(10_000, 99_999))
        needle = DEFAULT_NEEDLE_TEMPLATE.format(answer=answer)

    cut = _insertion_point(haystack, depth_fraction)
    left, right = haystack[:cut].rstrip(), haystack[cut:].lstrip()
    context = " ".join(part for part in (left, needle, right) if part)
    position = len(left) + 1 if left else 0
    return NIAHExample(
        prompt=f"{context}\n\n{question}\n{answer_prefix}",
        context=context,
        answer=answer,
        needle=needle,
        needle_position=position,
        depth=position / len(context),
        context_tokens=measure(context),
    )


def make_niah_grid(
    context_lengths: Sequence[int],
    depth_fractions: Sequence[float],
    essays: Sequence[str] | str | None = None,
    *,
    tokenizer=None,
    samples_per_cell: int = 1,
    seed: int = 0,
) -> list[NIAHExample]:
    """NIAH examples for every ``(context length, depth)`` pair, ``samples_per_cell`` each.

    Cells get distinct seeds derived from ``seed``; the essays are loaded once.
    Arguments and errors as :func:`make_niah_example`.
    """
    check_int("samples_per_cell", samples_per_cell)
    if essays is None:
        from ..corpora import load_paul_graham_essays

        essays = load_paul_graham_essays()
    examples = []
    cell_seed = seed
    for length in context_lengths:
        for depth in depth_fractions:
            for _ in range(samples_per_cell):
                examples.append(
                    make_niah_example(
                        essays, context_tokens=length, depth_fraction=depth, tokenizer=tokenizer, seed=cell_seed
                    )
                )
                cell_seed += 1
    return examples


def score_niah(generated: str, answer: str) -> float:
    """1.0 if the model found the needle, else 0.0.

    For a numeric ``answer`` the *first* number in ``generated`` must equal it
    exactly (so "482130" or "12 48213" score 0); otherwise ``answer`` must occur
    in ``generated``.
    """
    if answer.isdigit():
        match = _NUMBER.search(generated)
        return float(match is not None and match.group() == answer)
    return float(answer in generated)


def encode_niah_example(example: NIAHExample, tokenizer) -> dict:
    """``{"input_ids", "labels", "attention_mask"}`` (``torch.long``) for training or teacher-forced scoring:
    the prompt followed by `` <answer>``, with labels only on the answer tokens (``-100`` elsewhere;
    unshifted, Hugging Face style).

    The answer is tokenized as ``" " + answer``, the way it follows ``"... is"`` in the needle, so a model
    can copy the needle's tokens. Batch with :func:`hope_hf.data.pad_collate`.

    Raises:
        ValueError: if the tokenizer gives the answer no token.
    """
    import torch

    from ..collate import IGNORE_INDEX

    prompt_ids = tokenizer(example.prompt, add_special_tokens=False, verbose=False)["input_ids"]
    answer_ids = tokenizer(" " + example.answer, add_special_tokens=False, verbose=False)["input_ids"]
    if not answer_ids:
        raise ValueError(f"the tokenizer encodes the answer {example.answer!r} as no token")
    input_ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
    labels = torch.tensor([IGNORE_INDEX] * len(prompt_ids) + answer_ids, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
