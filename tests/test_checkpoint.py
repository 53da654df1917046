"""Checkpoints: exact resume after SIGKILL, corrupt or partial latest step, keep-last-K, SIGTERM, sharding."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scalereasoner_jax.train.checkpoint import (
    PREEMPTED_EXIT_CODE,
    Checkpointer,
    CheckpointMismatchError,
    PreemptionGuard,
    checkpoint_path,
)

LOGGER = "scalereasoner_jax.train.checkpoint"

# Orbax leaves the other read coroutines of a failed restore unfinished; they are reported when collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# A small, self-contained training program: nnx MLP, AdamW, dropout keyed by the checkpointed RNG,
# a seeded Grain pipeline whose iterator state is checkpointed. One JSON line of metrics per step.
TRAIN_SCRIPT = textwrap.dedent(
    '''
    """Tiny deterministic training run with checkpoints (written by tests/test_checkpoint.py)."""
    import argparse
    import json
    import os
    import signal
    import sys
    import time

    import grain
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from scalereasoner_jax.train.checkpoint import PREEMPTED_EXIT_CODE, Checkpointer, PreemptionGuard

    OPT = optax.adamw(3e-3, weight_decay=0.01)


    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(8, 32, rngs=rngs)
            self.l2 = nnx.Linear(32, 1, rngs=rngs)

        def __call__(self, x, key):
            h = jax.nn.gelu(self.l1(x))
            keep = jax.random.bernoulli(key, 0.75, h.shape)  # dropout drawn from the checkpointed RNG
            return self.l2(jnp.where(keep, h / 0.75, 0.0))[:, 0]


    def make_batch(i):
        r = np.random.default_rng(int(i))
        x = r.normal(size=(16, 8)).astype(np.float32)
        return {"x": x, "y": np.sin(x).sum(-1).astype(np.float32)}


    def dataset():
        return grain.MapDataset.range(1000).shuffle(seed=1).map(make_batch).to_iter_dataset()


    def init_state():
        graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
        state = {"params": params, "opt_state": OPT.init(params), "step": jnp.int32(0)}
        return graphdef, {**state, "rng": jax.random.key(42)}


    def abstract_state():
        return jax.eval_shape(lambda: init_state()[1])


    def make_train_step(graphdef):
        @jax.jit
        def train_step(state, batch):
            rng, key = jax.random.split(state["rng"])

            def loss_fn(params):
                pred = nnx.merge(graphdef, params)(batch["x"], key)
                return jnp.mean((pred - batch["y"]) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
            updates, opt_state = OPT.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            checksum = sum(jnp.sum(jnp.abs(p)) for p in jax.tree.leaves(params))
            metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "param_checksum": checksum}
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}, metrics

        return train_step


    def main():
        ap = argparse.ArgumentParser()
        ap.add_argument("--ckpt", required=True)
        ap.add_argument("--metrics", required=True)
        ap.add_argument("--steps", type=int, default=6)
        ap.add_argument("--every", type=int, default=1)
        ap.add_argument("--resume", action="store_true")
        ap.add_argument("--kill-after", type=int, default=-1)
        ap.add_argument("--sleep", type=float, default=0.0)
        args = ap.parse_args()

        graphdef, state = init_state()
        train_step = make_train_step(graphdef)
        it = iter(dataset())
        start = 0
        ckpt = Checkpointer(args.ckpt, every=args.every, keep=3)
        if args.resume:
            restored = ckpt.restore_latest(abstract_state())
            if restored is not None:
                start, state = restored.step, restored.state
                it.set_state(restored.data_state)
                print(f"resumed from step {start}", flush=True)
        with PreemptionGuard() as guard, open(args.metrics, "a") as f:
            for step in range(start + 1, args.steps + 1):
                state, metrics = train_step(state, next(it))
                metrics = {k: float(v) for k, v in metrics.items()}
                f.write(json.dumps({"step": step, **{k: v.hex() for k, v in metrics.items()}}) + "\\n")
                f.flush()
                meta = {"metrics": metrics, "config": vars(args)}
                ckpt.save(step, state, it.get_state(), meta, force=step == args.steps)
                print(f"step {step} done", flush=True)
                if step == args.kill_after:
                    ckpt.wait()  # step's checkpoint committed; now die without any cleanup
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(args.sleep)
                if guard.should_stop():
                    ckpt.save(step, state, it.get_state(), meta, force=True)
                    ckpt.close()
                    print(f"preempted at step {step}", flush=True)
                    sys.exit(PREEMPTED_EXIT_CODE)
        ckpt.close()


    if __name__ == "__main__":
        main()
    '''
)


@pytest.fixture(scope="module")
def train_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("script") / "tiny_train.py"
    path.write_text(TRAIN_SCRIPT)
    return path


def _run(script: Path, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        str(script),
        "--ckpt",
        str(workdir / "ckpt"),
        "--metrics",
        str(workdir / "m.jsonl"),
    ]
    return subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=120, check=False)


def _metrics(workdir: Path) -> dict[int, dict[str, str]]:
    lines = [json.loads(line) for line in (workdir / "m.jsonl").read_text().splitlines()]
    return {rec.pop("step"): rec for rec in lines}


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location("tiny_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_after_sigkill_is_bitwise_identical(train_script: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    r = _run(train_script, straight)
    assert r.returncode == 0, r.stderr[-3000:]

    r = _run(train_script, killed, "--kill-after", "3")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert sorted(_metrics(killed)) == [1, 2, 3]
    r = _run(train_script, killed, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 3" in r.stdout

    want, got = _metrics(straight), _metrics(killed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == want[step], f"step {step}: resumed {got[step]} != straight {want[step]}"
    # The metrics differ between steps (the comparison is not vacuous).
    assert len({m["loss"] for m in want.values()}) == 6


def test_sigterm_saves_and_exits_with_preempted_code(train_script: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(train_script), "--ckpt", str(tmp_path / "ckpt"), "--metrics"]
    cmd += [str(tmp_path / "m.jsonl"), "--steps", "50", "--every", "100", "--sleep", "0.3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "step 2 done":
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    reached = int(out.split("preempted at step ")[1].split()[0])
    assert reached >= 2

    script = _load_script(train_script)
    with Checkpointer(tmp_path / "ckpt", every=100) as ckpt:
        assert ckpt.all_steps() == [reached]  # only the forced save: `every` was never hit
        restored = ckpt.restore_latest(script.abstract_state())
    assert restored is not None and restored.step == reached
    assert int(restored.state["step"]) == reached
    assert restored.data_state == {"next_index": reached}
    assert restored.meta["metrics"]["loss"] == float.fromhex(_metrics(tmp_path)[reached]["loss"])


# ---------------------------------------------------------------------------------------------------------
# In-process tests on a small state.


def _state(seed: int = 0) -> dict:
    k = jax.random.key(seed)
    return {
        "params": {"w": jax.random.normal(k, (64, 32)), "b": jnp.arange(32, dtype=jnp.bfloat16)},
        "step": jnp.int32(seed),
        "rng": jax.random.fold_in(k, 1),
    }


def _abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_equal(a: dict, b: dict) -> None:
    a, b = jax.tree.map(_plain, a), jax.tree.map(_plain, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def _plain(x: jax.Array) -> np.ndarray:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory with steps 1, 2, 3 (copied by each test that damages it)."""
    d = tmp_path_factory.mktemp("three") / "ckpt"
    with Checkpointer(d, every=1, keep=5) as ckpt:
        for step in (1, 2, 3):
            assert ckpt.save(step, _state(step), {"next_index": step}, {"loss": 1.0 / step})
    return d


