"""Orbax checkpoints for training: async saves, keep-last-K, exact resume, corrupt-step fallback, preemption.

One directory per saved step, in Orbax's own format::

    <directory>/<step>/
        state/   the training state: params, optimizer state, step, RNG (any pytree of jax arrays; sharded)
        data/    the data-iterator state, one JSON file per process: process_<i>-of-<n>.json
        meta/    JSON: the caller's meta (config, metrics, git commit) plus our ``_checkpoint`` record
        _CHECKPOINT_METADATA, commit_success.txt     Orbax's step metadata and commit marker

``directory`` may be local or ``gs://bucket/prefix``: it is handled as an ``etils.epath.Path`` throughout
(never ``pathlib.Path``), which is how Orbax reaches GCS; a relative local path is made absolute (Orbax
rejects relative ones) and a URL is left as given. Locally Orbax writes into
``<step>.orbax-checkpoint-tmp-*`` and renames on commit; on GCS it writes in place and commits by writing
``commit_success.txt``. In Orbax 0.12.8 both modes leave ``commit_success.txt`` in a committed step.

What "unusable" (partial or corrupt) detection covers, newest step first:

* partial saves: a ``<step>.orbax-checkpoint-tmp-*`` directory (local) or a step directory without
  ``commit_success.txt`` (GCS) -- the job died mid-save. Orbax ignores and removes these at start-up;
  we log a warning naming the step.
* a step directory without ``commit_success.txt``, or whose ``_CHECKPOINT_METADATA`` is unreadable or has
  no commit timestamp, or that lacks one of the items ``state`` / ``data`` / ``meta``;
* any failure to restore it: a deleted or truncated array file, a missing top-level OCDBT manifest,
  unreadable JSON in ``meta`` or ``data``, a missing data-iterator file;
* silent damage to array bytes (a flipped bit in a file that still parses; Orbax/TensorStore do not
  detect this): at save we record a per-leaf fingerprint of the state (two wrapping uint32 sums of its
  bits, one position-weighted; order- and sharding-independent) and compare it after restore.

Not covered: damage to files a restore does not need (Orbax's ``_METADATA`` tree file and the
per-process OCDBT manifests are redundant given a restore target), and edits that keep JSON valid.

An unusable step is skipped with a warning naming it and the reason, and the previous step is tried.
Nothing is deleted at restore: an unusable step is removed only when this run saves the same step
number again (or by keep-last-K), so a transient read error cannot destroy a good checkpoint. A restore
target whose leaves differ in path, shape or dtype from what was saved is a caller error and raises
:class:`CheckpointMismatchError` instead of falling back; so does a process count that changed since the
save (the data-iterator states are per process; ``restore_data=False`` resumes without them).

Multi-host: every process must call ``save``, ``wait``, ``restore_latest`` and
``PreemptionGuard.should_stop`` at the same points (they are collective). Orbax writes array shards from
every process and ``meta`` from process 0 only; each process writes its own data-iterator state. The
fallback decision is agreed across processes (a step one process cannot read is skipped by all).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

# The exit status of a run that stopped on SIGTERM after committing a checkpoint: EX_TEMPFAIL from
# sysexits.h ("temporary failure; retry"). Distinct from 143 (128 + SIGTERM, what a shell reports for a
# run killed by SIGTERM without saving) and 137 (SIGKILL). A launcher treats 75 as "preempted cleanly,
# resume"; 143 / 137 / -15 / -9 also mean "resume", but from an older step.
PREEMPTED_EXIT_CODE = 75

COMMIT_MARKER = "commit_success.txt"  # orbax.checkpoint._src.path.atomicity_types.COMMIT_SUCCESS_FILE
STEP_METADATA = "_CHECKPOINT_METADATA"
TMP_MARKER = ".orbax-checkpoint-tmp"  # atomicity_types.TMP_DIR_SUFFIX
ITEMS = ("state", "data", "meta")
_RECORD = "_checkpoint"  # our key inside the meta JSON

PathLike = str | epath.PathLike


class Restored(NamedTuple):
    """What :meth:`Checkpointer.restore_latest` gives back (unpacks as ``step, state, data_state, meta``)."""

    step: int
    state: Any
    data_state: Any
    meta: dict[str, Any]


class CheckpointMismatchError(ValueError):
    """The restore target does not describe what was saved (a config change, not corruption)."""


class _Unusable(Exception):
    """A step that cannot be used; the message is the reason."""


# ---------------------------------------------------------------------------------------------------------
# The data-iterator state: JSON, one file per process (each process has its own shard of the input).


def _process_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class PerProcessJsonHandler(ocp.JsonCheckpointHandler):
    """JSON written by every process to its own file, because each process iterates its own data shard.

    (Orbax's ``JsonCheckpointHandler`` writes from the primary host only, which would give every process
    process 0's iterator position after a multi-host resume.)
    """

    async def _save_fn(self, x: Any, directory: epath.Path) -> None:
        (directory / _process_file()).write_text(json.dumps(x))

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
        del item, args
        path = directory / _process_file()
        if not path.exists():
            saved = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            if any(re.fullmatch(r"process_\d+-of-\d+\.json", name) for name in saved):
                raise CheckpointMismatchError(
                    f"no data-iterator state for this process ({path.name}) in {directory}; it holds "
                    f"{saved}: the number of processes changed since the save (restore_latest(..., "
                    "restore_data=False) resumes without the data-iterator position)"
                )
            raise FileNotFoundError(f"{path} not found")
        return json.loads(path.read_text())


@ocp.args.register_with_handler(PerProcessJsonHandler, for_save=True)
@dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(PerProcessJsonHandler, for_restore=True)
@dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    item: Any = None


# ---------------------------------------------------------------------------------------------------------
# Typed PRNG keys are stored as their uint32 key data and rewrapped on restore.


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        if jax.process_count() > 1:
            raise ValueError("every leaf of a multi-host restore target needs a sharding")
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if _is_key(x):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        # A NamedSharding of the key array also describes its key data (trailing dims replicated).
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _validate_target(storable_abstract: Any) -> None:
    """A sharding that cannot hold its leaf is a caller error: raise before any step is judged by it."""
    for path, x in jax.tree_util.tree_flatten_with_path(storable_abstract)[0]:
        try:
            x.sharding.shard_shape(x.shape)
        except Exception as e:
            raise ValueError(
                f"restore target {jax.tree_util.keystr(path)}: sharding {x.sharding} cannot hold shape "
                f"{x.shape} ({e})"
            ) from e


def _from_storable(restored: Any, abstract: Any) -> Any:
    return jax.tree.map(
        lambda r, a: jax.random.wrap_key_data(r, dtype=a.dtype) if _is_key(a) else r, restored, abstract
    )


def tree_spec(tree: Any) -> dict[str, list[Any]]:
    """Leaf path -> [shape, dtype] of a storable (or abstract storable) tree: the ``spec`` a checkpoint's
    metadata records."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): [list(x.shape), str(np.dtype(x.dtype))] for p, x in leaves}


def spec_diff(saved: Mapping[str, Any], want: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Leaf paths only in ``saved``, only in ``want``, and in both with another [shape, dtype]; sorted."""
    common = sorted(set(saved) & set(want))
    return (
        sorted(set(saved) - set(want)),
        sorted(set(want) - set(saved)),
        [p for p in common if saved[p] != want[p]],
    )


# ---------------------------------------------------------------------------------------------------------
# Fingerprints: exact integer sums of each leaf's bits, independent of sharding and reduction order.

_MIX = 0x9E3779B1


def _words(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = np.dtype(x.dtype).itemsize
    if size == 4 or size == 8:  # 8-byte dtypes bitcast to a trailing pair of uint32
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
    raise TypeError(f"cannot fingerprint dtype {x.dtype}")


def _leaf_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = _words(x)
    # Flat position from broadcasted iotas: no reshape, so no resharding of a sharded leaf.
    pos = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(w.ndim)):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
        stride *= w.shape[d]
    weight = pos * jnp.uint32(_MIX) + jnp.uint32(1)
    return jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weight, dtype=jnp.uint32)


# One jit per leaf (cached per shape, dtype and sharding): leaves of a state may live on different device
# sets (e.g. an optimizer's step count on one device, sharded params on all), which one jit cannot take.
_leaf_fingerprint_jit = jax.jit(_leaf_fingerprint)


def fingerprints(state: Any) -> dict[str, str]:
    """Leaf path -> 16 hex digits; collective under multi-host (all processes call it)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(_to_storable(state))[0]:
        a, b = _leaf_fingerprint_jit(x)
        # 0-d results are replicated on every device, so the first addressable shard is the whole value.
        out[jax.tree_util.keystr(path)] = "".join(
            f"{int(np.asarray(v.addressable_data(0))):08x}" for v in (a, b)
        )
    return out


# ---------------------------------------------------------------------------------------------------------


def checkpoint_path(directory: PathLike) -> epath.Path:
    """``directory`` as Orbax needs it: a URL as given, a local path made absolute (Orbax rejects
    relative ones). ``pathlib.Path("gs://b/x")`` has collapsed the URL to ``gs:/b/x``; that is undone."""
    text = re.sub(r"^([a-z][a-z0-9+.-]*):/(?!/)", r"\1://", str(directory))
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _jsonable(x: Any) -> Any:
    """A JSON-safe deep copy (numpy / jax scalars and arrays become Python numbers and lists)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, jax.Array | np.ndarray | np.generic):
        return np.asarray(x).tolist()
    if x is None or isinstance(x, bool | int | float | str):
        return x
    if isinstance(x, epath.PathLike):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _all_processes(ok: bool) -> bool:
    """True iff ``ok`` on every process (collective)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _any_process(flag: bool) -> bool:
    return not _all_processes(not flag)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:limit]}"


