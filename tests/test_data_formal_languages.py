"""Formal-language membership functions, generators and their tokenization."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from hope_hf.data.synthetic import (
    CLS_ID,
    FORMAL_LANGUAGES,
    FORMAL_VOCAB,
    NO_ID,
    PAD_ID,
    YES_ID,
    FormalLanguageDataset,
    encode_formal_example,
    formal_language_accuracy,
    formal_language_collate,
    generate_formal_language_examples,
    is_in_aa_star,
    is_in_abab_star,
    is_in_anbn,
    is_in_anbncn,
    is_in_dyck2,
    is_in_parity,
    is_in_shuffle2,
    make_length_generalization_datasets,
)

# Hand-checked (string, expected membership) tables.
HAND_CHECKED = {
    is_in_parity: [
        ("1", True), ("1101", True), ("0111", True), ("10000", True),
        ("", False), ("0", False), ("11", False), ("1001", False), ("1121", False), ("abc", False),
    ],
    is_in_aa_star: [
        ("", True), ("aa", True), ("aaaa", True),
        ("a", False), ("aaa", False), ("ab", False), ("aab", False), ("bb", False),
    ],
    is_in_abab_star: [
        ("", True), ("abab", True), ("abababab", True),
        ("ab", False), ("ababab", False), ("baba", False), ("abba", False), ("aabb", False), ("ababa", False),
    ],
    is_in_anbn: [
        ("", True), ("ab", True), ("aabb", True), ("aaabbb", True),
        ("aab", False), ("abb", False), ("ba", False), ("abab", False), ("aabbb", False), ("aaabbbb", False),
        ("aabc", False), ("bbaa", False),
    ],
    is_in_anbncn: [
        ("", True), ("abc", True), ("aabbcc", True), ("aaabbbccc", True),
        ("aabbc", False), ("abcabc", False), ("aabcbc", False), ("acb", False), ("aabbbc", False), ("ab", False),
    ],
    is_in_shuffle2: [
        ("", True), ("()", True), ("[]", True), ("([)]", True), ("[(])", True), ("(()[])", True), ("(([]))[]", True),
        ("(]", False), (")(", False), ("([)", False), ("][", False), ("(()", False), ("())(", False), ("(a)", False),
    ],
    is_in_dyck2: [
        ("", True), ("()", True), ("[]", True), ("(()[])", True), ("([])[]", True), ("[([])]()", True),
        ("([)]", False), ("[(])", False), ("(]", False), (")(", False), ("(()", False), ("())", False),
        ("((", False), ("(a)", False),
    ],
}


@pytest.mark.parametrize(
    "is_member, string, expected",
    [(fn, s, e) for fn, cases in HAND_CHECKED.items() for s, e in cases],
    ids=lambda v: v.__name__ if callable(v) else repr(v),
)
def test_membership_hand_checked(is_member, string, expected):
    assert is_member(string) is expected


def test_registry_is_complete():
    assert set(FORMAL_LANGUAGES) == {"parity", "aa_star", "abab_star", "anbn", "anbncn", "shuffle2", "dyck2"}
    assert {lang.is_member for lang in FORMAL_LANGUAGES.values()} == set(HAND_CHECKED)


LENGTH_RANGES = {
    "parity": (1, 30),
    "aa_star": (1, 30),
    "abab_star": (4, 40),
    "anbn": (2, 30),
    "anbncn": (3, 30),
    "shuffle2": (2, 30),
    "dyck2": (2, 30),
}


@pytest.mark.parametrize("name", sorted(FORMAL_LANGUAGES))
def test_generator_labels_balance_and_lengths(name):
    min_len, max_len = LENGTH_RANGES[name]
    lang = FORMAL_LANGUAGES[name]
    examples = generate_formal_language_examples(name, 400, min_len, max_len, seed=1)
    assert len(examples) == 400
    assert Counter(e.label for e in examples) == {0: 200, 1: 200}
    for e in examples:
        assert e.language == name
        assert e.label == int(lang.is_member(e.string))
        assert min_len <= len(e.string) <= max_len
        assert set(e.string) <= set(lang.alphabet)
    if name != "aa_star":  # (aa)* has one string per length; the others share lengths across classes
        assert len({e.string for e in examples if e.label == 0}) > 50  # varied negatives
        pos_lengths = {len(e.string) for e in examples if e.label == 1}
        neg_lengths = {len(e.string) for e in examples if e.label == 0}
        assert neg_lengths <= pos_lengths


def test_generator_is_seeded():
    first = generate_formal_language_examples("dyck2", 50, 2, 20, seed=7)
    assert first == generate_formal_language_examples("dyck2", 50, 2, 20, seed=7)
    assert first != generate_formal_language_examples("dyck2", 50, 2, 20, seed=8)


def test_negatives_are_near_misses():
    """Hard negatives exist: crossing brackets for Dyck-2, right counts but wrong order for a^n b^n."""
    dyck = generate_formal_language_examples("dyck2", 400, 4, 20, seed=0)
    assert any(is_in_shuffle2(e.string) for e in dyck if e.label == 0)
    anbn = generate_formal_language_examples("anbn", 400, 2, 20, seed=0)
    negatives = [e.string for e in anbn if e.label == 0]
    assert any(s.count("a") == s.count("b") for s in negatives)  # shuffled order
    assert any(s == "a" * s.count("a") + "b" * s.count("b") for s in negatives)  # a^n b^m, m != n
    shuffle = generate_formal_language_examples("shuffle2", 400, 4, 20, seed=0)
    balanced_counts = [
        e.string for e in shuffle if e.label == 0 and e.string.count("(") == e.string.count(")")
        and e.string.count("[") == e.string.count("]")
    ]
    assert balanced_counts  # per-type counts right, prefix condition broken


@pytest.mark.parametrize(
    "args, match",
    [
        (("klingon", 10, 1, 5), "language must be one of"),
        (("parity", 0, 1, 5), "num_examples"),
        (("parity", 10, 0, 5), "min_len"),
        (("parity", 10, 5, 4), "max_len"),
        (("anbncn", 10, 1, 2), "no member"),
        (("aa_star", 10, 4, 4), "no non-member"),
    ],
)
def test_generator_errors(args, match):
    with pytest.raises(ValueError, match=match):
        generate_formal_language_examples(*args)


def test_encode_formal_example():
    (example,) = [e for e in generate_formal_language_examples("anbn", 2, 4, 4, seed=0) if e.label == 1]
    encoded = encode_formal_example(example)
    tokens = [FORMAL_VOCAB[i] for i in encoded.input_ids]
    assert tokens == ["<bos>", "a", "a", "b", "b", "<cls>", "<yes>"]
    assert encoded.label_position == 6
    assert encoded.labels == [-100] * 6 + [YES_ID]
    negative = encode_formal_example("([)]", label=0)
    assert negative.input_ids[-2:] == [CLS_ID, NO_ID]
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        encode_formal_example("ab")
    with pytest.raises(ValueError, match="outside the alphabet"):
        encode_formal_example("abz", label=1)
    with pytest.raises(ValueError, match="label must be None"):
        encode_formal_example(example, label=1)


def test_formal_dataset_collate_and_accuracy():
    dataset = FormalLanguageDataset.generate("parity", 16, 1, 9, seed=0)
    batch = next(iter(DataLoader(dataset, batch_size=16, collate_fn=formal_language_collate)))
    lengths = [len(e.string) + 3 for e in dataset.examples]
    assert batch["input_ids"].shape == (16, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert bool((batch["input_ids"][batch["attention_mask"] == 0] == PAD_ID).all())
    assert ((batch["labels"] != -100).sum(dim=1) == 1).all()
    # An oracle that puts the right answer at the <cls> position scores 1; its opposite 0.
    logits = torch.zeros(*batch["input_ids"].shape, len(FORMAL_VOCAB))
    rows, cols = torch.nonzero(batch["labels"] != -100, as_tuple=True)
    logits[rows, cols - 1, batch["labels"][rows, cols]] = 5.0
    assert formal_language_accuracy(logits, batch["labels"]) == 1.0
    flipped = torch.where(batch["labels"] == YES_ID, NO_ID, torch.where(batch["labels"] == NO_ID, YES_ID, -100))
    assert formal_language_accuracy(logits, flipped) == 0.0


def test_length_generalization_datasets():
    train, test = make_length_generalization_datasets("dyck2", 40, 20, train_lengths=(2, 10), test_lengths=(12, 24))
    assert max(len(e.string) for e in train.examples) <= 10
    assert min(len(e.string) for e in test.examples) >= 12
    assert len(train) == 40 and len(test) == 20
    with pytest.raises(ValueError, match="train_lengths"):
        make_length_generalization_datasets("dyck2", 4, 4, train_lengths=10)