def _largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _delete_commit_marker(d: Path) -> None:
    (d / "commit_success.txt").unlink()


def _delete_array_file(d: Path) -> None:
    _largest_array_file(d).unlink()


def _truncate_array_file(d: Path) -> None:
    f = _largest_array_file(d)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_a_bit(d: Path) -> None:
    f = _largest_array_file(d)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def _garble_step_metadata(d: Path) -> None:
    (d / "_CHECKPOINT_METADATA").write_text('{"item_handlers": ')


def _garble_meta(d: Path) -> None:
    (d / "meta" / "metadata").write_text("not json")


def _delete_data_state(d: Path) -> None:
    shutil.rmtree(d / "data")


@pytest.mark.parametrize(
    "damage",
    [
        _delete_commit_marker,
        _delete_array_file,
        _truncate_array_file,
        _flip_a_bit,
        _garble_step_metadata,
        _garble_meta,
        _delete_data_state,
    ],
)
def test_corrupt_latest_falls_back_with_warning(
    three_steps: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage
) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(three_steps, d)
    damage(d / "3")
    with caplog.at_level(logging.WARNING, logger=LOGGER), Checkpointer(d, every=1, keep=5) as ckpt:
        restored = ckpt.restore_latest(_abstract(_state()))
    assert restored is not None and restored.step == 2
    _assert_equal(restored.state, _state(2))
    assert restored.data_state == {"next_index": 2} and restored.meta == {"loss": 0.5}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in w and "unusable" in w for w in warnings), warnings


