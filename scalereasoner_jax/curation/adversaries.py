"""Text-only adversaries: the result type every adversary returns, the heuristic rules and the letter prior.

None of them sees an image. Two evaluation protocols:

* **circular** (fixed rules and language models): the item is shown under every cyclic rotation of its
  options (CircularEval); the adversary answers it only if it is right under every rotation. A rule
  breaks ties by position (the first best option), so it is circular-correct exactly when the key is
  its unique best option: a tie is a guess, and guesses do not count as leaks.
* **published** (adversaries fitted to the data: the letter prior and the learned solver): the vote is
  the out-of-fold answer on the order as evaluated. Rotating every item together leaves what such an
  adversary can learn unchanged (a letter prior follows the rotated keys), so rotation adds no test;
  what guards it against memorising is that it is fitted without the item's slide.

Accuracy is reported on the evaluated order with ties split (a rule tied between t options including
the key earns 1/t), i.e. the expected accuracy of the rule with random tie-breaking.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from scalereasoner_jax.curation.folds import grouped_folds
from scalereasoner_jax.curation.text import content_words, jaccard, normalize, rotate, rotated_key, word_set
from scalereasoner_jax.data.schema import ScaleVQARecord

__all__ = [
    "RULES",
    "AdversaryResult",
    "letter_prior",
    "run_rule",
    "tie_credit",
]


@dataclasses.dataclass
class AdversaryResult:
    """One adversary's answers on every item, in item order."""

    name: str
    kind: str  # "rule", "fitted" or "lm"
    protocol: str  # "circular" or "published"
    answers: list[str | None]  # its pick on the evaluated order (first of ties)
    credit: np.ndarray  # per item, expected correctness on the evaluated order, in [0, 1]
    votes: np.ndarray  # per item, bool: answered correctly under the protocol
    hits: list[list[int]] | None = None  # LM: per item, per rotation, samples equal to the key
    samples: int | None = None  # LM: samples per rotation
    skipped: str | None = None  # why it could not run (then credit/votes are empty)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def skip(cls, name: str, kind: str, protocol: str, why: str) -> AdversaryResult:
        return cls(name, kind, protocol, [], np.zeros(0), np.zeros(0, dtype=bool), skipped=why)


def tie_credit(scores: Sequence[float], key_index: int) -> tuple[float, bool, int]:
    """(1/t if the key is among the t best options else 0, whether it is the unique best, first best)."""
    s = np.asarray(scores, dtype=np.float64)
    top = np.flatnonzero(np.isclose(s, s.max(), rtol=1e-9, atol=1e-12))
    return (float(key_index in top) / len(top), bool(len(top) == 1 and top[0] == key_index), int(top[0]))


# --- heuristic rules: (question, option texts in order) -> one score per option, higher = chosen -----


def _option_hub(question: str, options: Sequence[str]) -> list[float]:
    """Mean word-Jaccard similarity to the other options; never reads the question (DESIGN.md §3)."""
    sets = [word_set(t) for t in options]
    k = len(sets)
    return [float(np.mean([jaccard(sets[i], sets[j]) for j in range(k) if j != i])) for i in range(k)]


def _longest(question: str, options: Sequence[str]) -> list[float]:
    return [float(len(normalize(t))) for t in options]


def _shortest(question: str, options: Sequence[str]) -> list[float]:
    return [-float(len(normalize(t))) for t in options]


def _question_overlap(question: str, options: Sequence[str]) -> list[float]:
    """Content words shared with the question (function words left out: every option has them)."""
    q = content_words(question)
    return [float(len(q & content_words(t))) for t in options]


RuleFn = Callable[[str, Sequence[str]], list[float]]
RULES: dict[str, RuleFn] = {
    "option_hub": _option_hub,
    "longest_option": _longest,
    "shortest_option": _shortest,
    "question_overlap": _question_overlap,
}


def run_rule(name: str, records: Sequence[ScaleVQARecord], rule: RuleFn | None = None) -> AdversaryResult:
    """A fixed rule under CircularEval: scored on every rotation, first best option picked."""
    rule = rule or RULES[name]
    answers: list[str | None] = []
    credit = np.zeros(len(records))
    votes = np.zeros(len(records), dtype=bool)
    for i, rec in enumerate(records):
        keys = list(rec.options)
        texts = [rec.options[k] for k in keys]
        c, _, first = tie_credit(rule(rec.question, texts), keys.index(rec.answer))
        credit[i] = c
        answers.append(keys[first])
        ok = True
        for r in range(len(keys)):
            rotated = rotate(rec.options, r)
            scores = rule(rec.question, [rotated[k] for k in keys])
            _, _, pick = tie_credit(scores, 0)
            if keys[pick] != rotated_key(rec.answer, keys, r):
                ok = False
                break
        votes[i] = ok
    return AdversaryResult(name, "rule", "circular", answers, credit, votes)


def letter_prior(
    records: Sequence[ScaleVQARecord], *, n_folds: int = 5, seed: int = 0, name: str = "letter_prior"
) -> AdversaryResult:
    """The most frequent key letter among the item's letters, counted on the other slides' items.

    Folds are grouped by slide, as for the learned solver; with a single slide in the set the count
    leaves out only the item itself (noted in ``details``).
    """
    n = len(records)
    groups = [r.wsi_name for r in records]
    if len(set(groups)) >= 2:
        folds = grouped_folds(groups, n_folds, seed)
        scheme = f"grouped by slide, {int(folds.max()) + 1} folds"
    else:
        folds = np.arange(n)
        scheme = "leave one item out (a single slide)"
    total = Counter(zip(folds.tolist(), (r.answer for r in records), strict=True))
    all_counts = Counter(r.answer for r in records)
    answers: list[str | None] = []
    credit = np.zeros(n)
    votes = np.zeros(n, dtype=bool)
    for i, rec in enumerate(records):
        keys = list(rec.options)
        f = int(folds[i])
        counts = [all_counts[k] - total[f, k] for k in keys]  # everything outside the item's fold
        c, unique, first = tie_credit(counts, keys.index(rec.answer))
        credit[i], votes[i] = c, unique
        answers.append(keys[first])
    return AdversaryResult(name, "fitted", "published", answers, credit, votes, details={"estimated": scheme})
