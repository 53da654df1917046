"""Rewards for GRPO on multiple-choice VQA, and a registry so the config names them.

The Scale-VQA reward (DESIGN.md §3, the paper's code described precisely)::

    reward = 0.8 * accuracy + 0.2 * format

How the text is read (all matching is case-sensitive on the tags, ``re.DOTALL`` so ``.`` crosses newlines):

- **Answer pairs** are the matches of ``<answer>(.*?)</answer>`` found by ``re.finditer``: non-greedy,
  left to right, non-overlapping. A pair opens at the leftmost ``<answer>`` not already inside an earlier
  pair and closes at the *first* ``</answer>`` after it. So tags do not nest: in
  ``<answer>x <answer>A</answer></answer>`` there is one pair, whose content is ``x <answer>A`` (not a
  letter), and the trailing ``</answer>`` is plain text after it. An ``<answer>`` with no later
  ``</answer>`` opens no pair; a ``</answer>`` with no earlier open tag is plain text. Pairs inside the
  think block count like any other.
- A pair **holds a letter** when its whole content is one ASCII letter ``[A-Za-z]`` with optional
  whitespace (spaces, newlines) around it. The letter is upper-cased before any comparison, so ``b``
  reads as ``B``. Digits, punctuation (``A.``), two letters or option text mean the pair holds no letter.
- **accuracy** = 1 if the first pair that holds a letter has that letter equal to the key (the key is
  stripped and upper-cased too), else 0. Pairs holding other text are passed over, so
  ``<answer>It is A</answer><answer>A</answer>`` is accurate.
- **format** = 1 only if all of these hold, else 0:
  a ``<think>(.*?)</think>`` block exists anywhere (it may be empty and may span lines; an unclosed
  ``<think>`` does not count); exactly one answer pair exists in the whole text (any content); exactly one
  pair holds a letter; that letter is valid (any of A-Z by default, as the paper's code; pass
  ``valid_letters`` to restrict it, e.g. to the item's options); nothing but whitespace follows that pair.

Hence: perfect 1.0; well-formed but wrong 0.2; right but no think block 0.8; right with text after
``</answer>`` 0.8; option text inside the tags 0.0.

Registry: a reward is a function ``(completion, example, **options) -> float`` registered with
``@register_reward("name")``; ``get_reward("name", **options)`` binds the options (checked against the
signature) and returns a :class:`RewardFn` ``(completion, example) -> float``. The example holds at least
``answer`` (the key letter) and ``options`` (the option letters, e.g. ``"ABCD"``, or a letter -> text
mapping). Completions must be decoded without special tokens (no ``<|im_end|>`` after ``</answer>``),
or the trailing-text rule fails them.
"""

from __future__ import annotations

import functools
import inspect
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

ACCURACY_WEIGHT = 0.8
FORMAT_WEIGHT = 0.2

_ANSWER_PAIR = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_SINGLE_LETTER = re.compile(r"\s*([A-Za-z])\s*")
_TRAILING_WHITESPACE = re.compile(r"\s*")
_ALL_LETTERS = frozenset(string.ascii_uppercase)


@dataclass(frozen=True)
class ParsedCompletion:
    """What the reward reads from a completion (see the module docstring for the matching rules)."""

    has_think: bool
    n_pairs: int  # answer pairs, any content
    letters: tuple[str, ...]  # upper-cased letters of the pairs that hold one, in order
    tail_after_letter_pair: str | None  # text after the first letter pair's ``</answer>``


def parse_completion(completion: str) -> ParsedCompletion:
    """Split a completion into the facts the accuracy and format terms need."""
    pairs = list(_ANSWER_PAIR.finditer(completion))
    letters: list[str] = []
    tail: str | None = None
    for m in pairs:
        hit = _SINGLE_LETTER.fullmatch(m.group(1))
        if hit is not None:
            if not letters:
                tail = completion[m.end() :]
            letters.append(hit.group(1).upper())
    return ParsedCompletion(
        has_think=_THINK_BLOCK.search(completion) is not None,
        n_pairs=len(pairs),
        letters=tuple(letters),
        tail_after_letter_pair=tail,
    )


def extract_answer(completion: str) -> str | None:
    """The upper-cased letter of the first answer pair that holds a single letter, or None."""
    letters = parse_completion(completion).letters
    return letters[0] if letters else None


