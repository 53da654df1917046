"""The ``curate`` subcommand: ``add_parser(subparsers)`` registers it on the main ``scalereasoner`` parser.

    scalereasoner curate --data test.json [--images ROOT] --out DIR [--lm HF_DIR --lm_samples 5]
                         [--min_votes 2] [--adversaries option_hub,learned,...] [--rebalance] [--keep_flagged]

Exit codes: 0 written; 2 bad input or options (the message names the file, record or option).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from scalereasoner_jax.curation.constraints import ITEM_CHECKS

__all__ = ["add_parser", "run_curate"]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_parser(subparsers: Any) -> None:
    """Register ``curate`` (with ``func`` set to :func:`run_curate`) on an argparse subparsers object."""
    from scalereasoner_jax.curation.pipeline import ADVERSARIES, DEFAULT_ADVERSARIES, CurationConfig

    d = CurationConfig()
    p = subparsers.add_parser(
        "curate",
        help="leakage-aware curation: text-only adversaries, constraint checks, remediation, report",
        description="Reads Scale-VQA records (a release JSON list) and writes curated.json, flagged.json, "
        "invalid.json, report.json and report.md. No adversary sees an image.",
    )
    p.add_argument("--data", required=True, help="a release JSON file (a list of Scale-VQA records)")
    p.add_argument(
        "--images",
        default=None,
        help="image root: check every view (header only) and refuse paths leaving it; default: text only",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default=None, help="split name in messages (default: the file's stem)")
    p.add_argument(
        "--adversaries",
        type=_csv,
        default=DEFAULT_ADVERSARIES,
        help=f"comma-separated panel, from {', '.join(ADVERSARIES)} (default: all); each --lm adds one",
    )
    p.add_argument(
        "--min_votes",
        "--min-votes",
        dest="min_votes",
        type=int,
        default=d.min_votes,
        help="h: flag an item when at least h of the n adversaries answer it (default 2; see report.md)",
    )
    p.add_argument(
        "--gate",
        choices=["significant", "none"],
        default=d.gate,
        help="significant: count votes only of adversaries whose 95%% interval is above chance (default)",
    )
    p.add_argument(
        "--lm",
        action="append",
        default=[],
        metavar="HF_DIR",
        help="a causal LM or our VLM (Hugging Face folder, safetensors) as a text-only adversary; repeatable",
    )
    p.add_argument(
        "--lm_samples", "--lm-samples", dest="lm_samples", type=int, default=d.lm_samples, help="k"
    )
    p.add_argument(
        "--lm_temperature",
        "--lm-temperature",
        dest="lm_temperature",
        type=float,
        default=d.lm_temperature,
        help="sampling temperature over the option letters; 0 = greedy",
    )
    p.add_argument(
        "--lm_batch_size", "--lm-batch-size", dest="lm_batch_size", type=int, default=d.lm_batch_size
    )
    p.add_argument(
        "--lm_device", "--lm-device", dest="lm_device", default=d.lm_device, help="auto, cpu, cuda"
    )
    p.add_argument(
        "--lm_dtype",
        "--lm-dtype",
        dest="lm_dtype",
        choices=["float32", "bfloat16", "float16"],
        default=d.lm_dtype,
    )
    p.add_argument(
        "--lm_answer_prefix",
        "--lm-answer-prefix",
        dest="lm_answer_prefix",
        default=d.lm_answer_prefix,
        help="text the answer starts with, after the prompt (e.g. '<answer>')",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--drop_flagged",
        "--drop-flagged",
        dest="drop_flagged",
        action="store_true",
        default=True,
        help="leave flagged items out of curated.json (default; they are all in flagged.json)",
    )
    group.add_argument(
        "--keep_flagged",
        "--keep-flagged",
        dest="drop_flagged",
        action="store_false",
        help="keep flagged items in curated.json too",
    )
    p.add_argument(
        "--rebalance",
        action="store_true",
        help="permute options (seeded) so answer letters are balanced; adversaries then see the new order",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--folds", type=int, default=d.folds, help="cross-validation folds, grouped by slide")
    p.add_argument("--alpha", type=float, default=d.alpha, help="level of the dataset-level tests")
    p.add_argument(
        "--max_length_ratio",
        "--max-length-ratio",
        dest="max_length_ratio",
        type=float,
        default=d.max_length_ratio,
    )
    p.add_argument(
        "--magnification_free_types",
        "--magnification-free-types",
        dest="magnification_free_types",
        type=_csv,
        default=d.magnification_free_types,
        help="question types whose options must not name a magnification (default type_E)",
    )
    p.add_argument(
        "--near_duplicate_threshold",
        "--near-duplicate-threshold",
        dest="near_duplicate_threshold",
        type=float,
        default=d.near_duplicate_threshold,
    )
    p.add_argument(
        "--flag_checks",
        "--flag-checks",
        dest="flag_checks",
        type=_csv,
        default=d.flag_checks,
        help=f"item checks that flag items, from {', '.join(ITEM_CHECKS)} ('' for none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --out")
    p.set_defaults(func=run_curate)


def run_curate(args: argparse.Namespace) -> int:
    """The handler: build the config, curate, print a one-screen summary; 2 on bad input or options."""
    from scalereasoner_jax.curation.pipeline import CurationConfig, curate

    try:
        config = CurationConfig(
            adversaries=tuple(args.adversaries),
            min_votes=args.min_votes,
            gate=args.gate,
            lm_dirs=tuple(args.lm),
            lm_samples=args.lm_samples,
            lm_temperature=args.lm_temperature,
            lm_batch_size=args.lm_batch_size,
            lm_device=args.lm_device,
            lm_dtype=args.lm_dtype,
            lm_answer_prefix=args.lm_answer_prefix,
            drop_flagged=args.drop_flagged,
            rebalance=args.rebalance,
            seed=args.seed,
            folds=args.folds,
            alpha=args.alpha,
            max_length_ratio=args.max_length_ratio,
            magnification_free_types=tuple(args.magnification_free_types),
            near_duplicate_threshold=args.near_duplicate_threshold,
            flag_checks=tuple(args.flag_checks),
            split=args.split,
            overwrite=args.overwrite,
        )
        report = curate(args.data, args.out, images=args.images, config=config)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"curate: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{report['n_items']} items: kept {report['kept']}, flagged {report['flagged']}, "
        f"invalid {report['invalid']} -> {args.out}"
    )
    for name, a in report["adversaries"].items():
        if a.get("skipped"):
            print(f"  {name:<18} skipped: {a['skipped']}")
            continue
        lo, hi = a["ci95"]
        mark = "ABOVE CHANCE" if a["above_chance"] else ""
        print(
            f"  {name:<18} accuracy {a['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] chance {a['chance']:.3f} "
            f"votes {a['votes']} {mark}"
        )
    failed = [n for n, c in report["constraints"].items() if c["passed"] is False]
    print(f"  checks failed: {', '.join(failed) or 'none'}")
    return 0
