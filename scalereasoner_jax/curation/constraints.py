"""Constraint checks on the item set, each with counts and examples for the report.

Dataset-level checks (answer-letter balance, key longest/shortest more often than chance) pass or fail
by a test at level ``alpha``. Item-level checks (magnification words where a type must not name them,
identical options, a rationale naming another letter than the key) list the items they hit; the
pipeline flags those items when the check is in ``flag_checks``. Option length ratios and near-duplicate
questions are reported, and flag nothing by default: templated questions are legitimate when the images
and options differ, and a long key is already measured by the length test and the length rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from scalereasoner_jax.curation.stats import chance_test, letter_balance
from scalereasoner_jax.curation.text import MAGNIFICATION_WORDS, letter_mentions, normalize
from scalereasoner_jax.data.schema import ScaleVQARecord

__all__ = [
    "ITEM_CHECKS",
    "CheckResult",
    "check_identical_options",
    "check_key_length",
    "check_length_ratio",
    "check_letter_balance",
    "check_magnification_words",
    "check_near_duplicate_questions",
    "check_rationale_letter",
    "run_checks",
]

MAX_EXAMPLES = 5
# Checks that name individual items (and so may flag them).
ITEM_CHECKS: tuple[str, ...] = (
    "magnification_words",
    "identical_options",
    "rationale_letter",
    "option_length_ratio",
    "near_duplicate_questions",
)


@dataclasses.dataclass
class CheckResult:
    """One check: whether it passed (None: nothing to test), how many items it hit, examples."""

    name: str
    passed: bool | None
    n: int  # items examined
    count: int  # items (or, for dataset-level checks, deviations) found
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    items: dict[int, str] = dataclasses.field(default_factory=dict)  # item index -> why (item checks)
    unit: str = "items hit"  # what ``count`` counts

    def to_json(self, flags: bool) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "n": self.n,
            "count": self.count,
            "count_unit": self.unit,
            "flags_items": flags,
            **self.summary,
            "examples": self.examples,
        }


def _example(rec: ScaleVQARecord, **extra: Any) -> dict[str, Any]:
    return {"No": rec.no, "index": rec.index, "question_type": rec.question_type, **extra}


def _item_check(
    name: str, records: Sequence[ScaleVQARecord], hits: dict[int, str], **summary: Any
) -> CheckResult:
    examples = [_example(records[i], detail=why) for i, why in list(hits.items())[:MAX_EXAMPLES]]
    return CheckResult(name, not hits, len(records), len(hits), summary, examples, hits)


def check_letter_balance(records: Sequence[ScaleVQARecord], alpha: float = 0.05) -> CheckResult:
    """Chi-square test of the key letters against uniform (per item over its own letters)."""
    res = letter_balance([r.answer for r in records], [list(r.options) for r in records])
    p = res["p_value"]
    passed = None if p is None else bool(p >= alpha)
    dev = {k: res["counts"][k] - res["expected"][k] for k in res["counts"]}
    over = sorted(dev, key=lambda k: -dev[k])
    examples = [{"letter": k, "count": res["counts"][k], "expected": res["expected"][k]} for k in over[:2]]
    excess = round(sum(max(0.0, d) for d in dev.values()))
    return CheckResult(
        "answer_letter_balance", passed, len(records), excess, res, examples, unit="keys to move for balance"
    )


def check_key_length(records: Sequence[ScaleVQARecord], alpha: float = 0.05) -> CheckResult:
    """Is the key the unique longest (or unique shortest) option more often than chance?

    Under "the key is placed at random among the item's texts", it is the unique longest option with
    probability 1/k when the item has a unique longest option, else 0; the observed count is tested
    against the sum of these (one-sided, normal approximation to the Poisson-binomial). Lengths are in
    characters after normalisation, so equal-length options carry no signal.
    """
    out: dict[str, Any] = {}
    examples = []
    count = 0
    failed = False
    n = len(records)
    for which, sign in (("longest", 1), ("shortest", -1)):
        hit, p_null = [], []
        for rec in records:
            lens = np.array([sign * len(normalize(t)) for t in rec.options.values()])
            top = np.flatnonzero(lens == lens.max())
            unique = len(top) == 1
            hit.append(float(unique and list(rec.options).index(rec.answer) == top[0]))
            p_null.append(1.0 / len(lens) if unique else 0.0)
        test = chance_test(hit, p_null)
        count += int(test["observed"])
        out[which] = {
            "rate": test["observed"] / n if n else None,
            "expected_rate": test["expected"] / n if n else None,
            "z": test["z"],
            "p_value": test["p_value"],
        }
        if test["p_value"] is not None and test["p_value"] < alpha:
            failed = True
            examples.append({"key_is": which, **out[which]})
    unit = "items whose key is the unique longest or unique shortest option"
    return CheckResult(
        "key_longest_or_shortest", (not failed) if n else None, n, count, out, examples, unit=unit
    )


def check_length_ratio(records: Sequence[ScaleVQARecord], max_ratio: float = 2.0) -> CheckResult:
    """Longest over shortest option (characters after normalisation), and the items above ``max_ratio``."""
    ratios = []
    hits: dict[int, str] = {}
    for i, rec in enumerate(records):
        lens = [max(1, len(normalize(t))) for t in rec.options.values()]
        ratio = max(lens) / min(lens)
        ratios.append(ratio)
        if ratio > max_ratio:
            hits[i] = f"longest/shortest option length = {ratio:.2f} > {max_ratio}"
    r = np.array(ratios) if ratios else np.zeros(1)
    summary = {
        "max_ratio": max_ratio,
        "ratio_mean": float(r.mean()),
        "ratio_median": float(np.median(r)),
        "ratio_p95": float(np.quantile(r, 0.95)),
    }
    return _item_check("option_length_ratio", records, hits, **summary)


def check_magnification_words(
    records: Sequence[ScaleVQARecord], forbidden_types: Iterable[str] = ("type_E",)
) -> CheckResult:
    """Options naming a magnification in question types that must not; and items naming it unevenly.

    Items of ``forbidden_types`` are hit when any option names a magnification. Any item whose options
    name magnifications in some options but not all is counted as ``uneven`` (a cue a reader can use),
    reported but not a violation by itself.
    """
    forbidden = set(forbidden_types)
    hits: dict[int, str] = {}
    uneven = 0
    uneven_examples = []
    for i, rec in enumerate(records):
        found = {k: MAGNIFICATION_WORDS.findall(t) for k, t in rec.options.items()}
        named = {k: v for k, v in found.items() if v}
        if rec.question_type in forbidden and named:
            words = "; ".join(f"{k}: {', '.join(v)}" for k, v in named.items())
            hits[i] = f"{rec.question_type} options must not name a magnification ({words})"
        if named and len(named) < len(found):
            uneven += 1
            if len(uneven_examples) < MAX_EXAMPLES:
                uneven_examples.append(_example(rec, options_naming=sorted(named)))
    res = _item_check(
        "magnification_words", records, hits, forbidden_types=sorted(forbidden), uneven_items=uneven
    )
    res.summary["uneven_examples"] = uneven_examples
    return res


def check_identical_options(records: Sequence[ScaleVQARecord]) -> CheckResult:
    """Two options of one item that are equal after normalisation (case, punctuation, spacing)."""
    hits: dict[int, str] = {}
    for i, rec in enumerate(records):
        seen: dict[str, list[str]] = defaultdict(list)
        for k, t in rec.options.items():
            seen[normalize(t)].append(k)
        same = [ks for ks in seen.values() if len(ks) > 1]
        if same:
            hits[i] = "identical after normalisation: " + "; ".join(" == ".join(ks) for ks in same)
    return _item_check("identical_options", records, hits)


def check_rationale_letter(records: Sequence[ScaleVQARecord]) -> CheckResult:
    """A rationale that names an option letter other than the key ("option B" when the key is C)."""
    hits: dict[int, str] = {}
    names_key = 0
    for i, rec in enumerate(records):
        named = [m[2] for m in letter_mentions(rec.rationale, list(rec.options))]
        others = sorted(set(named) - {rec.answer})
        names_key += rec.answer in named
        if others:
            hits[i] = f"rationale names {', '.join(others)}; the key is {rec.answer}"
    return _item_check("rationale_letter", records, hits, rationales_naming_the_key=names_key)


def _shingles(text: str, n: int = 3) -> frozenset[str]:
    w = normalize(text).split()
    if len(w) < n:
        return frozenset([" ".join(w)])
    return frozenset(" ".join(w[i : i + n]) for i in range(len(w) - n + 1))


def _minhash(sets: Sequence[frozenset[str]], n_hash: int, seed: int) -> np.ndarray:
    p = (1 << 31) - 1
    rng = np.random.default_rng(seed)
    a = rng.integers(1, p, n_hash, dtype=np.int64)
    b = rng.integers(0, p, n_hash, dtype=np.int64)
    out = np.empty((len(sets), n_hash), dtype=np.int64)
    for i, s in enumerate(sets):
        x = np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest()) % p for t in s])
        out[i] = ((a[None, :] * x[:, None] + b[None, :]) % p).min(0)
    return out


def check_near_duplicate_questions(
    records: Sequence[ScaleVQARecord], threshold: float = 0.8, *, bands: int = 16, rows: int = 4
) -> CheckResult:
    """Groups of questions whose word-trigram Jaccard similarity is at least ``threshold``.

    Exact duplicates (after normalisation) are grouped first; distinct texts are then paired by MinHash
    with banded LSH (16 x 4: pairs at similarity 0.8 are found with probability > 0.999) and every
    candidate is verified by its exact Jaccard similarity. Each bucket's members are compared with the
    bucket's first member only (union-find joins the rest), which keeps the work linear for templated
    questions. Near-duplicates on one view triplet (the same images asked twice) are counted apart.
    """
    by_text: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        by_text[normalize(rec.question)].append(i)
    texts = list(by_text)
    parent = list(range(len(texts)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    if len(texts) > 1:
        sh = [_shingles(t) for t in texts]
        sig = _minhash(sh, bands * rows, seed=0)
        for band in range(bands):
            buckets: dict[bytes, list[int]] = defaultdict(list)
            for i in range(len(texts)):
                buckets[sig[i, band * rows : (band + 1) * rows].tobytes()].append(i)
            for members in buckets.values():
                first = members[0]
                for j in members[1:]:
                    if find(j) == find(first):
                        continue
                    inter = len(sh[first] & sh[j])
                    if inter / len(sh[first] | sh[j]) >= threshold:
                        parent[find(j)] = find(first)
    groups: dict[int, list[int]] = defaultdict(list)
    for t, idx in enumerate(texts):
        groups[find(t)] += by_text[idx]
    dup = [sorted(g) for g in groups.values() if len(g) > 1]
    dup.sort(key=lambda g: (-len(g), g[0]))
    hits: dict[int, str] = {}
    same_views = 0
    for g in dup:
        slides = {records[i].wsi_name for i in g}
        per_triplet: Counter[str] = Counter(records[i].path_id for i in g)
        same_views += sum(1 for c in per_triplet.values() if c > 1)
        for i in g:
            hits[i] = f"near-duplicate question, group of {len(g)} over {len(slides)} slide(s)"
    examples = [
        {
            "size": len(g),
            "slides": len({records[i].wsi_name for i in g}),
            "No": [records[i].no for i in g[:8]],
            "question": records[g[0]].question,
        }
        for g in dup[:MAX_EXAMPLES]
    ]
    summary = {"threshold": threshold, "groups": len(dup), "asked_twice_of_one_view_triplet": same_views}
    return CheckResult("near_duplicate_questions", not dup, len(records), len(hits), summary, examples, hits)


def run_checks(
    records: Sequence[ScaleVQARecord],
    *,
    alpha: float = 0.05,
    max_length_ratio: float = 2.0,
    magnification_free_types: Iterable[str] = ("type_E",),
    near_duplicate_threshold: float = 0.8,
) -> dict[str, CheckResult]:
    """All checks, by name."""
    results = [
        check_letter_balance(records, alpha),
        check_key_length(records, alpha),
        check_length_ratio(records, max_length_ratio),
        check_magnification_words(records, magnification_free_types),
        check_near_duplicate_questions(records, near_duplicate_threshold),
        check_rationale_letter(records),
        check_identical_options(records),
    ]
    return {r.name: r for r in results}
