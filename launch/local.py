"""N JAX processes on this machine, as on N hosts: a coordinator on 127.0.0.1, K CPU devices each.

Every process gets ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, which
``scalereasoner_jax.parallel.initialize()`` turns into ``jax.distributed.initialize(...)`` (cross-process
collectives on CPU go through gloo), plus ``JAX_PLATFORMS=cpu`` and an ``XLA_FLAGS`` that gives it K
host devices. Output is prefixed with the process index; one process failing stops the others (they
would otherwise wait in a collective until the coordinator's heartbeat timeout).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from launch.procs import Member, run_group

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: Mapping[str, str], *, index: int, count: int, devices: int, port: int, run_id: str
) -> dict[str, str]:
    """The environment of local process ``index`` of ``count``."""
    flags = _DEVICE_FLAG.sub("", base.get("XLA_FLAGS", "")).strip()
    return {
        **base,
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(count),
        "JAX_PROCESS_ID": str(index),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        "RUN_ID": run_id,
        "LAUNCH_WORKER": str(index),
    }


def run_local(
    command: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int,
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    run_id: str | None = None,
    port: int | None = None,
    out: TextIO | None = None,
) -> int:
    """Run ``command`` as ``num_processes`` JAX processes; returns 0, or the first failing process's
    exit status (the others are stopped). With ``log_dir``, each process's output also goes to
    ``log_dir/<run_id>/process-<i>.log``."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("--num_processes and --devices_per_process must be >= 1")
    if not command:
        raise ValueError("no command to run (give it after --)")
    run_id = run_id or f"local-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    port = port or free_port()
    base = {**os.environ, **(env or {})}
    members = [
        Member(
            list(command),
            label=f"{i}",
            log_path=Path(log_dir) / run_id / f"process-{i}.log" if log_dir else None,
            env=process_env(
                base, index=i, count=num_processes, devices=devices_per_process, port=port, run_id=run_id
            ),
        )
        for i in range(num_processes)
    ]
    result = run_group(members, out=out or sys.stdout)
    if not result.ok:
        where = result.first_failure if result.first_failure is not None else 0
        print(
            f"[local] process {where} exited {result.failure_code}; "
            f"stopped {len(result.stopped)} other(s); exit codes {result.returncodes}",
            file=out or sys.stdout,
            flush=True,
        )
        code = result.failure_code
        return code if 0 < code < 256 else 1
    return 0
