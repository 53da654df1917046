"""The leakage report: per-adversary figures (overall and per question type) and the Markdown rendering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from scalereasoner_jax.curation.adversaries import AdversaryResult
from scalereasoner_jax.curation.stats import accuracy_summary, wilson_interval
from scalereasoner_jax.data.schema import QUESTION_TYPE_NAMES, ScaleVQARecord

__all__ = ["render_markdown", "summarize_adversary"]


def summarize_adversary(res: AdversaryResult, records: Sequence[ScaleVQARecord]) -> dict[str, Any]:
    """Accuracy against chance with a 95% interval, overall and per question type, and its votes."""
    base: dict[str, Any] = {"kind": res.kind, "protocol": res.protocol}
    if res.skipped:
        return {**base, "skipped": res.skipped, "accuracy": None, "n": 0, "ci95": None, "per_type": {}}
    chance = np.array([1.0 / len(r.options) for r in records])
    out = {**base, **accuracy_summary(res.credit, chance)}
    n = len(records)
    votes = int(res.votes.sum())
    out["votes"] = votes
    out["vote_rate"] = votes / n if n else None
    out["vote_rate_ci95"] = list(wilson_interval(votes, n)) if n else None
    types = sorted({r.question_type for r in records})
    out["per_type"] = {}
    for qt in types:
        idx = [i for i, r in enumerate(records) if r.question_type == qt]
        out["per_type"][qt] = accuracy_summary(res.credit[idx], chance[idx])
    if res.samples is not None:
        out["samples"] = res.samples
    out["details"] = res.details
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(ci: Sequence[float] | None) -> str:
    return "-" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the same figures as ``report.json``, for reading."""
    r = report
    lines = [
        f"# Leakage report: {r['input']['data']}",
        "",
        f"Split `{r['input']['split']}`; images: {r['input']['images'] or 'not checked (text only)'}.",
        "",
        "## Accounting",
        "",
        "| items | kept | flagged | invalid | written to curated.json |",
        "|---|---|---|---|---|",
        f"| {r['n_items']} | {r['kept']} | {r['flagged']} | {r['invalid']} | {r['curated']} |",
        "",
        f"kept + flagged + invalid = {r['kept'] + r['flagged'] + r['invalid']} = n_items: "
        f"{_fmt(r['accounting_ok'])}. Flagged items are "
        f"{'dropped from' if r['config']['drop_flagged'] else 'kept in'} curated.json and all listed in "
        "flagged.json; invalid records are listed in invalid.json with their reasons.",
        "",
    ]
    if r["invalid_reasons"]:
        lines += [
            "Invalid records per reason: " + ", ".join(f"{k} {v}" for k, v in r["invalid_reasons"].items())
        ]
        lines.append("")
    rule = r["flag_rule"]
    lines += [
        "## Text-only adversaries",
        "",
        "Accuracy on the evaluated order (ties split), 95% Wilson interval, chance = mean 1/(options). "
        "Votes: items answered under the adversary's protocol (circular: right under every rotation of "
        "the options; published: out-of-fold answer, fitted without the item's slide).",
        "",
        "| adversary | protocol | accuracy | 95% CI | chance | above chance | votes | votes counted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in r["adversaries"].items():
        if a.get("skipped"):
            lines.append(f"| {name} | {a['protocol']} | skipped: {a['skipped']} | | | | | |")
            continue
        lines.append(
            f"| {name} | {a['protocol']} | {_fmt(a['accuracy'])} | {_ci(a['ci95'])} | {_fmt(a['chance'])} | "
            f"{_fmt(a['above_chance'])} | {a['votes']} | {_fmt(name in rule['counted'])} |"
        )
    types = sorted({qt for a in r["adversaries"].values() for qt in a.get("per_type", {})})
    if types:
        lines += [
            "",
            "Accuracy per question type:",
            "",
            "| adversary | " + " | ".join(f"{qt} {QUESTION_TYPE_NAMES.get(qt, '')}" for qt in types) + " |",
            "|---|" + "---|" * len(types),
        ]
        for name, a in r["adversaries"].items():
            if a.get("skipped"):
                continue
            cells = []
            for qt in types:
                t = a["per_type"].get(qt)
                cells.append("-" if not t or t["n"] == 0 else f"{t['accuracy']:.3f} {_ci(t['ci95'])}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**Flag rule**: an item is flagged when at least h = {rule['min_votes']} of the n = "
        f"{rule['n_adversaries']} adversaries answer it (gate: {rule['gate']}; votes counted from: "
        f"{', '.join(rule['counted']) or 'none'}), or when a check in {rule['flag_checks']} hits it.",
        "",
        rule["rationale"],
        "",
        *([f"**Note**: {rule['note']}.", ""] if rule.get("note") else []),
        "Flag reasons: " + (", ".join(f"{k} {v}" for k, v in r["flag_reasons"].items()) or "none"),
        "",
        "## Constraint checks",
        "",
        "Run on the valid input records, before any remediation.",
        "",
    ]
    for name, c in r["constraints"].items():
        head = f"### {name}: {'passed' if c['passed'] else 'n/a' if c['passed'] is None else 'FAILED'}"
        lines += [
            head,
            "",
            f"{c['count_unit']}: {c['count']} (of {c['n']} items); flags items: {_fmt(c['flags_items'])}.",
        ]
        skip = ("passed", "n", "count", "count_unit", "flags_items", "examples")
        extra = {k: v for k, v in c.items() if k not in skip}
        if extra:
            lines.append("")
            lines += [f"- {k}: {v}" for k, v in extra.items()]
        if c["examples"]:
            lines.append("")
            lines += [f"- example: {e}" for e in c["examples"]]
        lines.append("")
    rem = r["remediation"]
    lines += [
        "## Remediation",
        "",
        f"Rebalance answer letters: {_fmt(rem['rebalance'])} (seed {rem['seed']}); "
        f"flagged items {'dropped' if rem['drop_flagged'] else 'kept'}.",
        "",
        f"- letters before (valid input): {rem['letters_before']['counts']} "
        f"(chi2 p = {_fmt(rem['letters_before']['p_value'])})",
        f"- letters after (curated.json): {rem['letters_after']['counts']} "
        f"(chi2 p = {_fmt(rem['letters_after']['p_value'])})",
    ]
    if rem["rebalance"]:
        lines += [
            f"- items permuted: {rem['permuted']}; left as they were (options refer to others): "
            f"{rem['not_permuted']}; rationales with rewritten letters: {rem['rationales_rewritten']}",
        ]
    lines.append("")
    return "\n".join(lines)
