"""Small statistics for the report: intervals, tests against chance, letter balance.

Items can have different numbers of options (2..26), so "chance" is a per-item probability and the
tests below are written for a sum of Bernoullis with different p (Poisson-binomial), not a single p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["accuracy_summary", "chance_test", "letter_balance", "wilson_interval"]

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (fractional successes allowed: tie-split credit).

    Wilson rather than the normal interval because accuracies near 0 or 1 on small sets are common
    here (a leaking rule scores 1.0), where the normal interval collapses to a point.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def chance_test(observed: Sequence[float], p_null: Sequence[float]) -> dict[str, float | None]:
    """One-sided test that a sum of per-item hits exceeds its null expectation.

    ``observed[i]`` in [0, 1] (a hit, or tie-split credit), ``p_null[i]`` the item's null probability.
    Normal approximation to the Poisson-binomial (items with p in {0, 1} carry no variance). Returns
    the observed and expected totals, z and the one-sided p-value (None when the null has no variance).
    """
    obs = float(np.sum(observed))
    p = np.asarray(p_null, dtype=np.float64)
    expected = float(p.sum())
    var = float((p * (1 - p)).sum())
    if var <= 0:
        return {"observed": obs, "expected": expected, "z": None, "p_value": None}
    z = (obs - expected) / math.sqrt(var)
    from scipy import stats  # imported here: scipy.stats takes seconds to import, the CLI must start fast

    return {"observed": obs, "expected": expected, "z": z, "p_value": float(stats.norm.sf(z))}


def accuracy_summary(credit: Sequence[float], chance: Sequence[float]) -> dict[str, Any]:
    """Accuracy, n, 95% Wilson interval, mean chance and whether the interval lies above chance."""
    n = len(credit)
    if n == 0:
        return {
            "accuracy": None,
            "n": 0,
            "ci95": None,
            "chance": None,
            "above_chance": False,
            "p_value": None,
        }
    total = float(np.sum(credit))
    lo, hi = wilson_interval(total, n)
    mean_chance = float(np.mean(chance))
    return {
        "accuracy": total / n,
        "n": n,
        "ci95": [lo, hi],
        "chance": mean_chance,
        # The gate for counting an adversary's votes: its whole interval is above chance.
        "above_chance": bool(lo > mean_chance),
        "p_value": chance_test(credit, chance)["p_value"],
    }


def letter_balance(answers: Sequence[str], option_keys: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Chi-square goodness of fit of the key letters against "each item's key is uniform over its letters".

    Expected count of letter L = sum over items having L of 1/k_item (plain n/k when all items have k
    options). Returns counts, expected counts, chi2, df and p-value (None with fewer than two letters).
    """
    observed: dict[str, float] = {}
    expected: dict[str, float] = {}
    for ans, keys in zip(answers, option_keys, strict=True):
        for k in keys:
            expected[k] = expected.get(k, 0.0) + 1.0 / len(keys)
            observed.setdefault(k, 0.0)
        observed[ans] += 1
    order = sorted(expected)
    obs = np.array([observed[k] for k in order])
    exp = np.array([expected[k] for k in order])
    out: dict[str, Any] = {
        "counts": {k: int(observed[k]) for k in order},
        "expected": {k: round(expected[k], 3) for k in order},
        "n": len(answers),
    }
    if len(order) < 2:
        return {**out, "chi2": None, "df": None, "p_value": None}
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(order) - 1
    from scipy import stats

    return {**out, "chi2": chi2, "df": df, "p_value": float(stats.chi2.sf(chi2, df))}
