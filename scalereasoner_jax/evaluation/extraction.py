"""Which option a completion chose: strict first, then a documented fallback, never a guess.

Stages, the first that names exactly one of the item's option letters wins:

1. ``strict``: the letter of the first ``<answer>`` ... ``</answer>`` pair that holds a single letter (the
   reward's rule, ``rl.rewards.extract_answer``), if it is one of the item's options.
2. ``letter_pattern``: phrases that commit to a letter: an answer pair that starts with a letter
   (``<answer>B. glands ...</answer>``, ``<answer>(B)</answer>``), "answer is B", "Answer: (B)",
   "option B", "choice B", a line that is only a letter (``B``, ``(B)``, ``B.``) or starts with ``B.`` /
   ``B)``. Letters must be upper case ("a" is an article). If these phrases name two different letters the
   completion is ambiguous and this stage yields nothing.
3. ``option_text``: the normalised text (lower case, punctuation and extra spaces removed) of exactly one
   option occurs in the answer pair's content, or in the whole completion when there is no pair; when
   several occur and one contains all the others, that one.

Otherwise the completion is unanswered (``letter=None``). Callers decide what unanswered means; the
evaluation counts it as wrong and reports the rate, and only ``--random_fallback`` replaces it by a
seeded random letter (the convention of PathMMU-style reports).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from scalereasoner_jax.rl.rewards import extract_answer

_PAIR = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_LETTER_PATTERNS = (
    re.compile(r"<answer>\s*[\(\[]?([A-Z])(?:[\)\]\.:,]|\s|$)"),
    re.compile(r"(?i:answer)\s*(?:(?i:is)|:)?\s*(?:(?i:option)\s*)?[\(\[]?([A-Z])(?![A-Za-z])"),
    re.compile(r"(?i:option|choice)\s*[\(\[]?([A-Z])(?![A-Za-z])"),
    re.compile(r"^\s*[\(\[]?([A-Z])[\)\]\.]?\s*$", re.MULTILINE),
    re.compile(r"^\s*[\(\[]?([A-Z])[\)\]\.]\s", re.MULTILINE),
)
_NON_WORD = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Extraction:
    letter: str | None  # None: unanswered
    method: str  # "strict", "letter_pattern", "option_text" or "none"


def normalize_text(text: str) -> str:
    return _SPACES.sub(" ", _NON_WORD.sub(" ", text.lower())).strip()


def _letter_pattern(completion: str, letters: frozenset[str]) -> str | None:
    found = {
        m.group(1)
        for pattern in _LETTER_PATTERNS
        for m in pattern.finditer(completion)
        if m.group(1) in letters
    }
    return found.pop() if len(found) == 1 else None


def _option_text(completion: str, options: Mapping[str, str]) -> str | None:
    pair = _PAIR.search(completion)
    region = f" {normalize_text(pair.group(1) if pair else completion)} "
    hits = {
        letter: norm
        for letter, text in options.items()
        if (norm := normalize_text(str(text))) and f" {norm} " in region
    }
    if len(hits) == 1:
        return next(iter(hits))
    for letter, norm in hits.items():
        if all(other in norm for other in hits.values()):
            return letter
    return None


def extract_choice(completion: str, options: Mapping[str, str] | str) -> Extraction:
    """The option letter ``completion`` chose among ``options`` (a mapping letter -> text, or the letters)."""
    option_texts = options if isinstance(options, Mapping) else {}
    letters = frozenset(options)
    strict = extract_answer(completion)
    if strict is not None and strict in letters:
        return Extraction(strict, "strict")
    if (letter := _letter_pattern(completion, letters)) is not None:
        return Extraction(letter, "letter_pattern")
    if option_texts and (letter := _option_text(completion, option_texts)) is not None:
        return Extraction(letter, "option_text")
    return Extraction(None, "none")
