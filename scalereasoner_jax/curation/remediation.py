"""Remediation: rebalance answer letters by permuting options (seeded), keeping rationales consistent.

Within each (question type, number of options) group the items are visited in a seeded order and given
target key positions drawn in blocks that hold every position once, so the key letters come out
balanced overall and per question type; the key moves to its target and the distractors are shuffled
into the other places. Option texts, the key's text and the set of options never change. Letters that
the rationale names ("option B") are rewritten to the new letters. Items whose options refer to other
options ("all of the above", "both A and B") are left as they are, and listed: permuting them would
change their meaning.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scalereasoner_jax.curation.stats import letter_balance
from scalereasoner_jax.curation.text import letter_mentions, remap_letters
from scalereasoner_jax.data.schema import ScaleVQARecord

__all__ = [
    "Rebalanced",
    "apply_permutation",
    "permute_release_item",
    "rebalance_letters",
    "refers_to_other_options",
]

_REFERS = re.compile(
    r"\b(?:all|none|both|neither|either)\s+of\s+(?:the\s+)?(?:above|below|these|those|options|choices)\b"
    r"|\b(?:above|previous|preceding|following)\s+(?:options?|choices?|answers?)\b",
    re.IGNORECASE,
)
_LETTER_PAIR = re.compile(r"(?<![A-Za-z])([A-Z])\s*(?:,|&|/|\band\b|\bor\b)\s*([A-Z])(?![A-Za-z])")


def refers_to_other_options(options: Mapping[str, str]) -> str | None:
    """Why permuting these options would change their meaning (None when it would not)."""
    keys = list(options)
    for k, text in options.items():
        m = _REFERS.search(text)
        if m:
            return f"option {k} refers to other options ({m.group(0)!r})"
        pair = _LETTER_PAIR.search(text)
        if pair and {pair.group(1), pair.group(2)} <= set(keys):
            return f"option {k} names option letters ({pair.group(0)!r})"
        if letter_mentions(text, keys):
            return f"option {k} names an option letter"
    return None


@dataclasses.dataclass
class Rebalanced:
    records: list[ScaleVQARecord]  # in the input order, permuted where possible
    permutations: dict[int, dict[str, str]]  # item position -> {old letter: new letter}, moved items only
    not_permuted: dict[int, str]  # item position -> why it was left as it is
    rationales_rewritten: int  # rationales whose letter mentions were rewritten
    before: dict[str, Any]  # letter balance before
    after: dict[str, Any]  # letter balance after


def _balanced(rng: np.random.Generator, n: int, k: int) -> list[int]:
    return np.concatenate([rng.permutation(k) for _ in range(-(-n // k))])[:n].tolist() if n else []


def apply_permutation(rec: ScaleVQARecord, mapping: Mapping[str, str]) -> tuple[ScaleVQARecord, int]:
    """The record with option ``old`` moved to letter ``mapping[old]``; rationale letters rewritten."""
    keys = list(rec.options)
    inverse = {new: old for old, new in mapping.items()}
    options = {k: rec.options[inverse[k]] for k in keys}
    rationale, n = remap_letters(rec.rationale, keys, mapping)
    return dataclasses.replace(rec, options=options, answer=mapping[rec.answer], rationale=rationale), n


def permute_release_item(item: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    """The same permutation applied to a raw release record (every other field kept as it was)."""
    out = copy.deepcopy(dict(item))
    keys = list(item["options"])
    inverse = {new: old for old, new in mapping.items()}
    out["options"] = {k: item["options"][inverse[k]] for k in keys}
    out["answer"] = mapping[item["answer"]]
    out["rationale"] = remap_letters(item["rationale"], keys, mapping)[0]
    return out


def rebalance_letters(records: Sequence[ScaleVQARecord], seed: int = 0) -> Rebalanced:
    """Balanced key letters overall and per question type, by a seeded permutation of each item's options."""
    rng = np.random.default_rng([seed, 7])
    out = list(records)
    permutations: dict[int, dict[str, str]] = {}
    not_permuted: dict[int, str] = {}
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        why = refers_to_other_options(rec.options)
        if why:
            not_permuted[i] = why
        else:
            groups[rec.question_type, len(rec.options)].append(i)
    rewritten = 0
    for (_, k), members in sorted(groups.items()):
        order = [members[j] for j in rng.permutation(len(members))]
        for i, target in zip(order, _balanced(rng, len(order), k), strict=True):
            rec = records[i]
            keys = list(rec.options)
            distractors = [keys[j] for j in rng.permutation(k) if keys[j] != rec.answer]
            new_order = [*distractors[:target], rec.answer, *distractors[target:]]
            mapping = {old: keys[pos] for pos, old in enumerate(new_order)}
            if all(old == new for old, new in mapping.items()):
                continue
            out[i], n = apply_permutation(rec, mapping)
            rewritten += n > 0
            permutations[i] = mapping
    return Rebalanced(
        out,
        permutations,
        not_permuted,
        rewritten,
        before=letter_balance([r.answer for r in records], [list(r.options) for r in records]),
        after=letter_balance([r.answer for r in out], [list(r.options) for r in out]),
    )
