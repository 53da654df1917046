"""scalereasoner-launch without a cloud: dry-run command lines, remote quoting, and a fake `gcloud` on
PATH that records its arguments, answers `describe` with the states a test wants and runs each worker's
remote command in bash, as ssh would."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from launch import cli, remote
from launch.gcloud import hosts_per_slice

WHERE = ["--project=proj-1", "--zone=us-east5-a"]
BASE = ["--name", "sr-test", "--zone", "us-east5-a", "--project", "proj-1"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]


def _main(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(args)
    return code, out.getvalue(), err.getvalue()


def _lines(text: str) -> list[list[str]]:
    return [shlex.split(line) for line in text.splitlines() if line.strip()]


# -- dry run ---------------------------------------------------------------------------------------------


def test_dry_run_up_status_down():
    code, out, _ = _main(["up", *BASE, "--accelerator", "v5p-64", "--spot", "--dry-run"])
    assert code == 0
    assert _lines(out) == [
        [*QR, "describe", "sr-test", "--format=value(state.state)", *WHERE],
        [
            *QR,
            "create",
            "sr-test",
            "--node-id=sr-test",
            "--accelerator-type=v5p-64",
            "--runtime-version=v2-alpha-tpuv5",
            "--spot",
            *WHERE,
        ],
    ]
    _, out, _ = _main(["up", *BASE, "--reserved", "--node_count", "2", "--accelerator", "v4-32", "--dry-run"])
    assert _lines(out)[1] == [
        *QR,
        "create",
        "sr-test",
        "--node-count=2",
        "--node-prefix=sr-test",
        "--accelerator-type=v4-32",
        "--runtime-version=v2-alpha-tpuv5",
        "--reserved",
        *WHERE,
    ]
    _, out, _ = _main(["status", *BASE, "--dry-run"])
    assert _lines(out) == [[*QR, "describe", "sr-test", "--format=value(state.state)", *WHERE]]
    _, out, _ = _main(["down", *BASE, "--dry-run"])
    assert _lines(out) == [[*QR, "delete", "sr-test", "--force", "--quiet", *WHERE]]


def test_dry_run_setup_ships_the_commit_to_every_slice():
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    code, out, _ = _main(["setup", *BASE, "--node_count", "2", "--dry-run"])
    assert code == 0
    lines = _lines(out)
    assert len(lines) == 5
    archive = f"scalereasoner-{commit[:12]}.tar.gz"
    git_archive = lines[0]
    assert git_archive[:2] == ["git", "-C"] and git_archive[3:5] == ["archive", "--format=tar.gz"]
    assert git_archive[5].startswith("--output=") and git_archive[5].endswith(archive)
    assert git_archive[6] == commit
    local = git_archive[5].removeprefix("--output=")
    for i, node in enumerate(["sr-test-0", "sr-test-1"]):
        assert lines[1 + i] == [
            "gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{node}:{archive}",
            "--worker=all", "--strict-host-key-checking=no", *WHERE,
        ]  # fmt: skip
        ssh = lines[3 + i]
        assert ssh[:7] == [*SSH, node, "--worker=all"] and ssh[7].startswith("--command=bash -c ")
        assert ssh[8:] == ["--strict-host-key-checking=no", *WHERE]
        script = shlex.split(ssh[7].removeprefix("--command="))[2]
        assert f'tar -xzf "$HOME"/{archive}' in script and f"echo {commit} >" in script
        assert "'jax[tpu]'" in script and "constraints.txt" in script


def test_dry_run_run_one_ssh_per_worker():
    options = ["--accelerator", "v5p-64", "--run_id", "r1", "--env", "WANDB_MODE=offline", "--dry-run"]
    command = ["scalereasoner", "grpo", "--config", "grpo_scale_vqa_7b", "--resume"]
    code, out, _ = _main(["run", *BASE, *options, "--", *command])
    assert code == 0
    lines = _lines(out)
    assert hosts_per_slice("v5p-64") == 8 and len(lines) == 8
    for i, argv in enumerate(lines):
        assert argv[:7] == [*SSH, "sr-test", f"--worker={i}"]
        assert argv[8:] == ["--strict-host-key-checking=no", *WHERE]
        script = shlex.split(argv[7].removeprefix("--command="))
        assert script[:2] == ["bash", "-c"]
        body = script[2]
        for piece in (
            "export RUN_ID=r1;",
            "export SCALEREASONER_MULTIHOST=1;",
            f"export LAUNCH_WORKER={i};",
            "export WANDB_MODE=offline;",
            "exec scalereasoner grpo --config grpo_scale_vqa_7b --resume",
        ):
            assert piece in body  # fmt: skip
        assert body.index("lsof") < body.index("exec ")  # stale TPU holders are freed first


def test_hosts_per_slice():
    types = ("v5p-8", "v5p-64", "v4-32", "v5litepod-8", "v5litepod-16", "v6e-64")
    assert [hosts_per_slice(a) for a in types] == [1, 8, 4, 1, 4, 16]
    with pytest.raises(ValueError):
        hosts_per_slice("a100-8")


# -- the remote command ----------------------------------------------------------------------------------

NASTY = [
    "a b",
    "it's",
    'say "hi"',
    "x; rm -rf ~",
    "$(touch pwned)",
    "`id`",
    "",
    "tab\there",
    "new\nline",
    "ü*?",
]


def test_remote_command_arrives_argument_by_argument(tmp_path):
    """The --command text is what a login shell on the worker gets (`$SHELL -c TEXT`); run it in bash."""
    home = tmp_path / "home"
    (home / "scalereasoner" / "src").mkdir(parents=True)
    record = tmp_path / "argv.json"
    probe = "import json, os, sys; json.dump([sys.argv[1:], os.environ['V']], open(os.environ['OUT'], 'w'))"
    env = {"V": NASTY[3] + NASTY[4], "OUT": str(record)}
    text = remote.run_script([sys.executable, "-c", probe, *NASTY], env, free_tpu=False)
    proc = subprocess.run(
        ["bash", "-c", text], env={"HOME": str(home), "PATH": os.environ["PATH"]}, cwd=tmp_path, timeout=30
    )
    assert proc.returncode == 0
    argv, value = json.loads(record.read_text())
    assert argv == NASTY and value == env["V"]
    assert not (tmp_path / "pwned").exists() and not (home / "scalereasoner" / "src" / "pwned").exists()
    with pytest.raises(ValueError):
        remote.run_script(["true"], {"BAD NAME": "x"})


# -- a fake gcloud ---------------------------------------------------------------------------------------

FAKE_GCLOUD = """\
#!{python}
# A stand-in for gcloud: records its arguments, answers queued-resource `describe` from a script of
# states, lists workers, and runs ssh commands of one worker in bash with that worker's own HOME.
import json, os, subprocess, sys
d = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
path = os.path.join(d, "state.json")
state = json.load(open(path))

