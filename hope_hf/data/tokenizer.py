"""Byte-level BPE tokenizers trained locally with the ``tokenizers`` library.

The result is a :class:`transformers.PreTrainedTokenizerFast`, so
``tok.save_pretrained(folder)`` followed by
``transformers.AutoTokenizer.from_pretrained(folder)`` gives back the same
tokenizer. Byte-level BPE (GPT-2 style: ``ByteLevel`` pre-tokenizer and
decoder, all 256 bytes in the initial alphabet) encodes any Unicode string
without unknown tokens, and ``decode(encode(text)) == text`` holds exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ._validation import check_int

__all__ = ["END_OF_TEXT", "train_bpe_tokenizer"]

END_OF_TEXT = "<|endoftext|>"
"""The document separator; also used as BOS, EOS, PAD and UNK token."""

_MIN_VOCAB_SIZE = 256  # the byte alphabet


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (),
    model_max_length: int | None = None,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    ``<|endoftext|>`` is always token 0 and serves as BOS, EOS, PAD and UNK
    (as in GPT-2); encoding adds no special token by itself. Training on the
    5 MB Shakespeare corpus takes about a second.

    Args:
        texts: the training strings (documents, lines, ...), any iterable.
        vocab_size: final vocabulary size, at least ``257 + len(special_tokens)``
            (256 bytes plus the special tokens). The vocabulary can end up smaller
            when the texts offer fewer merges.
        min_frequency: minimum pair count for a merge (a positive integer).
        special_tokens: extra special tokens appended after ``<|endoftext|>``.
        model_max_length: stored in the tokenizer config (e.g. the model's
            context length); ``None`` keeps the transformers default.
        show_progress: show the ``tokenizers`` training progress bar.

    Returns:
        A :class:`transformers.PreTrainedTokenizerFast` with
        ``clean_up_tokenization_spaces=False`` so decoding is exact.

    Raises:
        ValueError: on an invalid ``vocab_size``, ``min_frequency``,
            ``special_tokens`` or ``model_max_length``.
    """
    special = [END_OF_TEXT, *[tok for tok in special_tokens if tok != END_OF_TEXT]]
    if not all(isinstance(tok, str) and tok for tok in special):
        raise ValueError(f"special_tokens must be non-empty strings, got {list(special_tokens)!r}")
    check_int("vocab_size", vocab_size, _MIN_VOCAB_SIZE + len(special))  # bytes + special tokens
    check_int("min_frequency", min_frequency)
    check_int("model_max_length", model_max_length, allow_none=True)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator((text for text in texts if text), trainer=trainer)

    extra: dict = {}
    if model_max_length is not None:
        extra["model_max_length"] = model_max_length
    if len(special) > 1:
        extra["extra_special_tokens"] = special[1:]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,
        **extra,
    )
    return tokenizer
