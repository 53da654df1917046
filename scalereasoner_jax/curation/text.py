"""Text helpers shared by the adversaries and the checks: words, normalisation, overlap, rotations.

Every adversary and check sees text through these few functions, so "word", "identical after
normalisation" and "rotation" mean the same thing everywhere in the report.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Mapping, Sequence

__all__ = [
    "MAGNIFICATION_WORDS",
    "STOPWORDS",
    "content_words",
    "jaccard",
    "letter_mentions",
    "letters",
    "normalize",
    "remap_letters",
    "rotate",
    "rotated_key",
    "word_set",
    "words",
]

_WORD = re.compile(r"[a-z0-9]+")

# Function words: shared by almost every option and question, so they would only add noise to the
# question-overlap rule (the option-hub rule keeps them, as DESIGN.md §3 defines it on all words).
_STOPWORD_TEXT = (
    "a an the of and or in on at to for with by from as is are was were be been being this that "
    "these those it its which what who whom whose how why when where there their than then both "
    "either neither not no nor but if into onto over under between within without all any each most "
    "more such only same other can could may might shall should will would do does did has have had"
)
STOPWORDS: frozenset[str] = frozenset(_STOPWORD_TEXT.split())


# Words that name a magnification: "10x", "200 ×", "low-power", "high magnification", "HPF", "objective".
MAGNIFICATION_WORDS = re.compile(
    r"(?<![\w.])\d+(?:\.\d+)?\s*[x×](?![a-z0-9])"
    r"|\b(?:low|lower|mid|middle|medium|intermediate|high|higher)[\s-]*(?:power|magnification|mag)\b"
    r"|\bmagnifications?\b|\bhpfs?\b|\bobjectives?\b|\bzoom(?:ed)?\b",
    re.IGNORECASE,
)


def normalize(text: str) -> str:
    """Case-folded, NFKC, punctuation to spaces, whitespace collapsed ("identical after normalisation")."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if (unicodedata.category(c)[0] in "PSZC") else c for c in text)
    return " ".join(text.split())


def words(text: str) -> list[str]:
    """Lower-case alphanumeric runs (the same definition the synthetic set's tests use)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def word_set(text: str) -> frozenset[str]:
    return frozenset(words(text))


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in words(text) if w not in STOPWORDS)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b|; two empty sets count as identical (1.0)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def letters(k: int) -> list[str]:
    """The first ``k`` option letters."""
    return list(string.ascii_uppercase[:k])


def rotate(options: Mapping[str, str], r: int) -> dict[str, str]:
    """Cyclic rotation by ``r``: the option at letter ``i`` moves to letter ``i - r`` (mod k).

    Rotation 0 is the published order; over r = 0..k-1 every option visits every letter once.
    """
    keys = list(options)
    vals = [options[k] for k in keys]
    k = len(keys)
    return {keys[i]: vals[(i + r) % k] for i in range(k)}


def rotated_key(answer: str, keys: Sequence[str], r: int) -> str:
    """Where the key's text lands under :func:`rotate` by ``r``."""
    k = len(keys)
    return keys[(keys.index(answer) - r) % k]


# An option letter named in free text: "option B", "the answer is (C)", "choices A and D", "(B)",
# "<answer>B</answer>". Keywords are case-insensitive, letters must be capitals (so the article "a" is
# never read as option A).
_LETTER_LIST = r"[A-Z](?:\s*(?:,|/|&|\band\b|\bor\b)\s*[A-Z])*"
_LETTER_REFERENCE = re.compile(
    r"(?i:\b(?:options?|choices?|answers?)\b)\s*(?:(?i:is|was|would\s+be|are|were)\s+)?[:=-]?\s*"
    rf"[(\[]?(?P<list>{_LETTER_LIST})[)\]]?(?![\w'’-])"
    r"|(?<![\w(])\((?P<paren>[A-Z])\)(?![\w)])"
    r"|<answer>\s*(?P<tag>[A-Z])\s*</answer>"
)
_CAPITAL = re.compile(r"(?<![A-Za-z])[A-Z](?![A-Za-z])")


def letter_mentions(text: str, option_keys: Sequence[str]) -> list[tuple[int, int, str]]:
    """(start, end, letter) of every option letter named in ``text``, among ``option_keys`` only."""
    keys = set(option_keys)
    out: list[tuple[int, int, str]] = []
    for m in _LETTER_REFERENCE.finditer(text):
        for group in ("list", "paren", "tag"):
            if m.group(group) is None:
                continue
            base = m.start(group)
            for c in _CAPITAL.finditer(m.group(group)):
                if c.group() in keys:
                    out.append((base + c.start(), base + c.end(), c.group()))
    return out


def remap_letters(text: str, option_keys: Sequence[str], mapping: Mapping[str, str]) -> tuple[str, int]:
    """``text`` with every named option letter replaced by ``mapping[letter]``; also the count replaced."""
    spans = letter_mentions(text, option_keys)
    pieces, last = [], 0
    for start, end, letter in spans:
        pieces += [text[last:start], mapping[letter]]
        last = end
    return "".join([*pieces, text[last:]]), len(spans)
