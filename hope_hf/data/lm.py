"""Causal language-modelling datasets: tokenize a corpus and cut it into fixed blocks.

No dependency on the ``datasets`` package: the result is a plain
:class:`torch.utils.data.Dataset` of ``{"input_ids", "labels",
"attention_mask"}`` rows that ``transformers.Trainer`` (with its default
collator) or a ``DataLoader`` can batch directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._validation import check_int
from .tensor_dataset import DictTensorDataset

__all__ = ["tokenize_corpus", "tokenize_and_chunk"]


def tokenize_corpus(text_or_docs: str | Sequence[str], tokenizer, *, add_eos: bool | None = None) -> torch.Tensor:
    """Tokenize a string or a list of documents into one 1-D ``LongTensor`` stream.

    Args:
        text_or_docs: one string, or a sequence of document strings.
        tokenizer: a Hugging Face tokenizer (callable, with ``eos_token_id``).
        add_eos: append ``tokenizer.eos_token_id`` after every document.
            ``None`` (default) means ``True`` for a document list and ``False``
            for a single string.

    Raises:
        ValueError: if ``text_or_docs`` is neither a string nor a sequence of
            strings, holds no text, or ``add_eos`` is requested but the
            tokenizer has no EOS token.
    """
    if isinstance(text_or_docs, str):
        docs = [text_or_docs]
        add_eos = False if add_eos is None else add_eos
    elif isinstance(text_or_docs, Sequence) and all(isinstance(doc, str) for doc in text_or_docs):
        docs = list(text_or_docs)
        add_eos = True if add_eos is None else add_eos
    else:
        raise ValueError(f"text_or_docs must be a string or a sequence of strings, got {type(text_or_docs).__name__}")
    docs = [doc for doc in docs if doc]
    if not docs:
        raise ValueError("text_or_docs holds no text")
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("add_eos=True needs a tokenizer with an eos_token_id")

    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    pieces = []
    for ids in encoded:
        pieces.append(torch.as_tensor(ids, dtype=torch.long))
        if add_eos:
            pieces.append(torch.tensor([eos], dtype=torch.long))
    return torch.cat(pieces)


def tokenize_and_chunk(
    text_or_docs: str | Sequence[str],
    tokenizer,
    block_size: int,
    *,
    stride: int | None = None,
    add_eos: bool | None = None,
    max_blocks: int | None = None,
) -> DictTensorDataset:
    """Tokenize a corpus and cut the token stream into ``block_size`` blocks.

    Documents are concatenated (with EOS after each one, see
    :func:`tokenize_corpus`), then blocks start every ``stride`` tokens; the
    incomplete tail is dropped. Each row is
    ``{"input_ids": LongTensor[block_size], "labels": same values,
    "attention_mask": ones}`` -- labels are *not* shifted, the model shifts.

    Args:
        text_or_docs: one string, or a sequence of document strings.
        tokenizer: a Hugging Face tokenizer.
        block_size: tokens per block (a positive integer).
        stride: distance between block starts; ``None`` means ``block_size``
            (non-overlapping blocks). Must be a positive integer.
        add_eos: see :func:`tokenize_corpus`.
        max_blocks: keep at most this many blocks (the first ones); ``None`` keeps all.

    Returns:
        A :class:`~hope_hf.data.tensor_dataset.DictTensorDataset`.

    Raises:
        ValueError: on invalid arguments, or when the corpus has fewer than
            ``block_size`` tokens.
    """
    check_int("block_size", block_size)
    stride = block_size if stride is None else check_int("stride", stride)
    check_int("max_blocks", max_blocks, allow_none=True)

    stream = tokenize_corpus(text_or_docs, tokenizer, add_eos=add_eos)
    if stream.numel() < block_size:
        raise ValueError(
            f"the corpus has {stream.numel()} tokens, fewer than block_size={block_size}; "
            "give more text or a smaller block_size"
        )
    blocks = stream.unfold(0, block_size, stride)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    input_ids = blocks.contiguous()
    return DictTensorDataset(
        input_ids=input_ids,
        labels=input_ids.clone(),
        attention_mask=torch.ones_like(input_ids),
    )