class Checkpointer:
    """Periodic async checkpoints of a training run, with exact resume from the newest usable step.

    Every save holds the training ``state`` (pytree of jax arrays, e.g. ``{"params", "opt_state",
    "step", "rng"}``; typed PRNG keys are fine), the data-iterator ``data_state``
    (``DatasetIterator.get_state()``, JSON) and ``meta`` (JSON: config, metrics, git commit). Only the
    last ``keep`` steps are kept. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        directory: PathLike,
        *,
        every: int,
        keep: int = 3,
        async_save: bool = True,
        verify: bool = True,
        async_timeout_s: int = 1200,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if every < 0:
            raise ValueError(f"every must be >= 0 (0: only final / forced saves), got {every}")
        self.directory = checkpoint_path(directory)
        self.every = every
        self.keep = keep
        self.verify = verify
        # Partial saves must be seen before Orbax's start-up cleanup removes them, to warn about them.
        self._partial = self._scan()[1]
        self._unusable: set[int] = set()
        self._last_saved: int | None = None
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                # `max_to_keep` is deprecated in favour of this. LatestN keeps the last `keep` *saved*
                # (insertion order), so the newest save is never the one deleted.
                preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
                enable_async_checkpointing=async_save,
                async_options=ocp.AsyncOptions(timeout_secs=async_timeout_s),
                cleanup_tmp_directories=True,
                create=True,
            ),
        )

    # -- saving ------------------------------------------------------------------------------------------

    def should_save(self, step: int, *, final: bool = False) -> bool:
        """A save is due every ``every`` steps, and at the final step."""
        return final or (self.every > 0 and step % self.every == 0)

    def save(
        self,
        step: int,
        state: Any,
        data_state: Any = None,
        meta: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Start an async save of ``step`` if due (or ``force``); returns whether one was started.

        Returns after the device-to-host copy: the arrays may then be donated or overwritten. Collective:
        call on every process. A step already saved is not saved again.
        """
        if not (force or self.should_save(step)):
            return False
        if step in self._mgr.all_steps():
            if step not in self._unusable:
                log.info("checkpoint step %d already exists in %s; not saved again", step, self.directory)
                return False
            log.warning("replacing unusable checkpoint step %d in %s", step, self.directory)
            self._mgr.delete(step)
            self._unusable.discard(step)
        storable = _to_storable(state)
        record: dict[str, Any] = {
            "step": int(step),
            "saved_unix_time": time.time(),
            "process_count": jax.process_count(),
            "spec": tree_spec(storable),
        }
        if self.verify:
            record["fingerprints"] = fingerprints(storable)
        meta_doc = _jsonable(dict(meta or {}))
        meta_doc[_RECORD] = record
        saved = self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(storable),
                data=DataStateSave(_jsonable(data_state)),
                meta=ocp.args.JsonSave(meta_doc),
            ),
            force=True,
        )
        if saved:
            self._last_saved = step
        return bool(saved)

    def wait(self) -> None:
        """Block until the last save is committed; raises if it was not (Orbax only logs such errors)."""
        self._mgr.wait_until_finished()
        self._mgr.check_for_errors()
        step = self._last_saved
        if step is not None and not (self._step_dir(step) / COMMIT_MARKER).exists():
            raise RuntimeError(
                f"checkpoint step {step} was not committed to {self.directory} (see the Orbax log above)"
            )

    def close(self) -> None:
        """Wait for outstanding saves, then release Orbax's threads."""
        try:
            self.wait()
        finally:
            self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- listing -----------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed steps Orbax knows of (newest last); unusable ones included until replaced."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _scan(self) -> tuple[list[int], dict[int, str]]:
        """(step directories newest first, {step: why it is partial}) from a listing of ``directory``."""
        if not self.directory.exists():
            return [], {}
        steps, partial = [], {}
        for p in self.directory.iterdir():
            if re.fullmatch(r"\d+", p.name):
                steps.append(int(p.name))
                if not (p / COMMIT_MARKER).exists():
                    partial[int(p.name)] = f"{p.name} has no commit marker {COMMIT_MARKER}"
            elif (m := re.match(r"(\d+)" + re.escape(TMP_MARKER), p.name)) is not None:
                partial[int(m.group(1))] = f"uncommitted temporary directory {p.name}"
        return sorted(steps, reverse=True), partial

    # -- restoring ---------------------------------------------------------------------------------------

    def restore_latest(self, abstract_state: Any, *, restore_data: bool = True) -> Restored | None:
        """Restore the newest usable step into ``abstract_state``'s shapes, dtypes and shardings.

        ``abstract_state``: the state's pytree with ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``
        (or arrays) as leaves; typed PRNG key leaves come back as typed keys. Unusable steps (see the
        module docstring) are skipped with a warning. None (with a warning if steps existed) when no
        step is usable. ``restore_data=False`` leaves ``data_state`` None (e.g. after a change in the
        number of processes, which makes the per-process iterator states meaningless). Collective.
        """
        self.wait()
        self._mgr.reload()
        storable_abstract = jax.tree.map(_abstract_leaf, abstract_state)  # keys as key data, with shardings
        _validate_target(storable_abstract)
        steps, partial = self._scan()
        partial = {**self._partial, **partial}
        self._partial = {}
        candidates = sorted(set(steps) | set(self._mgr.all_steps()), reverse=True)
        for step in candidates:
            reason = None
            try:
                restored, record = self._read_step(step, storable_abstract, restore_data)
            except CheckpointMismatchError:
                raise
            except _Unusable as e:
                reason = str(e)
            except Exception as e:  # any read failure of this step is a reason to try the previous one
                reason = f"restore failed: {_first_line(e)}"
            if _all_processes(reason is None) and self.verify and "fingerprints" in record:
                # Outside the try: an error here is ours, not the checkpoint's, and must not hide as one.
                got = fingerprints(restored.state)
                bad = [p for p, fp in record["fingerprints"].items() if got.get(p) != fp]
                if bad:
                    reason = f"fingerprint mismatch (corrupted array data) in {bad[:3]}"
            if not _all_processes(reason is None):
                log.warning(
                    "checkpoint step %d in %s is unusable (%s); falling back to the previous step",
                    step,
                    self.directory,
                    reason or "another process could not restore it",
                )
                self._unusable.add(step)
                partial.pop(step, None)
                continue
            for p in sorted(partial, reverse=True):
                if p > step:
                    log.warning(
                        "checkpoint step %d in %s is partial (%s); resuming from step %d",
                        p,
                        self.directory,
                        partial[p],
                        step,
                    )
            return restored._replace(state=_from_storable(restored.state, abstract_state))
        if candidates or partial:
            for p in sorted(partial, reverse=True):
                log.warning("checkpoint step %d in %s is partial (%s)", p, self.directory, partial[p])
            log.warning("no usable checkpoint in %s; starting from scratch", self.directory)
        else:
            log.info("no checkpoint in %s; starting from scratch", self.directory)
        return None

    def _check_files(self, step: int) -> None:
        d = self._step_dir(step)
        if not d.is_dir():
            raise _Unusable(f"{d} is not a directory")
        if not (d / COMMIT_MARKER).exists():
            raise _Unusable(f"no commit marker {COMMIT_MARKER}: the save never finished")
        try:
            step_meta = json.loads((d / STEP_METADATA).read_text())
        except Exception as e:
            raise _Unusable(f"unreadable {STEP_METADATA}: {_first_line(e)}") from e
        if not isinstance(step_meta, dict) or not step_meta.get("commit_timestamp_nsecs"):
            raise _Unusable(f"{STEP_METADATA} has no commit timestamp")
        missing = [item for item in ITEMS if not (d / item).is_dir()]
        if missing:
            raise _Unusable(f"missing item(s) {missing}")

    def _read_step(
        self, step: int, storable_abstract: Any, restore_data: bool
    ) -> tuple[Restored, dict[str, Any]]:
        """Check the files of ``step`` and restore it; returns it and our record from its meta."""
        self._check_files(step)
        try:
            meta = json.loads((self._step_dir(step) / "meta" / "metadata").read_text())
            record = meta.pop(_RECORD)
        except Exception as e:
            raise _Unusable(f"unreadable meta: {_first_line(e)}") from e
        saved_spec, want_spec = record.get("spec"), tree_spec(storable_abstract)
        if saved_spec is not None and saved_spec != want_spec:
            raise CheckpointMismatchError(_describe_mismatch(step, saved_spec, want_spec))
        if record.get("step") != step:
            raise _Unusable(f"meta records step {record.get('step')}")
        items: dict[str, ocp.args.CheckpointArgs] = {"state": ocp.args.StandardRestore(storable_abstract)}
        if restore_data:
            items["data"] = DataStateRestore()
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        return Restored(step, out.state, out.data if restore_data else None, meta), record


