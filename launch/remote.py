"""The shell text run on TPU VM workers (the ``--command`` of ``gcloud ... ssh``).

The remote login shell parses this text, so every value that comes from the user (the command and its
arguments, environment values, paths, the commit) goes through ``shlex.quote``: an argument holding
spaces, quotes, ``;`` or ``$(...)`` arrives as exactly one argument. The rest is fixed text.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

# Where `setup` puts things on every worker, relative to the remote home directory.
ROOT = "scalereasoner"  # ~/scalereasoner/{src,venv}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Processes that hold the TPU (a previous run that did not exit, a stray notebook) keep libtpu from
# starting: kill them and drop libtpu's lock file. v4/v5e expose /dev/accel*, v5p/v6e /dev/vfio/<n>.
FREE_TPU = (
    "pids=$(sudo -n lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u); "
    'if [ -n "$pids" ]; then echo "freeing the TPU: killing $pids"; sudo -n kill -9 $pids || true; fi; '
    "sudo -n rm -f /tmp/libtpu_lockfile 2>/dev/null || true"
)


def check_env(env: Mapping[str, str]) -> None:
    for key in env:
        if not _ENV_NAME.match(key):
            raise ValueError(f"environment variable name {key!r} is not a valid shell name")


def in_bash(script: str) -> str:
    """``script`` for ``bash -c``: the same meaning whatever the worker's login shell is."""
    return "bash -c " + shlex.quote(script)


def run_script(argv: Sequence[str], env: Mapping[str, str], *, free_tpu: bool = True) -> str:
    """Run ``argv`` from the shipped code with the project's environment and ``env`` exported.

    ``env`` values are quoted; ``argv`` is quoted word by word (``shlex.join``), so the worker runs
    exactly this argument vector. ``exec`` makes the program the ssh session's process: its exit status
    is the worker's.
    """
    if not argv:
        raise ValueError("no command to run")
    check_env(env)
    exports = "".join(f"export {k}={shlex.quote(str(v))}; " for k, v in env.items())
    steps = [
        f'cd "$HOME/{ROOT}/src" || {{ echo "no code in ~/{ROOT}/src: run setup first" >&2; exit 3; }}',
        f'export PATH="$HOME/{ROOT}/venv/bin:$PATH"',
    ]
    if free_tpu:
        steps.append(FREE_TPU)
    return in_bash("; ".join(steps) + "; " + exports + "exec " + shlex.join(argv))


def free_script() -> str:
    """Stop whatever holds the TPU on a worker (our program after a failure elsewhere, or a stale one)."""
    return in_bash(FREE_TPU)


def setup_script(
    archive: str, commit: str, packages: Sequence[str], *, extras: str = "", python: str = "3.12"
) -> str:
    """Unpack the shipped archive into ~/scalereasoner/src and install the project (with ``extras``) and
    ``packages`` (e.g. ``jax[tpu]``) into ~/scalereasoner/venv with uv, which also brings the Python the
    project needs (TPU VM images ship an older one). Pinned by the project's constraints.txt."""
    q = shlex.quote
    root, src, new, venv = (f'"$HOME/{ROOT}{sub}"' for sub in ("", "/src", "/src.new", "/venv"))
    project = src + (q(f"[{extras}]") if extras else "")
    return in_bash(
        "; ".join(
            [
                "set -euo pipefail",
                f"mkdir -p {root}",
                f"rm -rf {new}",
                f"mkdir {new}",
                f'tar -xzf "$HOME"/{q(archive)} -C {new}',
                f"rm -rf {src}",
                f"mv {new} {src}",
                f"echo {q(commit)} > {src}/GIT_COMMIT",
                'export PATH="$HOME/.local/bin:$PATH"',
                "command -v uv >/dev/null || python3 -m pip install --user --quiet uv",
                f"test -x {venv}/bin/python || uv venv --python {q(python)} {venv}",
                f"uv pip install --python {venv}/bin/python -c {src}/constraints.txt -e {project} "
                + " ".join(q(p) for p in packages),
                f'echo "worker ready at commit $(cat {src}/GIT_COMMIT)"',
            ]
        )
    )
