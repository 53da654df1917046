"""Run one command per worker at once: per-worker log files, streamed output, fail fast.

Used both for the TPU pod (one ``gcloud ... ssh --worker=i`` per worker) and for the local runner (one
Python process per JAX process). Each child runs in its own session (process group) so that stopping
it also stops what it started (ssh, the program's own workers); only these groups are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

# Exit status of a program that saved a checkpoint on SIGTERM and stopped (train/checkpoint.py). The
# other workers reach the same step collectively, so they get time to finish their part of the save.
PREEMPTED_EXIT_CODE = 75


@dataclass
class Member:
    """One command of a group: its argument list, label (output prefix), log file and environment."""

    argv: Sequence[str]
    label: str
    log_path: Path | None = None
    env: Mapping[str, str] | None = None
    stream: bool = True  # copy its output to our stdout (prefixed with the label)


@dataclass
class GroupResult:
    returncodes: list[int]
    # Index of the member whose failure stopped the group (None: all succeeded, or stopped from outside).
    first_failure: int | None = None
    stopped: list[int] = field(default_factory=list)  # members we terminated

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    @property
    def failure_code(self) -> int:
        """The exit status that explains the failure: the first failing member's own status."""
        if self.first_failure is not None:
            return self.returncodes[self.first_failure]
        return next((rc for rc in self.returncodes if rc != 0), 0)


def _pump(proc: subprocess.Popen, member: Member, out: TextIO, lock: threading.Lock) -> None:
    """Copy a child's output line by line to its log file and (if streamed) to ``out``, prefixed."""
    log = open(member.log_path, "w", encoding="utf-8", errors="replace") if member.log_path else None  # noqa: SIM115
    try:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            if log is not None:
                log.write(line)
                log.flush()
            if member.stream:
                with lock:
                    out.write(f"[{member.label}] {line}" if member.label else line)
                    if not line.endswith("\n"):
                        out.write("\n")
                    out.flush()
    finally:
        if log is not None:
            log.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # the child's own session: pgid == pid


def stop(procs: Sequence[subprocess.Popen], which: Sequence[int], *, kill_after_s: float = 10.0) -> None:
    """SIGTERM the process groups of ``which`` (those still running), SIGKILL after ``kill_after_s``."""
    running = [i for i in which if procs[i].poll() is None]
    for i in running:
        _signal_group(procs[i], signal.SIGTERM)
    deadline = time.monotonic() + kill_after_s
    for i in running:
        try:
            procs[i].wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            _signal_group(procs[i], signal.SIGKILL)
            procs[i].wait()


def run_group(
    members: Sequence[Member],
    *,
    fail_fast: bool = True,
    preempted_grace_s: float = 120.0,
    poll_s: float = 0.1,
    out: TextIO | None = None,
    on_failure: Callable[[int, int], None] | None = None,
) -> GroupResult:
    """Start every member at once and wait for all of them.

    Fail fast: as soon as one exits non-zero the others are stopped (SIGTERM, then SIGKILL), except after
    :data:`PREEMPTED_EXIT_CODE`, where the others first get ``preempted_grace_s`` to exit by themselves
    (they are finishing the same collective checkpoint). ``on_failure(index, code)`` is called once, at
    the first failure, before the others are stopped. Ctrl-C stops every member and re-raises.
    """
    out = out or sys.stdout
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    try:
        for m in members:
            if m.log_path is not None:
                Path(m.log_path).parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen(
                list(m.argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(m.env) if m.env is not None else None,
                start_new_session=True,
            )
            procs.append(proc)
            t = threading.Thread(target=_pump, args=(proc, m, out, lock), daemon=True)
            t.start()
            pumps.append(t)

        first_failure: int | None = None
        grace_deadline: float | None = None
        stopped: list[int] = []
        while True:
            codes = [p.poll() for p in procs]
            if first_failure is None:
                failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    first_failure = failed[0]
                    code = codes[first_failure]
                    assert code is not None
                    if on_failure is not None:
                        on_failure(first_failure, code)
                    if fail_fast:
                        grace = preempted_grace_s if code == PREEMPTED_EXIT_CODE else 0.0
                        grace_deadline = time.monotonic() + grace
            if all(c is not None for c in codes):
                break
            if grace_deadline is not None and time.monotonic() >= grace_deadline:
                stopped = [i for i, c in enumerate(codes) if c is None]
                stop(procs, stopped)
                break
            time.sleep(poll_s)
    except BaseException:
        stop(procs, range(len(procs)))
        raise
    finally:
        for t in pumps:
            t.join(timeout=5.0)
    return GroupResult([p.wait() for p in procs], first_failure, stopped)