def _describe_mismatch(step: int, saved: dict[str, Any], want: dict[str, Any]) -> str:
    only_saved, only_want, differ = spec_diff(saved, want)
    differ = [f"{p}: saved {saved[p]}, target {want[p]}" for p in differ]
    parts = []
    if only_saved:
        parts.append(f"only in the checkpoint: {only_saved[:5]}")
    if only_want:
        parts.append(f"only in the target: {only_want[:5]}")
    if differ:
        parts.append("shape/dtype differ: " + "; ".join(differ[:5]))
    return f"checkpoint step {step} does not match the restore target: " + " | ".join(parts)


# ---------------------------------------------------------------------------------------------------------


class PreemptionGuard:
    """Turns SIGTERM (a TPU VM's preemption notice) into a flag the training loop polls.

    The handler only sets a flag (no I/O, no JAX in a signal handler). After each step the loop calls
    :meth:`should_stop` (collective: the OR over processes, so all hosts stop at the same step even if
    the signal reaches them at different times), then saves with ``force=True``, waits, and exits with
    :data:`PREEMPTED_EXIT_CODE`. Install from the main thread; the previous handlers come back on exit.
    (It takes SIGTERM over from any handler installed before, e.g. one of JAX's preemption service, so
    do not rely on Orbax's ``reached_preemption`` alongside it: the flag here is the one to poll.)
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)) -> None:
        self.signals = tuple(signals)
        self._requested = False  # a plain bool: the handler must not take locks
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        self.signum = signum
        self._requested = True

    @property
    def requested(self) -> bool:
        """Whether this process received one of the signals (local; no communication)."""
        return self._requested

    def should_stop(self) -> bool:
        """Whether any process received the signal. Collective: call on every process at the same step."""
        return _any_process(self.requested)

    def __enter__(self) -> PreemptionGuard:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            # None: the previous handler was not installed from Python (e.g. by a C++ library); it
            # cannot be put back, so the default comes back.
            signal.signal(s, signal.SIG_DFL if h is None else h)
        self._previous.clear()
