"""The ``scalereasoner`` command. Each subcommand imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _parity(args: argparse.Namespace) -> int:
    from scalereasoner_jax.models.qwen2_5_vl.parity import run_parity

    report = run_parity(args.hf_model, images=args.image, prompt=args.prompt, dtype=args.dtype)
    print(report.summary())
    if args.json:
        print(json.dumps({**report.__dict__, "passed": report.passed}, indent=2))
    return 0 if report.passed else 1


def _bench(args: argparse.Namespace) -> int:
    if args.what == "forward":
        from scalereasoner_jax.bench.forward import format_result, run

        result = run(
            runs=args.runs,
            n_images=args.images,
            image_side=args.image_side,
            text_tokens=args.text_tokens,
            threads=args.threads,
            out_json=args.out,
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

    b = sub.add_parser("bench", help="benchmarks (side by side, medians)")
    b.add_argument("what", choices=["forward"])
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--images", type=int, default=3)
    b.add_argument("--image-side", "--image_side", dest="image_side", type=int, default=448)
    b.add_argument("--text-tokens", "--text_tokens", dest="text_tokens", type=int, default=512)
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
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
