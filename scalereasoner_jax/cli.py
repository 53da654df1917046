"""The ``scalereasoner`` command. Each subcommand imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import typing
from collections.abc import Sequence
from pathlib import Path

from scalereasoner_jax.config import Schedule


def _parity(args: argparse.Namespace) -> int:
    from scalereasoner_jax.models.qwen2_5_vl.parity import run_parity

    report = run_parity(args.hf_model, images=args.image, prompt=args.prompt, dtype=args.dtype)
    print(report.summary())
    if args.json:
        print(json.dumps({**report.__dict__, "passed": report.passed}, indent=2))
    return 0 if report.passed else 1


def _data_build(args: argparse.Namespace) -> int:
    if args.dataset == "scale_vqa":
        from scalereasoner_jax.data.build import build_scale_vqa
        from scalereasoner_jax.data.schema import ValidationError

        try:
            result = build_scale_vqa(
                args.manual_dir,
                args.data_dir,
                skip_invalid=args.skip_invalid,
                max_image_pixels=args.max_image_pixels,
                overwrite=args.overwrite,
            )
        except ValidationError as err:
            print(err, file=sys.stderr)
            return 1
    else:
        from scalereasoner_jax.data.wsi import ManifestError, SlideError
        from scalereasoner_jax.data.wsi_build import build_wsi_cross_scale

        config = json.loads(args.config) if args.config else {}
        try:
            result = build_wsi_cross_scale(args.manual_dir, args.data_dir, **config)
        except (ManifestError, SlideError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from scalereasoner_jax.data.synthetic import synthesize

    result = synthesize(args.out, args.n, seed=args.seed, option_order=args.option_order)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from scalereasoner_jax.data.inspect import inspect_dataset

    result = inspect_dataset(args.dataset, args.data_dir, args.out, split=args.split, index=args.index)
    for split, counts in result["counts"].items():
        print(f"{split}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"example {result['index']} of {result['split']} drawn to {result['png']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from scalereasoner_jax.export import export_main

    return export_main(args)


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``scalereasoner export``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a training workdir, its checkpoints/ directory or one step directory",
    )
    parser.add_argument(
        "--step", type=int, default=None, help="the step to export (default: the newest usable)"
    )
    parser.add_argument(
        "--base",
        default=None,
        help="the HF folder the run started from (default: model.hf_dir of the run's config, or "
        "WORKDIR/init_model for model.init=tiny); gives config, tokenizer and processor",
    )
    parser.add_argument("--out", required=True, help="the HF folder to write")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="of the written weights"
    )
    parser.add_argument(
        "--max_shard_size",
        "--max-shard-size",
        dest="max_shard_size",
        default="4GB",
        help="e.g. 5GB, 500MB, 4GiB",
    )
    parser.add_argument(
        "--image", action="append", default=None, help="a probe image for the parity gate (repeatable)"
    )
    parser.add_argument("--prompt", default=None, help="the parity gate's probe text")
    parser.add_argument(
        "--base_model_id",
        "--base-model-id",
        dest="base_model_id",
        default=None,
        help="the card's base_model (a Hub id); default: the base config's _name_or_path if it is one",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the export files of a non-empty --out that is not a previous export",
    )


def eval_export_dir(checkpoint: str, out: Path | None, stack: contextlib.ExitStack) -> Path:
    """Where ``eval --checkpoint`` writes its export: in ``--out``, else beside a local checkpoint, else
    (a bucket, which the export does not write to) in a temporary folder that ``stack`` removes."""
    if out is not None:
        return out / "export"
    if "://" in checkpoint:
        return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scalereasoner-eval-"))) / "export"
    return Path(checkpoint) / "export"


def _eval(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        return _eval_in(args, stack)


def _eval_in(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    from scalereasoner_jax.evaluation.report import to_markdown
    from scalereasoner_jax.evaluation.runner import EvalConfig, EvalError, run_eval

    out = Path(args.out) if args.out else None
    model_dir = args.model
    if args.checkpoint:  # export first (parity-gated), then evaluate the exported folder
        from scalereasoner_jax.export import export_checkpoint

        export_dir = eval_export_dir(args.checkpoint, out, stack)
        report = export_checkpoint(args.checkpoint, base=args.base, out=export_dir, step=args.step)
        if not report.passed:
            print(f"error: the export of {args.checkpoint} failed its parity check", file=sys.stderr)
            return 1
        model_dir = export_dir
    config = EvalConfig(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
        no_images=args.no_images,
        shuffle_views=args.shuffle_views,
        option_hub=not args.no_option_hub,
        random_fallback=args.random_fallback,
        seed=args.seed,
    )
    try:
        results = run_eval(
            model_dir,
            args.data,
            backend=args.backend,
            data_dir=args.data_dir,
            config=config,
            out_dir=out,
            progress=lambda line: print(line, file=sys.stderr),
        )
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(to_markdown(results))
    if out:
        print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {out / 'predictions.jsonl'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    from scalereasoner_jax.demo import DemoConfig, run_demo

    changes = {k: v for k, v in vars(args).items() if k in DemoConfig.__dataclass_fields__ and v is not None}
    run_demo(dataclasses.replace(DemoConfig(), **changes))
    return 0


def _train(args: argparse.Namespace) -> int:
    from scalereasoner_jax.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides, kind=args.command)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.command == "grpo":
        from scalereasoner_jax.rl.trainer import run_grpo as run
    else:
        from scalereasoner_jax.train.sft import run_sft as run
    return run(config, args.workdir, resume=args.resume)


def _bench(args: argparse.Namespace) -> int:
    # Left unset, the images' side stays each benchmark's own default (rollout 224 px, forward 448 px).
    side = {} if args.image_side is None else {"image_side": args.image_side}
    if args.what == "data":
        from scalereasoner_jax.bench.data import format_result as format_data
        from scalereasoner_jax.bench.data import run as run_data

        print(format_data(run_data(n=args.examples, batch_size=args.batch_size, out_json=args.out)))
        return 0
    if args.what == "grpo":
        from scalereasoner_jax.bench.grpo import format_result as format_grpo
        from scalereasoner_jax.bench.grpo import run as run_grpo_bench

        print(format_grpo(run_grpo_bench(tuple(args.configs), out_json=args.out)))
        return 0
    if args.what == "rollout":
        from scalereasoner_jax.bench.rollout import format_result as format_rollout
        from scalereasoner_jax.bench.rollout import run as run_rollout

        results = []
        for size in args.configs:
            results.append(
                run_rollout(
                    config=size, runs=args.runs, max_new_tokens=args.max_new_tokens, dtype=args.dtype, **side
                )
            )
            print(format_rollout(results[-1]))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    if args.what == "forward":
        from scalereasoner_jax.bench.forward import format_result, run

        result = run(
            runs=args.runs,
            n_images=args.images,
            text_tokens=args.text_tokens,
            threads=args.threads,
            out_json=args.out,
            **side,
        )
        print(format_result(result))
        return 0
    raise AssertionError(args.what)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalereasoner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="logit parity of our Qwen2.5-VL against transformers on one folder")
    p.add_argument(
        "--hf-model", "--hf_model", dest="hf_model", required=True, help="Hugging Face model folder"
    )
    p.add_argument(
        "--image",
        action="append",
        default=None,
        help="image file (repeat for several); default: three synthetic probe images",
    )
    p.add_argument("--prompt", default=None, help="text after the images")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    p.set_defaults(func=_parity)

    d = sub.add_parser("data", help="build, synthesise and inspect datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    db = dsub.add_parser("build", help="build a TFDS dataset (no TensorFlow needed)")
    db.add_argument("dataset", choices=["scale_vqa", "wsi_cross_scale"])
    db.add_argument(
        "--manual_dir",
        "--manual-dir",
        dest="manual_dir",
        required=True,
        help="scale_vqa: train/val/test.json + images; wsi_cross_scale: manifest + slides",
    )
    db.add_argument("--data_dir", "--data-dir", dest="data_dir", required=True, help="TFDS data_dir to write")
    db.add_argument(
        "--skip_invalid",
        "--skip-invalid",
        dest="skip_invalid",
        action="store_true",
        help="scale_vqa: skip bad records and write skip_report.json (default: fail)",
    )
    db.add_argument(
        "--max_image_pixels",
        "--max-image-pixels",
        dest="max_image_pixels",
        type=int,
        default=2**26,
        help="scale_vqa: refuse images above this many pixels",
    )
    db.add_argument("--overwrite", action="store_true", help="scale_vqa: rebuild an existing version")
    db.add_argument(
        "--config",
        default=None,
        help="wsi_cross_scale: builder config as JSON, e.g. '{\"magnifications\": [5, 10, 20]}'",
    )
    db.set_defaults(func=_data_build)
    ds = dsub.add_parser("synth", help="write a synthetic cross-scale set in the Scale-VQA release layout")
    ds.add_argument("--out", required=True)
    ds.add_argument("--n", type=int, required=True, help="number of questions")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument(
        "--option_order",
        "--option-order",
        choices=["shuffled", "canonical"],
        default="shuffled",
        help="canonical: one fixed option list per question type, the letter names what the views show",
    )
    ds.set_defaults(func=_data_synth)
    di = dsub.add_parser("inspect", help="counts per split and question type; one example drawn to a PNG")
    di.add_argument(
        "dataset", help="a registered name (with --data_dir) or a built dataset version directory"
    )
    di.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None)
    di.add_argument("--split", default=None)
    di.add_argument("--index", type=int, default=0)
    di.add_argument("--out", default="example.png")
    di.set_defaults(func=_data_inspect)

    for name, example in (("grpo", "grpo_tiny_cpu"), ("sft", "sft_tiny_cpu")):
        t = sub.add_parser(name, help=f"{name.upper()} training (e.g. --config {example})")
        t.add_argument(
            "--config", required=True, help="a preset name (scalereasoner_jax/configs/) or a YAML path"
        )
        t.add_argument(
            "--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard (local or gs://)"
        )
        t.add_argument("--resume", action="store_true", help="continue from the latest usable checkpoint")
        t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=4 checkpoint.every=1")
        t.set_defaults(func=_train)

    x = sub.add_parser("export", help="an Orbax checkpoint -> a Hugging Face folder, gated by a parity check")
    _add_export_arguments(x)
    x.set_defaults(func=_export)

    e = sub.add_parser("eval", help="greedy evaluation on DATASET:SPLIT, with ablation and baseline rows")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face folder")
    src.add_argument(
        "--checkpoint",
        help="a training workdir or its checkpoints dir, local or gs:// (exported first, into --out/export, "
        "else beside a local checkpoint, else into a temporary folder)",
    )
    e.add_argument("--step", type=int, default=None, help="--checkpoint: this step (default: the latest)")
    e.add_argument("--base", default=None, help="--checkpoint: the HF folder training started from")
    e.add_argument("--data", required=True, help="DATASET:SPLIT, DATASET a TFDS name or a built version dir")
    e.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None, help="TFDS data_dir")
    e.add_argument("--backend", choices=["hf", "jax"], default="hf")
    e.add_argument("--out", default=None, help="write results.json, results.md, predictions.jsonl here")
    e.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=256)
    e.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=8)
    e.add_argument("--limit", type=int, default=None, help="only the first N items")
    e.add_argument("--no_images", "--no-images", dest="no_images", action="store_true", help="ablation row")
    e.add_argument(
        "--shuffle_views", "--shuffle-views", dest="shuffle_views", action="store_true", help="ablation row"
    )
    e.add_argument("--no_option_hub", action="store_true", help="leave out the option-hub baseline row")
    e.add_argument(
        "--random_fallback",
        action="store_true",
        help="guess a seeded random letter when no answer is found (PathMMU-comparable); default: wrong",
    )
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_eval)

    m = sub.add_parser(
        "demo", help="the main job: synthetic data -> SFT warm-up -> GRPO -> export -> evaluation (CPU)"
    )
    m.add_argument("--out", default=None, help="output folder (default runs/demo; replaced)")
    m.add_argument("--questions", type=int, default=None, help="synthetic questions")
    m.add_argument("--sft_steps", "--sft-steps", dest="sft_steps", type=int, default=None)
    m.add_argument("--grpo_steps", "--grpo-steps", dest="grpo_steps", type=int, default=None)
    m.add_argument("--eval_limit", "--eval-limit", dest="eval_limit", type=int, default=None)
    m.add_argument("--image_size", "--image-size", dest="image_size", type=int, default=None)
    m.add_argument("--grpo_lr", "--grpo-lr", dest="grpo_lr", type=float, default=None)
    m.add_argument(
        "--grpo_schedule",
        "--grpo-schedule",
        dest="grpo_schedule",
        choices=typing.get_args(Schedule),
        default=None,
    )
    m.add_argument("--kl_coef", "--kl-coef", dest="kl_coef", type=float, default=None)
    m.add_argument("--seed", type=int, default=None)
    m.set_defaults(func=_demo)

    from scalereasoner_jax.curation.cli import add_parser as add_curate_parser

    add_curate_parser(sub)

    b = sub.add_parser("bench", help="benchmarks (side by side, medians)")
    b.add_argument("what", choices=["forward", "data", "rollout", "grpo"])
    b.add_argument("--configs", nargs="+", default=["tiny", "small"], help="rollout: model sizes")
    b.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=32)
    b.add_argument("--examples", type=int, default=240, help="data: examples in the synthetic set")
    b.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=8)
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--images", type=int, default=3, help="forward: images per input")
    b.add_argument(
        "--image-side",
        "--image_side",
        dest="image_side",
        type=int,
        default=None,
        help="forward and rollout: the images' side in px (default: forward 448, rollout 224)",
    )
    b.add_argument(
        "--text-tokens",
        "--text_tokens",
        dest="text_tokens",
        type=int,
        default=512,
        help="forward: text tokens",
    )
    b.add_argument("--threads", type=int, default=None, help="forward: torch threads (default: torch's own)")
    b.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="rollout: weights and compute"
    )
    b.add_argument("--out", default=None, help="write the figures as JSON here")
    b.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt", "") is None:
        from scalereasoner_jax.models.qwen2_5_vl.parity import DEFAULT_PROMPT

        args.prompt = DEFAULT_PROMPT
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
