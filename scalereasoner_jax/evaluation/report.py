"""The evaluation's Markdown table."""

from __future__ import annotations

from typing import Any

_ROW_NAMES = {
    "images": "model",
    "no_images": "model, images removed",
    "shuffle_views": "model, views permuted",
    "option_hub": "option-hub solver (text only)",
}


def _pct(rate: dict[str, Any]) -> str:
    lo, hi = rate["ci95"]
    return f"{100 * rate['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def to_markdown(results: dict[str, Any]) -> str:
    """One row per condition: accuracy with its 95% interval, per-type accuracy, format, unanswered, and
    the expected accuracy had the unanswered items been guessed at random."""
    rows = results["rows"]
    types = sorted({t for row in rows.values() for t in row["per_type"]})
    head = ["row", "accuracy % [95% CI]", *types, "format %", "unanswered %", "if guessed %", "mean tokens"]
    lines = [
        f"Evaluation of `{results['model']}` on `{results['data']}` ({results['n']} items, backend "
        f"{results['backend']}, chance {100 * results['chance']:.1f}%"
        + (", unanswered items guessed at random" if results.get("random_fallback") else "")
        + ")",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, row in rows.items():
        text_only = row["mean_response_tokens"] is None
        cells = [
            _ROW_NAMES.get(name, name),
            _pct(row["accuracy"]),
            *[f"{100 * row['per_type'][t]['value']:.1f}" if t in row["per_type"] else "" for t in types],
            "" if text_only else f"{100 * row['format_rate']['value']:.1f}",
            "" if text_only else f"{100 * row['unanswered_rate']['value']:.1f}",
            "" if text_only else f"{100 * row['accuracy_if_guessed']['value']:.1f}",
            "" if text_only else f"{row['mean_response_tokens']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
