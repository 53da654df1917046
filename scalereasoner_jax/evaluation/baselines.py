"""Text-only baseline rows for the evaluation table (no model, no image), from curation's solvers."""

from __future__ import annotations

from collections.abc import Mapping

from scalereasoner_jax.curation.adversaries import RULES, tie_credit


def option_hub_hit(options: Mapping[str, str], answer: str) -> float:
    """Expected accuracy of DESIGN.md §3's option-hub solver on one item (the option most similar to the
    others, the question unread), ties broken uniformly at random."""
    letters = list(options)
    scores = RULES["option_hub"]("", [str(options[k]) for k in letters])
    return tie_credit(scores, letters.index(answer))[0]