def save():
    tmp = path + ".tmp"
    json.dump(state, open(tmp, "w"))
    os.replace(tmp, path)

def opt(name):
    return next((a.split("=", 1)[1] for a in args if a.startswith(name + "=")), None)

if args[:3] == ["compute", "tpus", "queued-resources"]:
    verb = args[3]
    if verb == "describe":
        states = state["describe"]
        now = states.pop(0) if len(states) > 1 else states[0]
        save()
        if now == "ABSENT":
            sys.stderr.write("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found\\n")
            sys.exit(1)
        print(now)
    elif verb == "create":
        state["describe"] = list(state.get("after_create", ["PROVISIONING", "ACTIVE"]))
        save()
    elif verb == "delete":
        state["describe"] = list(state.get("after_delete", ["DELETING", "ABSENT"]))
        save()
    sys.exit(0)
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    endpoints = [{{"ipAddress": f"10.0.0.{{i}}"}} for i in range(state["workers"])]
    print(json.dumps({{"networkEndpoints": endpoints}}))
    sys.exit(0)
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    node, worker = args[4], opt("--worker")
    if worker == "all":  # setup, or stopping the workers: recorded only
        sys.exit(0)
    home = os.path.join(d, "home", f"{{node}}-{{worker}}")
    os.makedirs(os.path.join(home, "scalereasoner", "src"), exist_ok=True)
    env = dict(os.environ, HOME=home, PATH=os.path.join(d, "bin") + os.pathsep + os.environ["PATH"])
    sys.exit(subprocess.run(["bash", "-c", opt("--command")], env=env).returncode)
