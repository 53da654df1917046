"""Accuracy with 95% intervals, overall and per question type, from per-item predictions."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from scalereasoner_jax.curation.stats import wilson_interval

__all__ = ["summarize", "wilson_interval"]


def _rate(k: float, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(k, n)
    return {"value": k / n if n else 0.0, "ci95": [lo, hi], "n": n}


def summarize(predictions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Figures of one evaluation row.

    Each prediction holds ``correct`` (bool, or the expected hit rate of a solver that breaks ties at
    random), ``answered`` (bool: a letter was extracted or guessed),
    ``guessed`` (bool), ``formatted`` (bool: the reward's format term), ``question_type``, ``n_options``
    and ``response_tokens`` (None for solvers that write nothing). ``accuracy_if_guessed`` is the expected
    accuracy had every unanswered item been given a random letter (``--random_fallback`` without its noise).
    """
    preds = list(predictions)
    n = len(preds)
    correct = sum(float(p["correct"]) for p in preds)
    # What a random letter for every unanswered item would add, in expectation (no sampling noise).
    guess_hits = sum(1.0 / p["n_options"] for p in preds if not p["answered"])
    by_type: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for p in preds:
        by_type[str(p["question_type"])].append(p)
    lengths = [p["response_tokens"] for p in preds if p.get("response_tokens") is not None]
    methods: dict[str, int] = defaultdict(int)
    for p in preds:
        methods[str(p.get("method", "none"))] += 1
    return {
        "n": n,
        "accuracy": _rate(correct, n),
        "accuracy_if_guessed": _rate(correct + guess_hits, n),
        "per_type": {
            t: _rate(sum(float(p["correct"]) for p in rows), len(rows)) for t, rows in sorted(by_type.items())
        },
        "format_rate": _rate(sum(bool(p.get("formatted", False)) for p in preds), n),
        "unanswered_rate": _rate(sum(not p["answered"] for p in preds), n),
        "guessed": sum(bool(p.get("guessed", False)) for p in preds),
        "extraction": dict(sorted(methods.items())),
        "mean_response_tokens": sum(lengths) / len(lengths) if lengths else None,
        "chance": sum(1.0 / p["n_options"] for p in preds) / n if n else 0.0,
    }