def test_partial_save_is_skipped_and_unusable_step_is_replaced(
    three_steps: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(three_steps, d)
    _delete_array_file(d / "3")
    shutil.copytree(d / "2", d / "4.orbax-checkpoint-tmp-1234567")  # a save killed before its commit
    with caplog.at_level(logging.WARNING, logger=LOGGER), Checkpointer(d, every=1, keep=5) as ckpt:
        restored = ckpt.restore_latest(_abstract(_state()))
        assert restored is not None and restored.step == 2
        # Training goes on from step 2: saving step 3 again replaces the unusable one.
        assert ckpt.save(3, _state(33), {"next_index": 3})
        ckpt.wait()
        again = ckpt.restore_latest(_abstract(_state()))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "step 4" in text and "partial" in text
    assert "step 3" in text and "unusable" in text
    assert again is not None and again.step == 3
    _assert_equal(again.state, _state(33))
    assert not any(p.name.startswith("4.") for p in d.iterdir())  # Orbax cleaned the partial save up


def test_nothing_usable_returns_none_and_mismatch_raises(
    three_steps: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Checkpointer(tmp_path / "empty", every=1) as ckpt:
        assert ckpt.restore_latest(_abstract(_state())) is None

    d = tmp_path / "ckpt"
    shutil.copytree(three_steps, d)
    with Checkpointer(d, every=1, keep=5) as ckpt:
        other = _abstract(_state())
        other["params"]["w"] = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=other["step"].sharding)
        with pytest.raises(CheckpointMismatchError, match=r"\['params'\]\['w'\]"):
            ckpt.restore_latest(other)

    # Saved by two processes, restored by one: the data-iterator positions do not carry over.
    data = d / "3" / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    shutil.copy(data / "process_0-of-2.json", data / "process_1-of-2.json")
    with Checkpointer(d, every=1, keep=5) as ckpt:
        with pytest.raises(CheckpointMismatchError, match="number of processes changed"):
            ckpt.restore_latest(_abstract(_state()))
        restored = ckpt.restore_latest(_abstract(_state()), restore_data=False)
    assert restored.step == 3 and restored.data_state is None
    _assert_equal(restored.state, _state(3))

    for step in (1, 2, 3):
        _delete_commit_marker(d / str(step))
    with caplog.at_level(logging.WARNING, logger=LOGGER), Checkpointer(d, every=1, keep=5) as ckpt:
        assert ckpt.restore_latest(_abstract(_state())) is None
    assert "no usable checkpoint" in caplog.text


def test_keeps_last_k_and_saves_every_n(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    with Checkpointer(d, every=2, keep=2) as ckpt:
        saved = [ckpt.save(step, _state(step)) for step in range(1, 11)]
        assert saved == [False, True] * 5
        assert not ckpt.save(10, _state(10), force=True)  # already saved
        assert ckpt.save(11, _state(11), force=True)  # e.g. the final step
    with Checkpointer(d, every=2, keep=2) as ckpt:
        assert ckpt.all_steps() == [10, 11]
        assert ckpt.should_save(4) and not ckpt.should_save(5) and ckpt.should_save(5, final=True)
    assert sorted(p.name for p in d.iterdir() if p.name.isdigit()) == ["10", "11"]


def test_sharded_restore_keeps_shardings(tmp_path: Path) -> None:
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    w = jax.device_put(
        jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), NamedSharding(mesh, P("data", "model"))
    )
    v = jax.device_put(jnp.arange(64, dtype=jnp.bfloat16), NamedSharding(mesh, P("model")))
    rep = jax.device_put(jnp.ones((3,)), NamedSharding(mesh, P()))
    state = {"w": w, "v": v, "rep": rep, "step": jnp.int32(7), "rng": jax.random.key(3)}
    with Checkpointer(tmp_path / "ckpt", every=1) as ckpt:
        assert ckpt.save(7, state, {"next_index": 7})
        ckpt.wait()
        restored = ckpt.restore_latest(_abstract(state))
        assert restored is not None and restored.step == 7
        for name in ("w", "v", "rep"):
            assert restored.state[name].sharding == state[name].sharding, name
        assert len(restored.state["w"].addressable_shards) == 8
        _assert_equal(restored.state, state)
        # A different layout of the same arrays (e.g. another topology) restores resharded.
        target = _abstract(state)
        target["w"] = jax.ShapeDtypeStruct(
            (64, 32), jnp.float32, sharding=NamedSharding(mesh, P("model", None))
        )
        resharded = ckpt.restore_latest(target)
    assert resharded.state["w"].sharding == target["w"].sharding
    np.testing.assert_array_equal(np.asarray(resharded.state["w"]), np.asarray(w))


def test_preemption_guard_sets_flag_and_restores_handler() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not guard.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.requested and guard.should_stop() and guard.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous


def test_checkpoint_path_keeps_urls_and_makes_local_paths_absolute() -> None:
    assert str(checkpoint_path("gs://bucket/run/ckpt")) == "gs://bucket/run/ckpt"
    assert str(checkpoint_path(Path("gs://bucket/run") / "ckpt")) == "gs://bucket/run/ckpt"  # pathlib's gs:/
    assert str(checkpoint_path("rel/ckpt")) == os.path.abspath("rel/ckpt")