sys.exit(0)  # scp and anything else: recorded only
"""

# A stand-in for sudo on the fake workers: records what the launcher asked (e.g. lsof on the TPU devices).
FAKE_SUDO = """\
#!/bin/sh
printf "%s\n" "$*" >> "$FAKE_GCLOUD_DIR/sudo.log"
"""

# The program the fake workers run: records its arguments and environment, then acts out a scenario
# {"<attempt>": {"<worker>": {"exit": N, "sleep": S, "state": [...]}}} (default: exit 0).
WORKER = """\
import json, os, sys, time
d = os.environ["FAKE_GCLOUD_DIR"]
w, attempt = os.environ["LAUNCH_WORKER"], os.environ["LAUNCH_ATTEMPT"]
keep = {k: os.environ.get(k) for k in ("RUN_ID", "GIT_COMMIT", "SCALEREASONER_MULTIHOST", "USER_VAR")}
with open(os.path.join(d, f"worker-{w}-attempt-{attempt}.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": keep, "cwd": os.getcwd()}, f)
print(f"hello from worker {w}, attempt {attempt}", flush=True)
act = json.load(open(os.path.join(d, "scenario.json"))).get(attempt, {}).get(w, {})
if "state" in act:  # the queued resource changes state (e.g. a preemption) while this runs
    path = os.path.join(d, "state.json")
    state = json.load(open(path))
    state["describe"] = act["state"]
    json.dump(state, open(path + ".tmp", "w"))
    os.replace(path + ".tmp", path)
time.sleep(act.get("sleep", 0))
with open(os.path.join(d, f"worker-{w}-attempt-{attempt}.done"), "w"):
    pass
