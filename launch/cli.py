"""``scalereasoner-launch``: TPU pod jobs on queued resources, and the local multi-process runner.

    scalereasoner-launch up     --name NAME --zone ZONE [--project P] --accelerator v5p-64 [--spot|--reserved]
    scalereasoner-launch setup  --name NAME --zone ZONE            # ship HEAD's tracked files, install
    scalereasoner-launch run    --name NAME --zone ZONE [--env K=V ...] [--autodelete] -- CMD ARG ...
    scalereasoner-launch status --name NAME --zone ZONE
    scalereasoner-launch logs   [--run_id ID] [--worker N] [--lines 100]
    scalereasoner-launch down   --name NAME --zone ZONE
    scalereasoner-launch local  --num_processes 2 --devices_per_process 4 -- CMD ARG ...

Everything after ``--`` is the command, passed on argument by argument. ``--dry-run`` prints the exact
commands (one shell-quoted line each) and runs nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from launch.gcloud import Gcloud, GcloudError, Target
from launch.local import run_local
from launch.tpu import DEFAULT_EXTRAS, DEFAULT_PACKAGES, LaunchError, Pod, RunOptions, show_logs

CLOUD_ACTIONS = ("up", "setup", "run", "status", "down")


def _env_pairs(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("queued resource")
    g.add_argument("--name", required=True, help="queued resource (and TPU node) name")
    g.add_argument("--zone", default=None, help="e.g. us-east5-a (default: gcloud's compute/zone)")
    g.add_argument("--project", default=None, help="default: gcloud's configured project")
    g.add_argument("--accelerator", default="v5p-64", help="accelerator type, e.g. v5p-64, v4-32, v6e-16")
    g.add_argument("--runtime", default="v2-alpha-tpuv5", help="TPU VM runtime (software) version")
    cap = g.add_mutually_exclusive_group()
    cap.add_argument("--spot", dest="capacity", action="store_const", const="spot", help="spot capacity")
    cap.add_argument(
        "--reserved", dest="capacity", action="store_const", const="reserved", help="a reservation"
    )
    g.add_argument("--node_count", "--node-count", type=int, default=1, help="slices (multislice when > 1)")
    g.add_argument("--workers", type=int, default=None, help="workers per slice (default: asked from gcloud)")
    g.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print, run nothing")
    g.add_argument("--poll_s", type=float, default=30.0, help="seconds between state checks while waiting")
    g.add_argument("--wait_timeout_s", type=float, default=6 * 3600.0, help="give up waiting after this")

    parser = argparse.ArgumentParser(prog="scalereasoner-launch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("up", parents=[common], help="create / reuse / recreate the queued resource; wait for it")
    s = sub.add_parser("setup", parents=[common], help="ship the code at HEAD to every worker and install it")
    s.add_argument("--commit", default=None, help="ship this commit instead of HEAD")
    s.add_argument("--packages", nargs="*", default=list(DEFAULT_PACKAGES), help="installed with the project")
    s.add_argument("--extras", default=DEFAULT_EXTRAS, help="the project's extras to install ('' for none)")
    r = sub.add_parser("run", parents=[common], help="run -- CMD ... on every worker")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="exported on every worker")
    r.add_argument("--run_id", default=None, help="default: NAME-<date>-<time>")
    r.add_argument("--log_dir", type=Path, default=Path("logs/launch"), help="per-worker logs go here")
    r.add_argument("--max_preemptions", type=int, default=10, help="recreate-and-resume retries")
    r.add_argument("--max_failures", type=int, default=0, help="reruns after a worker fails (not preempted)")
    r.add_argument("--preempted_grace_s", type=float, default=120.0, help="time others get after an exit 75")
    r.add_argument("--autodelete", action="store_true", help="delete the queued resource when the run ends")
    sub.add_parser("status", parents=[common], help="the queued resource's state and workers")
    sub.add_parser("down", parents=[common], help="delete the queued resource and its nodes")
    lg = sub.add_parser("logs", help="the per-worker logs of a run (latest attempt)")
    lg.add_argument("--log_dir", type=Path, default=Path("logs/launch"))
    lg.add_argument("--run_id", default=None, help="default: the newest run")
    lg.add_argument("--worker", type=int, default=None, help="default: every worker")
    lg.add_argument("--lines", type=int, default=100, help="last N lines of each (0: all)")
    lo = sub.add_parser("local", help="run -- CMD ... as N local JAX processes with K CPU devices each")
    lo.add_argument("--num_processes", type=int, required=True)
    lo.add_argument("--devices_per_process", type=int, required=True)
    lo.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    lo.add_argument("--log_dir", type=Path, default=None, help="also write process-<i>.log files here")
    lo.add_argument("--run_id", default=None)
    lo.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is the command, untouched by argparse.
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)

    if args.action == "local":
        return run_local(
            command,
            num_processes=args.num_processes,
            devices_per_process=args.devices_per_process,
            env=_env_pairs(args.env),
            log_dir=args.log_dir,
            run_id=args.run_id,
            port=args.port,
        )
    if args.action == "logs":
        return show_logs(args.log_dir, args.run_id, args.worker, args.lines, sys.stdout)
    if command and args.action != "run":
        raise SystemExit(f"`{args.action}` takes no command after --")

    try:
        target = Target(
            name=args.name,
            zone=args.zone,
            project=args.project,
            accelerator=args.accelerator,
            runtime=args.runtime,
            capacity=args.capacity or "on-demand",
            node_count=args.node_count,
        )
    except ValueError as e:
        raise SystemExit(str(e)) from e
    pod = Pod(
        target,
        Gcloud(dry_run=args.dry_run),
        poll_s=args.poll_s,
        wait_timeout_s=args.wait_timeout_s,
        workers=args.workers,
    )
    try:
        if args.action == "up":
            pod.up()
        elif args.action == "setup":
            pod.setup(args.commit, packages=args.packages, extras=args.extras)
        elif args.action == "status":
            pod.status()
        elif args.action == "down":
            pod.down()
        elif args.action == "run":
            if not command:
                raise SystemExit("run: give the command after --, e.g. run -- scalereasoner grpo ...")
            code = pod.run(
                RunOptions(
                    command=command,
                    env=_env_pairs(args.env),
                    run_id=args.run_id,
                    log_dir=args.log_dir,
                    max_preemptions=args.max_preemptions,
                    max_failures=args.max_failures,
                    autodelete=args.autodelete,
                    preempted_grace_s=args.preempted_grace_s,
                )
            )
            return code if 0 <= code < 256 else 1
    except (GcloudError, LaunchError) as e:
        print(f"scalereasoner-launch {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