def _letter_set(valid_letters: str | Mapping[str, Any] | Iterable[str] | None) -> frozenset[str]:
    if valid_letters is None:
        return _ALL_LETTERS
    if isinstance(valid_letters, bytes):
        valid_letters = valid_letters.decode()
    if isinstance(valid_letters, Mapping):
        valid_letters = list(valid_letters)
    return frozenset(str(x).strip().upper() for x in valid_letters)


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 if the strict letter (:func:`extract_answer`) equals the key, upper-cased; else 0.0."""
    letter = extract_answer(completion)
    return float(letter is not None and letter == _text(answer).strip().upper())


def format_reward(
    completion: str, valid_letters: str | Mapping[str, Any] | Iterable[str] | None = None
) -> float:
    """1.0 if the completion has a think block, exactly one answer pair, holding a valid single letter, with
    only whitespace after it; else 0.0. ``valid_letters`` None means any of A-Z (the paper's code)."""
    p = parse_completion(completion)
    ok = (
        p.has_think
        and p.n_pairs == 1
        and len(p.letters) == 1
        and p.letters[0] in _letter_set(valid_letters)
        and p.tail_after_letter_pair is not None
        and _TRAILING_WHITESPACE.fullmatch(p.tail_after_letter_pair) is not None
    )
    return float(ok)


def scale_vqa_breakdown(
    completion: str,
    answer: str,
    *,
    valid_letters: str | Mapping[str, Any] | Iterable[str] | None = None,
    accuracy_weight: float = ACCURACY_WEIGHT,
    format_weight: float = FORMAT_WEIGHT,
) -> dict[str, float]:
    """``{"accuracy", "format", "reward"}`` for logging the two terms separately."""
    acc = accuracy_reward(completion, answer)
    fmt = format_reward(completion, valid_letters)
    return {"accuracy": acc, "format": fmt, "reward": accuracy_weight * acc + format_weight * fmt}


def scale_vqa_reward(
    completion: str,
    answer: str,
    *,
    valid_letters: str | Mapping[str, Any] | Iterable[str] | None = None,
    accuracy_weight: float = ACCURACY_WEIGHT,
    format_weight: float = FORMAT_WEIGHT,
) -> float:
    """The paper's reward: ``0.8 * accuracy + 0.2 * format`` (DESIGN.md §3; rules in the module doc)."""
    return scale_vqa_breakdown(
        completion,
        answer,
        valid_letters=valid_letters,
        accuracy_weight=accuracy_weight,
        format_weight=format_weight,
    )["reward"]


# ----------------------------------------------------------------------------------------------- registry


class RewardFn(Protocol):
    """A configured reward: the decoded completion and the example's fields -> a float."""

    def __call__(self, completion: str, example: Mapping[str, Any]) -> float: ...


REWARDS: dict[str, Callable[..., float]] = {}


def register_reward(name: str) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Decorator: register ``fn(completion, example, **options) -> float`` under ``name``."""

    def deco(fn: Callable[..., float]) -> Callable[..., float]:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered ({REWARDS[name].__qualname__})")
        REWARDS[name] = fn
        return fn

    return deco


def get_reward(name: str, **options: Any) -> RewardFn:
    """The reward registered as ``name`` with ``options`` bound; unknown names or options fail here, at
    config time, not in the middle of a rollout."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    fn = REWARDS[name]
    try:
        inspect.signature(fn).bind_partial("", {}, **options)
    except TypeError as err:
        raise TypeError(f"reward {name!r}: bad options {sorted(options)}: {err}") from err
    return functools.partial(fn, **options) if options else fn


def score_completions(
    reward: RewardFn, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]
) -> np.ndarray:
    """Rewards as float32 ``(N,)``; ``examples[i]`` belongs to ``completions[i]`` (repeat each prompt's
    example G times for a group)."""
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    return np.array([reward(c, e) for c, e in zip(completions, examples, strict=True)], np.float32)


def _text(x: Any) -> str:
    """Example fields may arrive as str, numpy str_ or bytes (TFDS)."""
    if isinstance(x, bytes | np.bytes_):
        return bytes(x).decode()
    return str(x)


@register_reward("scale_vqa")
def scale_vqa(
    completion: str,
    example: Mapping[str, Any],
    *,
    restrict_letters: bool = False,
    accuracy_weight: float = ACCURACY_WEIGHT,
    format_weight: float = FORMAT_WEIGHT,
) -> float:
    """Registry form of :func:`scale_vqa_reward`: the key is ``example["answer"]``; with
    ``restrict_letters`` a letter outside ``example["options"]`` fails the format term."""
    valid = None
    if restrict_letters:
        options = example["options"]
        valid = _text(options) if isinstance(options, str | bytes | np.str_ | np.bytes_) else options
    return scale_vqa_reward(
        completion,
        _text(example["answer"]),
        valid_letters=valid,
        accuracy_weight=accuracy_weight,
        format_weight=format_weight,
    )
