"""Multi-query associative recall (MQAR, Zoology / Based style).

Each sequence first lists ``num_kv_pairs`` key-value pairs, then asks
``num_queries`` of the keys again; after each query key the model must emit the
value that key was bound to::

    k1 v1 k2 v2 ... kN vN | 0 0 q1 a1 0 q2 a2 0 0 ...
                              (queries in random 2-token slots, 0 = filler)

Token ids (as in Zoology): ``0`` is the filler / padding token, keys are drawn
from ``[1, vocab_size // 2)`` and values from ``[vocab_size // 2, vocab_size)``.
Keys are distinct within a sequence, and so are values; each query asks a
different key. ``labels`` equals the answer value at the answer positions and
``-100`` elsewhere; labels are not shifted (a Hugging Face causal LM predicts
``labels[t]`` from the prefix ending at ``t - 1``, i.e. from the query key).
"""

from __future__ import annotations

import torch

from .._validation import check_int
from ..collate import IGNORE_INDEX
from ..tensor_dataset import DictTensorDataset

__all__ = ["FILLER_ID", "generate_mqar", "make_associative_recall"]

FILLER_ID = 0
"""Filler / padding token between query slots."""


def generate_mqar(
    num_examples: int,
    *,
    vocab_size: int = 8192,
    seq_len: int = 256,
    num_kv_pairs: int = 16,
    num_queries: int | None = None,
    seed: int = 0,
) -> DictTensorDataset:
    """Generate MQAR sequences as ``{"input_ids", "labels", "attention_mask"}`` rows.

    Args:
        num_examples: number of sequences.
        vocab_size: total vocabulary (keys take the lower half minus token 0,
            values the upper half); needs ``num_kv_pairs < vocab_size // 2``.
        seq_len: sequence length, at least ``2 * (num_kv_pairs + num_queries)``.
            The room after the pairs holds the query slots, placed uniformly at
            random among the 2-token slots, the rest is filler.
        num_kv_pairs: pairs per sequence.
        num_queries: queried keys per sequence (distinct), at most
            ``num_kv_pairs``; ``None`` queries every key.
        seed: seed of the ``torch.Generator``; same seed, same data.

    Returns:
        A :class:`~hope_hf.data.tensor_dataset.DictTensorDataset` whose tensors
        are ``[num_examples, seq_len]`` ``LongTensor`` s (attention mask all ones).

    Raises:
        ValueError: naming the offending argument when the sizes do not fit.
    """
    check_int("num_examples", num_examples)
    check_int("vocab_size", vocab_size)
    check_int("seq_len", seq_len)
    check_int("num_kv_pairs", num_kv_pairs)
    num_queries = num_kv_pairs if num_queries is None else check_int("num_queries", num_queries)
    if num_queries > num_kv_pairs:
        raise ValueError(f"num_queries must be <= num_kv_pairs={num_kv_pairs}, got {num_queries}")
    key_end = vocab_size // 2
    if num_kv_pairs > key_end - 1 or num_kv_pairs > vocab_size - key_end:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for num_kv_pairs={num_kv_pairs} distinct keys and values; "
            f"use vocab_size >= {2 * num_kv_pairs + 2}"
        )
    context = 2 * num_kv_pairs
    if seq_len < context + 2 * num_queries:
        raise ValueError(
            f"seq_len must be >= 2 * (num_kv_pairs + num_queries) = {context + 2 * num_queries}, got {seq_len}"
        )
    num_slots = (seq_len - context) // 2

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.full((num_examples, seq_len), FILLER_ID, dtype=torch.long)
    labels = torch.full((num_examples, seq_len), IGNORE_INDEX, dtype=torch.long)
    for row in range(num_examples):
        keys = torch.randperm(key_end - 1, generator=generator)[:num_kv_pairs] + 1
        values = torch.randperm(vocab_size - key_end, generator=generator)[:num_kv_pairs] + key_end
        input_ids[row, 0:context:2] = keys
        input_ids[row, 1:context:2] = values
        asked = torch.randperm(num_kv_pairs, generator=generator)[:num_queries]
        slots = torch.randperm(num_slots, generator=generator)[:num_queries].sort().values
        query_positions = context + 2 * slots
        input_ids[row, query_positions] = keys[asked]
        input_ids[row, query_positions + 1] = values[asked]
        labels[row, query_positions + 1] = values[asked]
    return DictTensorDataset(
        input_ids=input_ids,
        labels=labels,
        attention_mask=torch.ones_like(input_ids),
    )


def make_associative_recall(
    num_examples: int,
    *,
    vocab_size: int = 64,
    num_kv_pairs: int = 4,
    num_queries: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
) -> DictTensorDataset:
    """In-context associative recall sized for a tiny CPU model (a small MQAR).

    Same layout and arguments as :func:`generate_mqar`, with small defaults;
    ``seq_len=None`` packs the queries right after the pairs
    (``seq_len = 2 * (num_kv_pairs + num_queries)``, 16 tokens by default).
    The key-value bindings change in every sequence, so the task can only be
    solved by memorising the pairs *in context*.
    """
    queries = num_kv_pairs if num_queries is None else num_queries
    if seq_len is None and isinstance(queries, int) and isinstance(num_kv_pairs, int):
        seq_len = 2 * (num_kv_pairs + queries)
    return generate_mqar(
        num_examples,
        vocab_size=vocab_size,
        seq_len=seq_len,
        num_kv_pairs=num_kv_pairs,
        num_queries=num_queries,
        seed=seed,
    )