sys.exit(act.get("exit", 0))
"""


class FakeCloud:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.dir = root
        (root / "bin").mkdir(parents=True)
        gcloud = root / "bin" / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
        sudo = root / "bin" / "sudo"
        sudo.write_text(FAKE_SUDO)
        for exe in (gcloud, sudo):
            exe.chmod(0o755)
        (root / "worker.py").write_text(WORKER)
        self.set_state(["ABSENT"])
        self.scenario({})
        monkeypatch.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_GCLOUD_DIR", str(root))

    def set_state(self, describe: list[str], workers: int = 3, **extra) -> None:
        (self.dir / "state.json").write_text(json.dumps({"describe": describe, "workers": workers, **extra}))

    def scenario(self, plan: dict) -> None:
        (self.dir / "scenario.json").write_text(json.dumps(plan))

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def verbs(self) -> list[str]:
        """A compact trace: 'describe', 'create', 'delete', 'scp', 'ssh:<worker>', 'vm-describe'."""
        out = []
        for c in self.calls():
            if c[:3] == ["compute", "tpus", "queued-resources"]:
                out.append(c[3])
            elif c[3] == "ssh":
                out.append("ssh:" + next(a.split("=", 1)[1] for a in c if a.startswith("--worker=")))
            else:
                out.append({"describe": "vm-describe"}.get(c[3], c[3]))
        return out

    def worker(self, w: int, attempt: int = 1) -> dict | None:
        path = self.dir / f"worker-{w}-attempt-{attempt}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def done(self, w: int, attempt: int = 1) -> bool:
        return (self.dir / f"worker-{w}-attempt-{attempt}.done").exists()


@pytest.fixture
def cloud(tmp_path, monkeypatch) -> FakeCloud:
    return FakeCloud(tmp_path / "cloud", monkeypatch)


FAST = ["--poll_s", "0.01"]


def _run(
    cloud: FakeCloud, tmp_path: Path, *extra: str, args: list[str] | None = None
) -> tuple[int, str, str]:
    program = [sys.executable, str(cloud.dir / "worker.py"), *(args or [])]
    return _main(
        ["run", *BASE, *FAST, "--run_id", "r1", "--log_dir", str(tmp_path / "logs"), *extra, "--", *program]
    )


def _squash(verbs: list[str]) -> list[str]:
    """Repeated describes (polling) count once."""
    out: list[str] = []
    for v in verbs:
        if not (v == "describe" and out and out[-1] == "describe"):
            out.append(v)
    return out


def test_up_creates_waits_reuses_and_recreates(cloud):
    cloud.set_state(["ABSENT"], after_create=["ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    code, _, err = _main(["up", *BASE, *FAST, "--spot"])
    assert code == 0, err
    assert _squash(cloud.verbs()) == ["describe", "create", "describe"]
    create = cloud.calls()[1]
    assert create[4:] == ["sr-test", "--node-id=sr-test", "--accelerator-type=v5p-64",
                          "--runtime-version=v2-alpha-tpuv5", "--spot", *WHERE]  # fmt: skip
    for state in ("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"):
        assert f"state {state}" in err  # status lines while waiting

    (cloud.dir / "calls.jsonl").unlink()
    code, _, err = _main(["up", *BASE, *FAST])
    assert code == 0 and cloud.verbs() == ["describe"] and "reusing" in err

    for broken in ("FAILED", "SUSPENDED"):
        (cloud.dir / "calls.jsonl").unlink()
        cloud.set_state([broken])
        code, _, err = _main(["up", *BASE, *FAST])
        assert code == 0, err
        assert _squash(cloud.verbs()) == ["describe", "delete", "describe", "create", "describe"]

    (cloud.dir / "calls.jsonl").unlink()
    cloud.set_state(["ABSENT"], after_create=["PROVISIONING", "FAILED"])
    code, _, err = _main(["up", *BASE, *FAST])
    assert code == 1 and "ended FAILED" in err


def test_status_and_down(cloud):
    cloud.set_state(["ACTIVE"], workers=4)
    code, _, err = _main(["status", *BASE])
    assert code == 0 and "ACTIVE" in err and "4 workers" in err
    code, _, err = _main(["down", *BASE, *FAST])
    assert code == 0
    assert _squash(cloud.verbs())[-3:] == ["describe", "delete", "describe"]
    deletes = [c for c in cloud.calls() if c[3] == "delete"]
    assert deletes == [
        ["compute", "tpus", "queued-resources", "delete", "sr-test", "--force", "--quiet", *WHERE]
    ]
    (cloud.dir / "calls.jsonl").unlink()
    code, _, err = _main(["down", *BASE, *FAST])
    assert code == 0 and cloud.verbs() == ["describe"] and "nothing to delete" in err


def test_run_on_all_workers_with_logs_env_and_quoting(cloud, tmp_path):
    cloud.set_state(["ACTIVE"], workers=3)
    code, out, err = _run(cloud, tmp_path, "--env", "USER_VAR=a b;c", args=NASTY)
    assert code == 0, err
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    for w in range(3):
        rec = cloud.worker(w)
        assert rec["argv"] == NASTY
        assert rec["env"] == {
            "RUN_ID": "r1",
            "GIT_COMMIT": commit,
            "SCALEREASONER_MULTIHOST": "1",
            "USER_VAR": "a b;c",
        }
        assert rec["cwd"].endswith(f"sr-test-{w}/scalereasoner/src")
        log = tmp_path / "logs" / "r1" / "attempt-1" / f"worker-{w}.log"
        assert f"hello from worker {w}, attempt 1" in log.read_text()
    # Worker 0 streams to our stdout; the others only to their files.
    assert "hello from worker 0" in out and "worker 1" not in out and "worker 2" not in out
    # Stale TPU holders were looked for on every worker before the program started.
    sudo = (cloud.dir / "sudo.log").read_text().splitlines()
    assert sum(line.startswith("-n lsof -t") for line in sudo) == 3
    record = json.loads((tmp_path / "logs" / "r1" / "run.json").read_text())
    assert record["attempts"] == [{"attempt": 1, "returncodes": [0, 0, 0], "state": "ACTIVE"}]

    code, out, _ = _main(["logs", "--log_dir", str(tmp_path / "logs"), "--worker", "2"])
    assert code == 0 and "hello from worker 2, attempt 1" in out and "worker 0" not in out


def test_run_fails_fast(cloud, tmp_path):
    cloud.set_state(["ACTIVE"], workers=3)
    cloud.scenario({"1": {"0": {"sleep": 60}, "1": {"exit": 3}, "2": {"sleep": 60}}})
    start = time.monotonic()
    code, _, err = _run(cloud, tmp_path)
    elapsed = time.monotonic() - start
    assert code == 3, err
    assert elapsed < 30, f"took {elapsed:.0f} s: the other workers were not stopped"
    assert not cloud.done(0) and not cloud.done(2) and cloud.done(1)
    assert "worker 1 exited 3" in err and "worker-1.log" in err
    assert "ssh:all" in cloud.verbs()  # the remote programs were stopped too
    assert "attempt 2" not in err  # --max_failures 0: no rerun


def test_failure_retry_budget(cloud, tmp_path):
    cloud.set_state(["ACTIVE"], workers=2)
    cloud.scenario({"1": {"1": {"exit": 4}}})
    code, _, err = _run(cloud, tmp_path, "--max_failures", "1")
    assert code == 0, err
    assert cloud.worker(0, 2) is not None and "failure 1 of 1" in err


def test_preemption_recreates_and_resumes(cloud, tmp_path):
    """The slice is preempted mid-run (state SUSPENDED; the program dies): the launcher deletes and
    recreates it, ships the code again and reruns the same command, which resumes."""
    cloud.set_state(["ACTIVE"], workers=2, after_create=["PROVISIONING", "ACTIVE"])
    cloud.scenario({"1": {"0": {"state": ["SUSPENDED"], "exit": 143}, "1": {"sleep": 60}}})
    code, _, err = _run(cloud, tmp_path, "--autodelete", args=["--resume"])
    assert code == 0, err
    verbs = _squash(cloud.verbs())
    first, second = verbs.index("ssh:0"), len(verbs) - 1 - verbs[::-1].index("ssh:0")
    between = verbs[first:second]
    lifecycle = [v for v in between if v in ("delete", "create", "scp", "ssh:all")]
    assert lifecycle[-4:] == ["delete", "create", "scp", "ssh:all"]  # recreated, then set up again
    assert cloud.worker(0, 2)["argv"] == ["--resume"] and cloud.worker(1, 2)["argv"] == ["--resume"]
    assert "preemption 1 of 10" in err
    assert verbs[-2:] == ["delete", "describe"]  # --autodelete


def test_program_preemption_exit_reruns_without_recreating(cloud, tmp_path):
    """Exit 75 (the program saved on SIGTERM) with the slice still ACTIVE: rerun in place."""
    cloud.set_state(["ACTIVE"], workers=2)
    cloud.scenario({"1": {"0": {"exit": 75}, "1": {"exit": 75}}})
    code, _, err = _run(cloud, tmp_path, "--preempted_grace_s", "5")
    assert code == 0, err
    assert "create" not in cloud.verbs() and cloud.worker(1, 2) is not None


def test_preemption_and_failure_budgets_are_separate(cloud, tmp_path):
    cloud.set_state(["ACTIVE"], workers=2)
    # One preemption is within --max_preemptions 1 even with --max_failures 0; the failure after it is not.
    cloud.scenario({"1": {"0": {"exit": 75}, "1": {"exit": 75}}, "2": {"1": {"exit": 5}}})
    code, _, err = _run(cloud, tmp_path, "--max_preemptions", "1", "--preempted_grace_s", "5")
    assert code == 5 and cloud.worker(0, 3) is None, err
    # Two preemptions exceed --max_preemptions 1, however generous the failure budget.
    cloud.scenario({"1": {"0": {"exit": 75}}, "2": {"0": {"exit": 75}}})
    code, _, err = _run(
        cloud, tmp_path, "--max_preemptions", "1", "--max_failures", "5", "--preempted_grace_s", "5"
    )
    assert code == 75 and "preemption budget spent" in err and cloud.worker(0, 3) is None


def test_run_needs_a_queued_resource(cloud, tmp_path):
    cloud.set_state(["ABSENT"])
    code, _, err = _run(cloud, tmp_path)
    assert code == 1 and "run `up` and `setup` first" in err


def test_fake_cloud_scripts_are_valid():
    compile(FAKE_GCLOUD.format(python=sys.executable), "gcloud", "exec")
    compile(textwrap.dedent(WORKER), "worker", "exec")
