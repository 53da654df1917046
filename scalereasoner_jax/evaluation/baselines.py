"""Text-only baseline rows for the evaluation table (no model, no image)."""

from __future__ import annotations

import re
from collections.abc import Mapping

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def option_hub_scores(options: Mapping[str, str]) -> dict[str, float]:
    """DESIGN.md §3's option-hub solver: each option's mean word Jaccard similarity to the other options
    (the question is not read). When every distractor differs from the key by one feature, the key scores
    highest."""
    words = {k: _words(str(v)) for k, v in options.items()}
    scores = {}
    for k, w in words.items():
        others = [o for j, o in words.items() if j != k]
        sims = [len(w & o) / len(w | o) if w | o else 0.0 for o in others]
        scores[k] = sum(sims) / len(sims) if sims else 0.0
    return scores


def option_hub_hit(options: Mapping[str, str], answer: str) -> float:
    """Expected accuracy of the option-hub solver on one item, ties broken uniformly at random."""
    scores = option_hub_scores(options)
    best = max(scores.values())
    tied = [k for k, s in scores.items() if abs(s - best) < 1e-12]
    return 1.0 / len(tied) if answer in tied else 0.0
