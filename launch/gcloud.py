"""``gcloud`` command lines for TPU queued resources and TPU VMs, as argument lists, and their runner.

Every command is an argument list handed to ``subprocess`` without a shell, so no value (a name, a
zone, a user's command) is ever parsed by a local shell. The one string that a shell does parse is the
remote command of ``ssh --command``; it is built in ``launch/remote.py`` with ``shlex.quote``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TextIO

Capacity = Literal["on-demand", "spot", "reserved"]

# Queued-resource states (google.cloud.tpu.v2alpha1 QueuedResourceState).
ACTIVE = "ACTIVE"
IN_PROGRESS = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")
BROKEN = ("FAILED", "SUSPENDED")  # delete and recreate
SETTLING = ("SUSPENDING", "DELETING")  # wait until it is FAILED / SUSPENDED / gone

_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # GCE resource names


@dataclass(frozen=True)
class Target:
    """One queued resource: ``name`` is the queued resource and, for one slice, its TPU node; with
    ``node_count`` > 1 (multislice) the nodes are ``name-0`` .. ``name-{n-1}``."""

    name: str
    zone: str | None = None
    project: str | None = None
    accelerator: str = "v5p-64"
    runtime: str = "v2-alpha-tpuv5"
    capacity: Capacity = "on-demand"
    node_count: int = 1

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or len(self.name) > 63:
            raise ValueError(
                f"--name {self.name!r}: lower-case letters, digits and '-', starting with a letter"
            )
        if self.node_count < 1:
            raise ValueError(f"--node_count must be >= 1, got {self.node_count}")

    @property
    def nodes(self) -> list[str]:
        if self.node_count == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.node_count)]

    def where(self) -> list[str]:
        """``--project`` / ``--zone`` when given (else gcloud's configured defaults)."""
        out = []
        if self.project:
            out.append(f"--project={self.project}")
        if self.zone:
            out.append(f"--zone={self.zone}")
        return out


def hosts_per_slice(accelerator: str) -> int:
    """Hosts (TPU VM workers) of one slice, from the accelerator type. Used only where gcloud cannot be
    asked (``--dry-run``); a real run counts the node's network endpoints.

    v2/v3/v4/v5p names count TensorCores (8 per host: 4 chips x 2 cores); v5e (``v5litepod``) and v6e
    names count chips, 8 on a single-host slice and 4 per host beyond that.
    """
    m = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", accelerator)
    if not m:
        raise ValueError(
            f"unknown accelerator type {accelerator!r} (e.g. v5p-64, v4-32, v5litepod-16, v6e-16)"
        )
    family, n = m.group(1), int(m.group(2))
    if family in ("v5litepod", "v5e", "v6e"):
        return 1 if n <= 8 else n // 4
    return max(n // 8, 1)


# -- queued resources -----------------------------------------------------------------------------------

QR = ["gcloud", "compute", "tpus", "queued-resources"]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]


def qr_create(t: Target) -> list[str]:
    nodes = (
        [f"--node-id={t.name}"]
        if t.node_count == 1
        else [f"--node-count={t.node_count}", f"--node-prefix={t.name}"]
    )
    capacity = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[t.capacity]
    return [
        *QR,
        "create",
        t.name,
        *nodes,
        f"--accelerator-type={t.accelerator}",
        f"--runtime-version={t.runtime}",
        *capacity,
        *t.where(),
    ]


def qr_describe(t: Target) -> list[str]:
    return [*QR, "describe", t.name, "--format=value(state.state)", *t.where()]


def qr_delete(t: Target) -> list[str]:
    # --force also deletes the TPU nodes; --quiet answers gcloud's confirmation prompt.
    return [*QR, "delete", t.name, "--force", "--quiet", *t.where()]


# -- TPU VMs --------------------------------------------------------------------------------------------


def vm_describe(t: Target, node: str) -> list[str]:
    return [*TPU_VM, "describe", node, "--format=json", *t.where()]


def vm_ssh(t: Target, node: str, worker: int | str, command: str) -> list[str]:
    # A fresh node has new host keys: never stop at ssh's interactive question.
    return [
        *TPU_VM,
        "ssh",
        node,
        f"--worker={worker}",
        f"--command={command}",
        "--strict-host-key-checking=no",
        *t.where(),
    ]


def vm_scp(t: Target, node: str, local: str, remote: str) -> list[str]:
    return [
        *TPU_VM,
        "scp",
        local,
        f"{node}:{remote}",
        "--worker=all",
        "--strict-host-key-checking=no",
        *t.where(),
    ]


# -- running them ---------------------------------------------------------------------------------------


class GcloudError(RuntimeError):
    pass


class Gcloud:
    """Runs argument lists (``gcloud`` and the few local tools around it), or with ``dry_run`` prints
    each one as a shell-quoted line and runs nothing."""

    def __init__(self, *, dry_run: bool = False, out: TextIO | None = None) -> None:
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def show(self, argv: Sequence[str]) -> None:
        print(shlex.join(argv), file=self.out, flush=True)

    def run(
        self, argv: Sequence[str], *, check: bool = True, capture: bool = False
    ) -> subprocess.CompletedProcess:
        """Run ``argv``; with ``capture`` its output is returned instead of shown. In dry-run, print it
        and return an empty success."""
        if self.dry_run:
            self.show(argv)
            return subprocess.CompletedProcess(list(argv), 0, "", "")
        proc = subprocess.run(list(argv), capture_output=capture, text=True, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            detail = (proc.stderr or "").strip().splitlines()[-3:] if capture else []
            raise GcloudError(f"{shlex.join(argv[:6])} ... exited with {proc.returncode}: {' '.join(detail)}")
        return proc

    def state(self, t: Target) -> str | None:
        """The queued resource's state, or None if it does not exist."""
        proc = subprocess.run(qr_describe(t), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            if "NOT_FOUND" in proc.stderr or "not found" in proc.stderr.lower():
                return None
            raise GcloudError(f"describing queued resource {t.name} failed: {proc.stderr.strip()[-500:]}")
        return proc.stdout.strip() or None

    def workers(self, t: Target, node: str) -> int:
        """The number of TPU VM workers of ``node`` (one network endpoint each)."""
        proc = self.run(vm_describe(t, node), capture=True)
        endpoints = json.loads(proc.stdout or "{}").get("networkEndpoints") or []
        if not endpoints:
            raise GcloudError(f"TPU node {node} lists no workers (networkEndpoints)")
        return len(endpoints)
