"""``curate``: validate, check, (rebalance), run the text-only adversaries, flag, write the outputs.

Outputs in ``out_dir``: ``curated.json`` (release layout), ``flagged.json``, ``invalid.json``,
``report.json`` and ``report.md``. Every input record ends up in exactly one of kept / flagged /
invalid (``kept + flagged + invalid = n_items`` is asserted before anything is written), and records
are written as they came, with only options, answer and rationale changed where letters were
rebalanced, so no field is lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scalereasoner_jax.curation.adversaries import RULES, AdversaryResult, letter_prior, run_rule
from scalereasoner_jax.curation.constraints import ITEM_CHECKS, run_checks
from scalereasoner_jax.curation.learned import learned_solver
from scalereasoner_jax.curation.lm import DEFAULT_INSTRUCTION, LetterScorer, circular_lm_eval
from scalereasoner_jax.curation.remediation import permute_release_item, rebalance_letters
from scalereasoner_jax.curation.report import render_markdown, summarize_adversary
from scalereasoner_jax.curation.stats import letter_balance
from scalereasoner_jax.data.schema import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAGNIFICATIONS,
    QUESTION_TYPES,
    ScaleVQARecord,
    ValidationPolicy,
    read_release_json,
    validate_split,
)

__all__ = [
    "ADVERSARIES",
    "DEFAULT_ADVERSARIES",
    "FLAG_RULE_RATIONALE",
    "OUTPUT_FILES",
    "CurationConfig",
    "curate",
]

ADVERSARIES: tuple[str, ...] = (*RULES, "letter_prior", "learned")
DEFAULT_ADVERSARIES: tuple[str, ...] = (
    "option_hub",
    "longest_option",
    "shortest_option",
    "letter_prior",
    "question_overlap",
    "learned",
)
OUTPUT_FILES: tuple[str, ...] = ("curated.json", "flagged.json", "invalid.json", "report.json", "report.md")
GATES: tuple[str, ...] = ("significant", "none")

FLAG_RULE_RATIONALE = (
    "Default h = 2 with the 'significant' gate. MMStar drops an item when 3 of its 8 text-only LLMs answer "
    "it (3/8 of the panel); the default panel here has 6 adversaries and 3/8 x 6 = 2.25, so h = 2. The "
    "panel is made of specialists (each rule sees one artefact) plus a learned generalist, so a "
    "one-artefact leak is seen by its rule and by the learned solver: h = 2 catches it, while one rule's "
    "hit alone (which happens by chance on about 1/k of any set) does not flag. The gate counts votes only "
    "from adversaries whose 95% interval lies above chance on this set: an adversary at chance is "
    "guessing, and counting its hits would flag clean items. Set h and the gate for other panels (PathMMU: "
    "3 of 4; Scale-VQA's own screen: 1 of 2)."
)


@dataclasses.dataclass(frozen=True)
class CurationConfig:
    """Every knob of ``curate``; the CLI maps its options one to one onto these fields."""

    adversaries: tuple[str, ...] = DEFAULT_ADVERSARIES
    min_votes: int = 2  # h
    gate: str = "significant"  # "significant": count votes only of adversaries above chance; "none"
    lm_dirs: tuple[str, ...] = ()  # HF folders, one LM adversary each
    lm_samples: int = 5  # k
    lm_temperature: float = 1.0
    lm_batch_size: int = 8
    lm_device: str = "auto"
    lm_dtype: str = "float32"
    lm_instruction: str = DEFAULT_INSTRUCTION
    lm_answer_prefix: str = ""
    drop_flagged: bool = True
    rebalance: bool = False
    seed: int = 0
    folds: int = 5
    alpha: float = 0.05
    max_length_ratio: float = 2.0
    magnification_free_types: tuple[str, ...] = ("type_E",)  # Diagnosis options name diagnoses
    near_duplicate_threshold: float = 0.8
    flag_checks: tuple[str, ...] = ("magnification_words", "identical_options", "rationale_letter")
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    split: str | None = None  # default: the data file's stem
    overwrite: bool = False

    def validate(self, n_lm_extra: int = 0) -> None:
        """Raise ValueError naming the bad setting."""
        unknown = [a for a in self.adversaries if a not in ADVERSARIES]
        if unknown:
            raise ValueError(f"unknown adversaries {unknown}; choose from {', '.join(ADVERSARIES)}")
        if len(set(self.adversaries)) != len(self.adversaries):
            raise ValueError(f"adversaries listed twice: {list(self.adversaries)}")
        n = len(self.adversaries) + len(self.lm_dirs) + n_lm_extra
        if n == 0:
            raise ValueError("no adversaries selected")
        if not 1 <= self.min_votes <= n:
            raise ValueError(
                f"min_votes (h) must be between 1 and the {n} adversaries (n), got {self.min_votes}"
            )
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        bad = [c for c in self.flag_checks if c not in ITEM_CHECKS]
        if bad:
            raise ValueError(f"flag_checks {bad} are not item checks; choose from {', '.join(ITEM_CHECKS)}")
        bad_types = [t for t in self.magnification_free_types if t not in QUESTION_TYPES]
        if bad_types:
            raise ValueError(
                f"magnification_free_types {bad_types} are not among {', '.join(QUESTION_TYPES)}"
            )
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        if self.lm_samples < 1:
            raise ValueError(f"lm_samples (k) must be at least 1, got {self.lm_samples}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


def _escapes_root(rec: ScaleVQARecord, root: Path) -> str | None:
    """A view whose real path (links followed) leaves the image root; the lexical check ran already."""
    real_root = root.resolve()
    for mag in MAGNIFICATIONS:
        rel = rec.image_paths.get(mag)
        if rel is not None and not (root / rel).resolve().is_relative_to(real_root):
            return f"image path {mag}_mag={rel!r} resolves outside the image root {str(root)!r} (refused)"
    return None


def _lm_name(hf_dir: str, taken: set[str]) -> str:
    base = f"lm:{Path(hf_dir).name or hf_dir}"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}#{i}", i + 1
    return name


def _run_panel(
    records: Sequence[ScaleVQARecord], config: CurationConfig, lm_scorers: Mapping[str, LetterScorer]
) -> list[AdversaryResult]:
    results: list[AdversaryResult] = []
    for name in config.adversaries:
        if name in RULES:
            results.append(run_rule(name, records))
        elif name == "letter_prior":
            results.append(letter_prior(records, n_folds=config.folds, seed=config.seed))
        elif name == "learned":
            results.append(learned_solver(records, n_folds=config.folds, seed=config.seed))
    scorers: dict[str, LetterScorer] = dict(lm_scorers)
    taken = set(config.adversaries) | set(scorers)
    if config.lm_dirs:
        from scalereasoner_jax.curation.lm import HFLetterScorer

        for hf_dir in config.lm_dirs:
            name = _lm_name(hf_dir, taken)
            taken.add(name)
            scorers[name] = HFLetterScorer(
                hf_dir,
                device=config.lm_device,
                dtype=config.lm_dtype,
                batch_size=config.lm_batch_size,
                instruction=config.lm_instruction,
                answer_prefix=config.lm_answer_prefix,
            )
    for name, scorer in scorers.items():
        results.append(
            circular_lm_eval(
                records,
                scorer,
                samples=config.lm_samples,
                temperature=config.lm_temperature,
                seed=config.seed,
                name=name,
            )
        )
    return results


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def curate(
    data: str | Path,
    out_dir: str | Path,
    images: str | Path | None = None,
    config: CurationConfig | None = None,
    *,
    lm_scorers: Mapping[str, LetterScorer] | None = None,
) -> dict[str, Any]:
    """Curate one release JSON file; returns the report (also written to ``out_dir/report.json``).

    ``images``: the image root; when given, every view is checked (header only) and paths that leave the
    root, lexically or through links, make the record invalid. Without it the tool is text only (paths
    are still checked lexically). ``lm_scorers`` adds LM adversaries by name (e.g. a model already in
    memory) next to those of ``config.lm_dirs``.
    """
    config = config or CurationConfig()
    lm_scorers = dict(lm_scorers or {})
    config.validate(n_lm_extra=len(lm_scorers))
    data = Path(data)
    out = Path(out_dir)
    existing = [f for f in OUTPUT_FILES if (out / f).exists()]
    if existing and not config.overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; use overwrite to replace them")
    raw = read_release_json(data)
    split = config.split or data.stem
    root = Path(images) if images is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"image root {str(root)!r} is not a directory")
    policy = ValidationPolicy(
        skip_invalid=True, check_images=root is not None, max_image_pixels=config.max_image_pixels
    )
    records, vreport = validate_split(raw, root if root is not None else data.parent, split, policy)

    problems: dict[int, list[dict[str, str]]] = defaultdict(list)
    for p in vreport.problems:
        problems[p.index].append({"reason": str(p.reason), "detail": str(p)})
    if root is not None:
        safe = []
        for rec in records:
            why = _escapes_root(rec, root)
            if why:
                problems[rec.index].append(
                    {
                        "reason": "unsafe_image_path",
                        "detail": f"split={split} index={rec.index} No={rec.no}: {why}",
                    }
                )
            else:
                safe.append(rec)
        records = safe

    checks = run_checks(
        records,
        alpha=config.alpha,
        max_length_ratio=config.max_length_ratio,
        magnification_free_types=config.magnification_free_types,
        near_duplicate_threshold=config.near_duplicate_threshold,
    )
    rebalanced = rebalance_letters(records, config.seed) if config.rebalance else None
    evaluated = rebalanced.records if rebalanced else list(records)
    results = _run_panel(evaluated, config, lm_scorers)
    summaries = {r.name: summarize_adversary(r, evaluated) for r in results}
    ran = [r for r in results if not r.skipped]
    counted = [r for r in ran if config.gate == "none" or summaries[r.name]["above_chance"]]

    # Flags: votes of the counted adversaries, and hits of the flagging checks.
    reasons: dict[int, list[str]] = defaultdict(list)
    n_votes = [0] * len(evaluated)
    for r in counted:
        for i in range(len(evaluated)):
            n_votes[i] += bool(r.votes[i])
    for i, v in enumerate(n_votes):
        if v >= config.min_votes:
            who = [r.name for r in counted if r.votes[i]]
            reasons[i].append(
                f"adversaries: {v} of {len(results)} answer it without images ({', '.join(who)})"
            )
    for name in config.flag_checks:
        for i, why in checks[name].items.items():
            reasons[i].append(f"{name}: {why}")
    flag_reason_counts: Counter[str] = Counter()
    for rs in reasons.values():
        flag_reason_counts.update(r.split(":", 1)[0] for r in rs)

    # Outputs: raw records as they came, permuted where rebalanced.
    perms = rebalanced.permutations if rebalanced else {}

    def as_written(pos: int) -> dict[str, Any]:
        rec = evaluated[pos]
        item = raw[rec.index]
        return permute_release_item(item, perms[pos]) if pos in perms else item

    curated, flagged = [], []
    for pos, rec in enumerate(evaluated):
        if pos in reasons:
            votes = {
                r.name: {
                    "answer": r.answers[pos],
                    "vote": bool(r.votes[pos]),
                    "counted": r in counted,
                    **({"hits": r.hits[pos], "samples": r.samples} if r.hits is not None else {}),
                }
                for r in ran
            }
            flagged.append(
                {
                    "index": rec.index,
                    "No": rec.no,
                    "question_type": rec.question_type,
                    "reasons": reasons[pos],
                    "n_votes": n_votes[pos],
                    "votes": votes,
                    "permutation": perms.get(pos),
                    "record": as_written(pos),
                }
            )
            if not config.drop_flagged:
                curated.append(as_written(pos))
        else:
            curated.append(as_written(pos))
    invalid = [
        {
            "index": i,
            "No": raw[i].get("No") if isinstance(raw[i], dict) else None,
            "reasons": problems[i],
            "record": raw[i],
        }
        for i in sorted(problems)
    ]
    n_items = len(raw)
    kept = len(evaluated) - len(flagged)
    accounting_ok = kept + len(flagged) + len(invalid) == n_items
    if not accounting_ok:  # an internal error, never a data problem: refuse to write a lossy result
        raise AssertionError(f"accounting broken: {kept} + {len(flagged)} + {len(invalid)} != {n_items}")

    curated_recs = [
        evaluated[p] for p in range(len(evaluated)) if p not in reasons or not config.drop_flagged
    ]
    report: dict[str, Any] = {
        "input": {
            "data": str(data),
            "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
            "images": str(root) if root is not None else None,
            "split": split,
        },
        "config": {**dataclasses.asdict(config), "lm_scorers": sorted(lm_scorers)},
        "n_items": n_items,
        "kept": kept,
        "flagged": len(flagged),
        "invalid": len(invalid),
        "curated": len(curated),
        "accounting_ok": accounting_ok,
        "invalid_reasons": dict(sorted(Counter(p["reason"] for ps in problems.values() for p in ps).items())),
        "flag_rule": {
            "min_votes": config.min_votes,
            "n_adversaries": len(results),
            "gate": config.gate,
            "counted": [r.name for r in counted],
            "skipped": {r.name: r.skipped for r in results if r.skipped},
            "flag_checks": list(config.flag_checks),
            "rationale": FLAG_RULE_RATIONALE,
            "note": (
                f"only {len(counted)} of the adversaries counted, fewer than h = {config.min_votes}: "
                "no item can be flagged by votes"
                if 0 < len(counted) < config.min_votes
                else None
            ),
        },
        "flag_reasons": dict(sorted(flag_reason_counts.items())),
        "flagged_per_type": dict(sorted(Counter(f["question_type"] for f in flagged).items())),
        "adversaries": summaries,
        "constraints": {name: c.to_json(name in config.flag_checks) for name, c in checks.items()},
        "remediation": {
            "rebalance": config.rebalance,
            "seed": config.seed,
            "drop_flagged": config.drop_flagged,
            "letters_before": letter_balance([r.answer for r in records], [list(r.options) for r in records]),
            "letters_after": letter_balance(
                [r.answer for r in curated_recs], [list(r.options) for r in curated_recs]
            ),
            "permuted": len(perms),
            "not_permuted": len(rebalanced.not_permuted) if rebalanced else 0,
            "not_permuted_examples": (
                [{"No": evaluated[p].no, "why": w} for p, w in list(rebalanced.not_permuted.items())[:5]]
                if rebalanced
                else []
            ),
            "rationales_rewritten": rebalanced.rationales_rewritten if rebalanced else 0,
            "permutations": {str(evaluated[p].no): m for p, m in perms.items()},
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "curated.json", curated)
    _write_json(out / "flagged.json", flagged)
    _write_json(out / "invalid.json", invalid)
    _write_json(out / "report.json", report)
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report
