"""Several JAX processes: the local runner, data sharded by process and gathered into the one global batch,
and GRPO on 2 processes x 4 CPU devices against 1 process x 8 devices."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from scalereasoner_jax.data.pipeline import PipelineConfig, make_dataset, merge_batches
from scalereasoner_jax.models.qwen2_5_vl.processing import PromptEncoder
from tests.test_pipeline import _source

REPO = Path(__file__).resolve().parents[1]


def _local_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "local", *args]


def _launch_local(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        _local_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env()
    )


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", **extra)


def test_local_runner_environment_prefixes_and_fail_fast(tmp_path):
    probe = textwrap.dedent(
        """
        import os, sys, time
        keys = ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"]
        keys += ["JAX_PLATFORMS", "XLA_FLAGS"]
        print(*[os.environ[k] for k in keys], sys.argv[1:], sep="|", flush=True)
        if sys.argv[1] == "fail":
            if os.environ["JAX_PROCESS_ID"] == "1":
                sys.exit(7)
            time.sleep(60)
        """
    )
    proc = _launch_local(
        "--num_processes", "3", "--devices_per_process", "2", "--log_dir", str(tmp_path), "--run_id", "t",
        "--", sys.executable, "-c", probe, "ok", "a b",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if "|" in line)
    assert len(lines) == 3
    ports = set()
    for i, line in enumerate(lines):
        prefix, rest = line.split(" ", 1)
        assert prefix == f"[{i}]"
        address, count, index, platforms, flags, argv = rest.split("|")
        ports.add(address)
        assert (count, index, platforms) == ("3", str(i), "cpu") and address.startswith("127.0.0.1:")
        assert flags.split()[-1] == "--xla_force_host_platform_device_count=2"
        assert argv == "['ok', 'a b']"
        assert (tmp_path / "t" / f"process-{i}.log").read_text().startswith(rest.split("|")[0])
    assert len(ports) == 1  # one coordinator

    start = time.monotonic()
    proc = _launch_local(
        "--num_processes", "3", "--devices_per_process", "1", "--", sys.executable, "-c", probe, "fail"
    )
    assert proc.returncode == 7
    assert time.monotonic() - start < 30, "the other processes were not stopped"
    assert "process 1 exited 7" in proc.stdout


@pytest.fixture(scope="module")
def encoder(tiny_hf_dir):
    return PromptEncoder.from_pretrained(tiny_hf_dir)


def test_process_shards_gather_into_the_single_process_batch(encoder):
    """Process p of n reads blocks of its batch size; gathered in process order (left-padded to the
    longest), they are exactly the batches one process with n times the batch size makes."""
    buckets = (276, 282, 288, 320)  # the prompts here measure 275-286 tokens
    cfg = dict(length_buckets=buckets, seed=3, num_epochs=2, shuffle_options=True)
    source = _source(13)
    single = list(
        make_dataset(source, encoder, PipelineConfig(batch_size=4, **cfg), process_index=0, process_count=1)
    )
    shards = [
        list(
            make_dataset(
                source,
                encoder,
                PipelineConfig(batch_size=2, **cfg),
                process_index=p,
                process_count=2,
                gather=False,
            )
        )
        for p in range(2)
    ]
    assert len(single) == len(shards[0]) == len(shards[1]) == 6  # 26 examples: the last 2 dropped everywhere
    padded = 0
    for want, a, b in zip(single, *shards, strict=True):
        padded += a["input_ids"].shape[1] != b["input_ids"].shape[1]
        got = merge_batches([a, b], encoder.tokenizer.pad_token_id)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert padded  # some steps had shards of different lengths, re-padded to the common bucket


# -- GRPO: 2 processes x 4 devices == 1 process x 8 devices ----------------------------------------------

# The tiny preset, made small; the same overrides for both runs. Stop strings that random text hits
# give completions of different lengths, so the overlong penalty makes non-zero advantages and every
# step does a real update (with the preset's random model every reward is 0).
OVERRIDES = [
    "data.synthetic.n=24",
    "data.length_buckets=[768]",
    "model.tiny={text_config: {num_hidden_layers: 1}, vision_config: {depth: 2, fullatt_block_indexes: [1]}}",
    "rollout.prompts_per_step=4",
    "rollout.group_size=2",
    "rollout.max_new_tokens=8",
    "rollout.stop_strings=[a,e,i,o,u,n,t,s,r]",
    "grpo.overlong_buffer=8",
    "train.steps=3",
    "train.eval_every=0",
    "train.tensorboard=false",
    "checkpoint.every=0",
]
TIMING = ("time_", "tokens_per_s")  # wall clock
# Computed on the devices with cross-device sums: 1x8 sums inside one process, 2x4 through gloo, in
# another order, so these agree to float32 rounding only (measured: at most 1.6e-6 relative and 1e-6
# absolute). Everything else (rewards, lengths, advantages: host-side from the sampled tokens) must be
# exactly equal: that shows both runs sampled the same tokens for the same prompts.
REDUCED = ("loss", "pg_loss", "kl", "entropy", "grad_norm", "clip_fraction", "sampler_logprob_diff")


def _grpo(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "scalereasoner_jax.cli", "grpo", "--config", "grpo_tiny_cpu",
            "--workdir", str(workdir), *OVERRIDES]  # fmt: skip


def _metrics(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def test_grpo_on_two_processes_matches_one(tmp_path):
    one, two = tmp_path / "1x8", tmp_path / "2x4"
    # Both at once: each leaves a core idle part of the time (compiling, waiting in collectives).
    log = tmp_path / "1x8.log"
    with log.open("w") as sink:  # a file, not a pipe: nobody reads it while the other run goes on
        single = subprocess.Popen(
            _grpo(one),
            env=_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8"),
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        try:
            proc = _launch_local(
                "--num_processes", "2", "--devices_per_process", "4", "--", *_grpo(two), timeout=600
            )
            single.wait(timeout=600)
        finally:
            if single.poll() is None:
                single.kill()
    assert single.returncode == 0, log.read_text()[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[0] " in proc.stdout and "[1] " in proc.stdout

    want, got = _metrics(one), _metrics(two)
    assert [r["step"] for r in want] == [r["step"] for r in got] == [1, 2, 3]
    assert all(r["advantage_abs_mean"] > 0 and r["grad_norm"] > 0 for r in want)  # real updates
    for w, g in zip(want, got, strict=True):
        assert set(w) == set(g)
        for key in w:
            if key in REDUCED:
                assert math.isclose(w[key], g[key], rel_tol=1e-5, abs_tol=1e-6), (
                    w["step"],
                    key,
                    w[key],
                    g[key],
                )
            else:
                assert w[key] == g[key], (w["step"], key, w[key], g[key])

    # The checkpoint was written collectively: one array store, each process's data-iterator position.
    step = two / "checkpoints" / "3"
    assert (step / "commit_success.txt").exists()
    assert sorted(p.name for p in (step / "data").glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    assert sorted(p.name for p in (step / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
