"""Formal-language recognition tasks (Parity, (aa)*, (abab)*, a^n b^n, a^n b^n c^n, Shuffle-2, Dyck-2).

These are the recognition benchmarks used by the Nested Learning / HOPE paper
(after Bhattamishra et al., 2020, "On the Ability and Limitations of
Transformers to Recognize Formal Languages"): a model reads a string and
classifies it as a member of the language or not; it is trained on short
strings and tested on longer ones.

For each language this module gives

* a membership function ``is_in_<language>(s) -> bool``, written to be checked
  by hand; a character outside the language's alphabet makes it ``False``;
* a :class:`FormalLanguage` entry in :data:`FORMAL_LANGUAGES` that samples
  members of a given length and *hard* non-members (near-misses of the same
  length and alphabet: one symbol changed, two symbols swapped, block sizes
  shifted -- ``a^(n+1) b^(n-1)`` --, shuffled, crossing brackets ...).

:func:`generate_formal_language_examples` draws a balanced, seeded list of
examples whose labels are always computed by the membership function.

Languages (``name``: definition, alphabet, lengths of members):

* ``parity``: binary strings with an odd number of 1s; ``0 1``; any length >= 1.
* ``aa_star``: ``(aa)*``, even-length runs of ``a``; ``a``; even lengths. With a
  one-letter alphabet the non-members are the odd lengths (the only language
  here whose negatives cannot have the positives' lengths).
* ``abab_star``: ``(abab)*``; ``a b``; multiples of 4.
* ``anbn``: ``a^n b^n`` (n >= 0); ``a b``; even lengths.
* ``anbncn``: ``a^n b^n c^n`` (n >= 0); ``a b c``; multiples of 3.
* ``shuffle2``: shuffle of two Dyck-1 languages, ``()`` and ``[]``: each bracket
  type balanced on its own (no prefix closes more than it opened), types may
  cross (``([)]`` is a member); ``( ) [ ]``; even lengths.
* ``dyck2``: properly nested brackets of two types (``([])[]`` yes, ``([)]`` no);
  ``( ) [ ]``; even lengths.

The empty string is a member of every language but ``parity``; generators use
lengths >= 1 only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._validation import check_int

__all__ = [
    "is_in_parity",
    "is_in_aa_star",
    "is_in_abab_star",
    "is_in_anbn",
    "is_in_anbncn",
    "is_in_shuffle2",
    "is_in_dyck2",
    "FormalLanguage",
    "FormalLanguageExample",
    "FORMAL_LANGUAGES",
    "get_formal_language",
    "generate_formal_language_examples",
]

_BRACKET_PAIRS = {")": "(", "]": "["}
_OPENERS = tuple(_BRACKET_PAIRS.values())


# ---------------------------------------------------------------------------
# Membership functions
# ---------------------------------------------------------------------------


def _over(s: str, alphabet: str) -> bool:
    return all(ch in alphabet for ch in s)


def is_in_parity(s: str) -> bool:
    """``True`` iff ``s`` is a binary string with an odd number of ``1`` s."""
    return _over(s, "01") and s.count("1") % 2 == 1


def is_in_aa_star(s: str) -> bool:
    """``True`` iff ``s`` is in ``(aa)*``: only ``a`` s, an even number of them."""
    return _over(s, "a") and len(s) % 2 == 0


def is_in_abab_star(s: str) -> bool:
    """``True`` iff ``s`` is in ``(abab)*``: ``abab`` repeated zero or more times."""
    return len(s) % 4 == 0 and s == "abab" * (len(s) // 4)


def is_in_anbn(s: str) -> bool:
    """``True`` iff ``s == "a" * n + "b" * n`` for some ``n >= 0``."""
    n = len(s) // 2
    return len(s) % 2 == 0 and s == "a" * n + "b" * n


def is_in_anbncn(s: str) -> bool:
    """``True`` iff ``s == "a" * n + "b" * n + "c" * n`` for some ``n >= 0``."""
    n = len(s) // 3
    return len(s) % 3 == 0 and s == "a" * n + "b" * n + "c" * n


def is_in_shuffle2(s: str) -> bool:
    """``True`` iff ``()`` and ``[]`` are each balanced on their own (types may cross)."""
    if not _over(s, "()[]"):
        return False
    depth = {"(": 0, "[": 0}
    for ch in s:
        opener = _BRACKET_PAIRS.get(ch, ch)
        depth[opener] += 1 if ch in _OPENERS else -1
        if depth[opener] < 0:
            return False
    return depth["("] == 0 and depth["["] == 0


def is_in_dyck2(s: str) -> bool:
    """``True`` iff ``s`` is a properly nested string of ``()`` and ``[]``."""
    if not _over(s, "()[]"):
        return False
    stack: list[str] = []
    for ch in s:
        if ch in _OPENERS:
            stack.append(ch)
        elif not stack or stack.pop() != _BRACKET_PAIRS[ch]:
            return False
    return not stack


# ---------------------------------------------------------------------------
# Member samplers: (rng, length) -> member of that length
# ---------------------------------------------------------------------------


def _sample_parity(rng: random.Random, length: int) -> str:
    bits = [rng.choice("01") for _ in range(length)]
    if bits.count("1") % 2 == 0:
        i = rng.randrange(length)
        bits[i] = "1" if bits[i] == "0" else "0"
    return "".join(bits)


def _sample_blocks(alphabet: str) -> Callable[[random.Random, int], str]:
    """Members of ``a^n b^n ...``: each symbol of ``alphabet`` repeated ``length / k`` times."""

    def sample(rng: random.Random, length: int) -> str:
        return "".join(ch * (length // len(alphabet)) for ch in alphabet)

    return sample


def _sample_repeat(unit: str) -> Callable[[random.Random, int], str]:
    def sample(rng: random.Random, length: int) -> str:
        return unit * (length // len(unit))

    return sample


def _random_dyck1(rng: random.Random, length: int, opener: str, closer: str) -> str:
    return _random_dyck(rng, length, ((opener, closer),))


def _random_dyck(rng: random.Random, length: int, pairs: Sequence[tuple[str, str]] = (("(", ")"), ("[", "]"))) -> str:
    """A random properly nested string of even ``length`` (open w.p. 1/2 when both moves are legal)."""
    out: list[str] = []
    stack: list[str] = []
    for position in range(length):
        remaining = length - position
        if not stack or (len(stack) < remaining - 1 and rng.random() < 0.5):
            opener, closer = rng.choice(pairs)
            out.append(opener)
            stack.append(closer)
        else:
            out.append(stack.pop())
    return "".join(out)


def _sample_shuffle2(rng: random.Random, length: int) -> str:
    """Interleave a random Dyck-1 word over ``()`` with one over ``[]`` (uniform interleaving)."""
    pairs = length // 2
    round_pairs = rng.randint(0, pairs)
    round_word = _random_dyck1(rng, 2 * round_pairs, "(", ")")
    square_word = iter(_random_dyck1(rng, length - 2 * round_pairs, "[", "]"))
    round_slots = set(rng.sample(range(length), 2 * round_pairs))
    round_iter = iter(round_word)
    return "".join(next(round_iter) if i in round_slots else next(square_word) for i in range(length))


# ---------------------------------------------------------------------------
# Near-miss perturbations: (rng, member, alphabet) -> same-length candidate
# ---------------------------------------------------------------------------

Perturbation = Callable[[random.Random, str, str], str]


def _substitute_one(rng: random.Random, s: str, alphabet: str) -> str:
    """Replace one symbol by a different symbol of the alphabet."""
    i = rng.randrange(len(s))
    return s[:i] + rng.choice([ch for ch in alphabet if ch != s[i]]) + s[i + 1 :]


def _swap_adjacent(rng: random.Random, s: str, alphabet: str) -> str:
    """Swap two neighbouring, different symbols."""
    spots = [i for i in range(len(s) - 1) if s[i] != s[i + 1]]
    if not spots:
        return s
    i = rng.choice(spots)
    return s[:i] + s[i + 1] + s[i] + s[i + 2 :]


def _shuffle(rng: random.Random, s: str, alphabet: str) -> str:
    """A random permutation: same symbol counts, wrong order."""
    chars = list(s)
    rng.shuffle(chars)
    return "".join(chars)


def _rotate(rng: random.Random, s: str, alphabet: str) -> str:
    """A cyclic rotation by a random offset."""
    k = rng.randrange(1, len(s)) if len(s) > 1 else 0
    return s[k:] + s[:k]


def _shift_block_sizes(rng: random.Random, s: str, alphabet: str) -> str:
    """Move 1 or 2 symbols between blocks: ``a^n b^n`` -> ``a^(n+d) b^(n-d)`` (same length)."""
    counts = [s.count(ch) for ch in alphabet]
    donors = [i for i, c in enumerate(counts) if c > 0]
    if not donors or len(alphabet) < 2:
        return s
    donor = rng.choice(donors)
    receiver = rng.choice([i for i in range(len(alphabet)) if i != donor])
    moved = rng.randint(1, min(2, counts[donor]))
    counts[donor] -= moved
    counts[receiver] += moved
    return "".join(ch * c for ch, c in zip(alphabet, counts))


def _swap_first_opener(rng: random.Random, s: str, alphabet: str) -> str:
    """Swap the first opener of a bracket type with one of its closers (counts kept, prefix broken)."""
    kinds = [(o, c) for c, o in _BRACKET_PAIRS.items() if o in s]
    if not kinds:
        return s
    opener, closer = rng.choice(kinds)
    i = s.index(opener)
    j = rng.choice([k for k, ch in enumerate(s) if ch == closer])
    chars = list(s)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def _crossing_shuffle2(rng: random.Random, s: str, alphabet: str) -> str:
    """A Shuffle-2 member of the same length: balanced per type, possibly crossing (``([)]``)."""
    return _sample_shuffle2(rng, len(s))


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FormalLanguage:
    """A recognition task: membership, member sampler and near-miss generators.

    Attributes:
        name: registry key.
        alphabet: the symbols, in order.
        is_member: the membership function (the only source of labels).
        member_length_ok: which lengths have members.
        sample_member: ``(rng, length) -> str``, a member of that length.
        perturbations: ``(rng, member, alphabet) -> str`` same-length near-misses.
        non_member_length_ok: which lengths non-members are drawn at; ``None``
            means the member lengths (so length carries no label information).
        sample_non_member: ``(rng, length) -> str``, used instead of the
            perturbations when given.
    """

    name: str
    alphabet: str
    is_member: Callable[[str], bool]
    member_length_ok: Callable[[int], bool]
    sample_member: Callable[[random.Random, int], str]
    perturbations: tuple[Perturbation, ...] = ()
    non_member_length_ok: Callable[[int], bool] | None = None
    sample_non_member: Callable[[random.Random, int], str] | None = None

    def lengths(self, label: int, min_len: int, max_len: int) -> list[int]:
        """The lengths in ``[min_len, max_len]`` at which examples of class ``label`` are drawn."""
        ok = self.member_length_ok if label == 1 else (self.non_member_length_ok or self.member_length_ok)
        return [n for n in range(max(min_len, 1), max_len + 1) if ok(n)]

    def candidate(self, rng: random.Random, label: int, length: int) -> str:
        """A string meant to have class ``label`` (checked by the caller with ``is_member``)."""
        if label == 1:
            return self.sample_member(rng, length)
        if self.sample_non_member is not None:
            return self.sample_non_member(rng, length)
        perturb = rng.choice(self.perturbations)
        return perturb(rng, self.sample_member(rng, length), self.alphabet)


_BRACKET_PERTURBATIONS = (_substitute_one, _swap_adjacent, _swap_first_opener)
_BLOCK_PERTURBATIONS = (_shift_block_sizes, _swap_adjacent, _shuffle, _substitute_one)

FORMAL_LANGUAGES: dict[str, FormalLanguage] = {
    lang.name: lang
    for lang in (
        FormalLanguage("parity", "01", is_in_parity, lambda n: n >= 1, _sample_parity, (_substitute_one,)),
        FormalLanguage(
            "aa_star",
            "a",
            is_in_aa_star,
            lambda n: n % 2 == 0,
            _sample_repeat("a"),
            non_member_length_ok=lambda n: n % 2 == 1,
            sample_non_member=lambda rng, n: "a" * n,
        ),
        FormalLanguage(
            "abab_star",
            "ab",
            is_in_abab_star,
            lambda n: n % 4 == 0,
            _sample_repeat("abab"),
            (_substitute_one, _swap_adjacent, _rotate, _shuffle),
        ),
        FormalLanguage("anbn", "ab", is_in_anbn, lambda n: n % 2 == 0, _sample_blocks("ab"), _BLOCK_PERTURBATIONS),
        FormalLanguage(
            "anbncn", "abc", is_in_anbncn, lambda n: n % 3 == 0, _sample_blocks("abc"), _BLOCK_PERTURBATIONS
        ),
        FormalLanguage(
            "shuffle2", "()[]", is_in_shuffle2, lambda n: n % 2 == 0, _sample_shuffle2, _BRACKET_PERTURBATIONS
        ),
        FormalLanguage(
            "dyck2",
            "()[]",
            is_in_dyck2,
            lambda n: n % 2 == 0,
            _random_dyck,
            _BRACKET_PERTURBATIONS + (_crossing_shuffle2,),
        ),
    )
}
"""All languages by name: parity, aa_star, abab_star, anbn, anbncn, shuffle2, dyck2."""


def get_formal_language(name: str) -> FormalLanguage:
    """Look a language up by name.

    Raises:
        ValueError: naming the accepted names if ``name`` is unknown.
    """
    try:
        return FORMAL_LANGUAGES[name]
    except (KeyError, TypeError):
        raise ValueError(f"language must be one of {sorted(FORMAL_LANGUAGES)}, got {name!r}") from None


@dataclass(frozen=True)
class FormalLanguageExample:
    """One recognition example: ``label`` is ``int(is_member(string))``."""

    language: str
    string: str
    label: int


_MAX_TRIES = 1000


def _draw(language: FormalLanguage, rng: random.Random, label: int, lengths: list[int]) -> str:
    for _ in range(_MAX_TRIES):
        s = language.candidate(rng, label, rng.choice(lengths))
        if int(language.is_member(s)) == label:
            return s
    raise RuntimeError(f"could not draw a {'member' if label else 'non-member'} of {language.name!r}")


def generate_formal_language_examples(
    language: str,
    num_examples: int,
    min_len: int,
    max_len: int,
    seed: int = 0,
) -> list[FormalLanguageExample]:
    """Draw a balanced, shuffled list of recognition examples.

    ``num_examples // 2`` members and the rest non-members. For each example
    the length is uniform over the lengths of ``[min_len, max_len]`` where the
    class exists (for all languages but ``aa_star`` members and non-members
    share those lengths); non-members are near-misses of a member (see module
    docstring). Every label is ``int(is_member(string))``.

    Args:
        language: a name in :data:`FORMAL_LANGUAGES`.
        num_examples: number of examples (a positive integer).
        min_len: shortest string length, >= 1.
        max_len: longest string length, >= ``min_len``.
        seed: seed of the ``random.Random`` generator; same seed, same list.

    Raises:
        ValueError: on an unknown language, invalid counts or lengths, or a
            length range holding no member (or no non-member) of the language.
    """
    lang = get_formal_language(language)
    check_int("num_examples", num_examples)
    check_int("min_len", min_len)
    check_int("max_len", max_len, min_len)
    lengths = {label: lang.lengths(label, min_len, max_len) for label in (1, 0)}
    for label, found in lengths.items():
        if not found:
            kind = "member" if label else "non-member"
            raise ValueError(f"min_len={min_len}, max_len={max_len}: the range holds no {kind} length of {language!r}")
    rng = random.Random(seed)
    labels = [1] * (num_examples // 2) + [0] * (num_examples - num_examples // 2)
    rng.shuffle(labels)
    strings = [_draw(lang, rng, label, lengths[label]) for label in labels]
    return [FormalLanguageExample(language, s, int(lang.is_member(s))) for s in strings]
