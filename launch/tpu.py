"""A TPU pod job, by hand's rules: provision idempotently, ship the code at a commit, run one command on
every worker (fail fast, a log per worker), ride out preemptions, clean up.

State machine of ``up`` (queued resources):

    absent ------------------------------> create -> wait until ACTIVE
    CREATING / ACCEPTED / WAITING_FOR_RESOURCES / PROVISIONING -> wait until ACTIVE
    ACTIVE ------------------------------> reuse
    FAILED / SUSPENDED ------------------> delete, create, wait
    SUSPENDING / DELETING ---------------> wait until it settles, then as above

``run`` treats a failed attempt as a preemption when the queued resource is no longer ACTIVE or any
worker exited with 75 (the program saved a checkpoint on SIGTERM and stopped); it then recreates the
slice if needed, ships the same commit again and reruns the same command, which resumes from the
latest checkpoint (give the program ``--resume``; it starts from scratch when there is none).
Preemptions and failures have separate retry budgets.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from launch import remote
from launch.gcloud import (
    ACTIVE,
    BROKEN,
    SETTLING,
    Gcloud,
    GcloudError,
    Target,
    hosts_per_slice,
    qr_create,
    qr_delete,
    qr_describe,
    vm_scp,
    vm_ssh,
)
from launch.procs import PREEMPTED_EXIT_CODE, Member, run_group

# What `setup` installs next to the project (its versions pinned by constraints.txt).
DEFAULT_PACKAGES = ("jax[tpu]",)
# TensorFlow's file system gives etils / TFDS their gs:// access (checkpoint metadata, metrics, data).
DEFAULT_EXTRAS = "tfds-cli"


class LaunchError(RuntimeError):
    pass


@dataclass
class RunOptions:
    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    run_id: str | None = None
    log_dir: Path = Path("logs/launch")
    max_preemptions: int = 10
    max_failures: int = 0
    autodelete: bool = False
    preempted_grace_s: float = 120.0


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True, cwd=cwd).stdout.strip()


def default_run_id(name: str) -> str:
    return f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


class Pod:
    """Operations on one queued resource. ``poll_s`` / ``wait_timeout_s``: how often and how long
    ``up`` asks for the state while waiting."""

    def __init__(
        self,
        target: Target,
        gcloud: Gcloud,
        *,
        poll_s: float = 30.0,
        wait_timeout_s: float = 6 * 3600.0,
        workers: int | None = None,
        out: TextIO | None = None,
        log: TextIO | None = None,
    ) -> None:
        self.t = target
        self.gc = gcloud
        self.poll_s = poll_s
        self.wait_timeout_s = wait_timeout_s
        self._workers = workers
        self.out = out or sys.stdout  # worker 0's output
        self.log = log or sys.stderr  # our status lines (stdout stays the commands' in --dry-run)

    def say(self, msg: str) -> None:
        print(f"[{self.t.name}] {msg}", file=self.log, flush=True)

    # -- provisioning -----------------------------------------------------------------------------------

    def status(self) -> str | None:
        if self.gc.dry_run:
            self.gc.show(qr_describe(self.t))
            return None
        state = self.gc.state(self.t)
        self.say(f"queued resource: {state or 'absent'}")
        if state == ACTIVE:
            for node in self.t.nodes:
                self.say(f"node {node}: {self.gc.workers(self.t, node)} workers")
        return state

    def up(self) -> None:
        """Create, reuse, or recreate the queued resource, and wait until it is ACTIVE."""
        if self.gc.dry_run:
            self.gc.show(qr_describe(self.t))
            self.gc.show(qr_create(self.t))
            return
        state = self.gc.state(self.t)
        if state in SETTLING:
            self.say(f"{state}: waiting for it to settle")
            state = self._wait(lambda s: s not in SETTLING)
        if state == ACTIVE:
            self.say("ACTIVE: reusing it")
            return
        if state in BROKEN:
            self.say(f"{state}: deleting and recreating it")
            self._delete()
            state = None
        if state is None:
            self.say(f"creating {self.t.accelerator} x {self.t.node_count} ({self.t.capacity})")
            self.gc.run(qr_create(self.t))
        state = self._wait(lambda s: s == ACTIVE or s in BROKEN or s is None)
        if state != ACTIVE:
            raise LaunchError(f"queued resource {self.t.name} ended {state or 'deleted'} while waiting")
        self.say("ACTIVE")

    def _wait(self, done) -> str | None:
        start, last = time.monotonic(), "?"
        while True:
            state = self.gc.state(self.t)
            elapsed = time.monotonic() - start
            if state != last:
                self.say(f"state {state or 'absent'} after {elapsed:.0f} s")
                last = state
            if done(state):
                return state
            if elapsed > self.wait_timeout_s:
                raise LaunchError(f"queued resource {self.t.name} still {state} after {elapsed:.0f} s")
            time.sleep(self.poll_s)

    def _delete(self) -> None:
        self.gc.run(qr_delete(self.t))
        if not self.gc.dry_run:
            self._wait(lambda s: s is None)

    def down(self) -> None:
        """Delete the queued resource and its nodes (nothing to do if it is absent)."""
        if not self.gc.dry_run and self.gc.state(self.t) is None:
            self.say("absent: nothing to delete")
            return
        self._delete()
        if not self.gc.dry_run:
            self.say("deleted")

    # -- workers ----------------------------------------------------------------------------------------

    def workers(self) -> list[tuple[str, int]]:
        """(node, worker) of every TPU VM, slice by slice (LAUNCH_WORKER numbers them in this order)."""
        out = []
        for node in self.t.nodes:
            if self._workers is not None:
                n = self._workers
            elif self.gc.dry_run:
                n = hosts_per_slice(self.t.accelerator)
            else:
                n = self.gc.workers(self.t, node)
            out.extend((node, w) for w in range(n))
        return out

    def stop_workers(self) -> None:
        """Kill what holds the TPU on every worker (the program, after a failure elsewhere)."""
        for node in self.t.nodes:
            try:
                self.gc.run(vm_ssh(self.t, node, "all", remote.free_script()), check=False, capture=True)
            except OSError as e:  # best effort: never hide the failure being reported
                self.say(f"could not stop the workers of {node}: {e}")

    # -- code -------------------------------------------------------------------------------------------

    def setup(
        self,
        commit: str | None = None,
        *,
        packages: Sequence[str] = DEFAULT_PACKAGES,
        extras: str = DEFAULT_EXTRAS,
        repo: Path | None = None,
    ) -> str:
        """Ship the tracked files at ``commit`` (default HEAD) to every worker and install them there.
        Returns the commit."""
        repo = Path(git("rev-parse", "--show-toplevel", cwd=repo))
        commit = commit or git("rev-parse", "HEAD", cwd=repo)
        if git("status", "--porcelain", "--untracked-files=no", cwd=repo):
            self.say(f"warning: uncommitted changes are not shipped; the workers get commit {commit[:12]}")
        archive = f"scalereasoner-{commit[:12]}.tar.gz"
        with tempfile.TemporaryDirectory(prefix="scalereasoner-launch-") as tmp:
            local = str(Path(tmp) / archive)
            self.gc.run(["git", "-C", str(repo), "archive", "--format=tar.gz", f"--output={local}", commit])
            for node in self.t.nodes:
                self.gc.run(vm_scp(self.t, node, local, archive))
            script = remote.setup_script(archive, commit, packages, extras=extras)
            if self.gc.dry_run:
                for node in self.t.nodes:
                    self.gc.show(vm_ssh(self.t, node, "all", script))
                return commit
            members = [Member(vm_ssh(self.t, node, "all", script), label=node) for node in self.t.nodes]
            result = run_group(members, out=self.out)
        if not result.ok:
            raise LaunchError(
                f"setup failed on {self.t.nodes[result.first_failure or 0]}: {result.returncodes}"
            )
        self.say(f"workers set up at commit {commit[:12]}")
        return commit

    # -- running ----------------------------------------------------------------------------------------

    def run(self, opts: RunOptions) -> int:
        """Run ``opts.command`` on every worker until it succeeds or a retry budget is spent; returns the
        exit status (0, or the failing worker's)."""
        commit = git("rev-parse", "HEAD")
        run_id = opts.run_id or default_run_id(self.t.name)
        run_dir = Path(opts.log_dir) / run_id
        preemptions = failures = 0
        record = {
            "run_id": run_id,
            "target": asdict(self.t),
            "command": list(opts.command),
            "git_commit": commit,
            "attempts": [],
        }
        try:
            attempt = 0
            while True:
                attempt += 1
                if not self.gc.dry_run:
                    state = self.gc.state(self.t)
                    if state is None:
                        raise LaunchError(f"no queued resource {self.t.name}: run `up` and `setup` first")
                    if state != ACTIVE:  # preempted before (or between) attempts
                        preemptions += 1
                        if preemptions > opts.max_preemptions:
                            raise LaunchError(f"queued resource {state}: preemption budget spent")
                        self.say(f"{state} before attempt {attempt}: recreating (preemption {preemptions})")
                        self.up()
                        self.setup(commit)
                workers = self.workers()
                members = []
                for i, (node, w) in enumerate(workers):
                    env = {
                        "RUN_ID": run_id,
                        "GIT_COMMIT": commit,
                        "SCALEREASONER_MULTIHOST": "1",
                        "LAUNCH_WORKER": str(i),
                        "LAUNCH_ATTEMPT": str(attempt),
                        **opts.env,
                    }
                    argv = vm_ssh(self.t, node, w, remote.run_script(opts.command, env))
                    log = run_dir / f"attempt-{attempt}" / f"worker-{i}.log"
                    members.append(Member(argv, label=f"worker {i}", log_path=log, stream=i == 0))
                if self.gc.dry_run:
                    for m in members:
                        self.gc.show(m.argv)
                    return 0
                self.say(f"attempt {attempt}: {shlex.join(opts.command)} on {len(members)} workers")
                self.say(f"logs: {run_dir / f'attempt-{attempt}'}")
                try:
                    result = run_group(members, preempted_grace_s=opts.preempted_grace_s, out=self.out)
                except KeyboardInterrupt:  # our ssh sessions are gone; the programs on the workers are not
                    self.say("interrupted: stopping the program on every worker")
                    self.stop_workers()
                    raise
                state = self.gc.state(self.t)
                outcome = {"attempt": attempt, "returncodes": result.returncodes, "state": state}
                record["attempts"].append(outcome)
                self._write_record(run_dir, record)
                if result.ok:
                    self.say(f"attempt {attempt} succeeded on all {len(members)} workers")
                    return 0
                where = result.first_failure if result.first_failure is not None else 0
                code = result.failure_code
                preempted = state != ACTIVE or PREEMPTED_EXIT_CODE in result.returncodes
                if state == ACTIVE:
                    self.stop_workers()
                if preempted:
                    preemptions += 1
                    self.say(
                        f"attempt {attempt} preempted (state {state or 'absent'}, worker {where} exited "
                        f"{code}); preemption {preemptions} of {opts.max_preemptions}"
                    )
                    if preemptions > opts.max_preemptions:
                        self.say("preemption budget spent")
                        return code or 1
                    if state != ACTIVE:
                        self.up()
                        self.setup(commit)
                    continue
                failures += 1
                self.say(
                    f"attempt {attempt} failed: worker {where} exited {code} (log: "
                    f"{run_dir / f'attempt-{attempt}' / f'worker-{where}.log'}); "
                    f"failure {failures} of {opts.max_failures} retries"
                )
                if failures > opts.max_failures:
                    return code or 1
        finally:
            if opts.autodelete:
                self.say("--autodelete: deleting the queued resource")
                try:
                    self.down()
                except (GcloudError, LaunchError) as e:
                    self.say(f"autodelete failed: {e}")

    @staticmethod
    def _write_record(run_dir: Path, record: dict) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")


def show_logs(log_dir: Path, run_id: str | None, worker: int | None, lines: int, out: TextIO) -> int:
    """Print the last ``lines`` lines of each worker's log of the latest attempt of a run (default: the
    newest run under ``log_dir``)."""
    log_dir = Path(log_dir)
    runs = sorted((p for p in log_dir.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if run_id is not None:
        runs = [log_dir / run_id] if (log_dir / run_id).is_dir() else []
    if not runs:
        print(f"no run logs under {log_dir}" + (f" for {run_id}" if run_id else ""), file=out)
        return 1
    attempts = sorted(runs[-1].glob("attempt-*"), key=lambda p: int(p.name.split("-")[1]))
    if not attempts:
        print(f"no attempts logged in {runs[-1]}", file=out)
        return 1
    files = sorted(attempts[-1].glob("worker-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    if worker is not None:
        files = [f for f in files if f.stem == f"worker-{worker}"]
    for f in files:
        print(f"==> {f} <==", file=out)
        text = f.read_text(errors="replace").splitlines()
        for line in text[-lines:] if lines > 0 else text:
            print(line, file=out)
    return 0 if files else 1
