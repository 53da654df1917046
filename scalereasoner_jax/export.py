"""Export a training checkpoint (Orbax) to a Hugging Face folder, gated by a logit check against transformers.

``scalereasoner export --checkpoint DIR [--step N] [--base HF_DIR] --out OUT_DIR`` writes a folder that is
ready to upload as it is:

- sharded safetensors (``model-0000i-of-0000n.safetensors``) with ``model.safetensors.index.json`` and
  ``config.json`` (the base's config; the architecture must match the checkpoint's shapes);
- the base's tokenizer, processor / preprocessor config, chat template and generation config (whatever
  of these exists there; never weights);
- a model card ``README.md``: Hub front matter (``library_name: transformers``, ``base_model``,
  ``pipeline_tag: image-text-to-text``, tags), the step, the gate's figures, the metrics logged at that
  step and the training config as YAML.

``--base`` (default: the run's ``model.hf_dir``, or ``WORKDIR/init_model`` for ``model.init: tiny``) gives
the architecture, the files to copy and, for LoRA, the weights the factors are merged into. The card's
``base_model`` is ``--base_model_id``, else the base config's ``_name_or_path`` when that is a Hub id, else
left out (the Hub rejects local paths there); the card then names the local base folder instead.

What is read: ``DIR`` may be a training workdir, its ``checkpoints/`` directory, or one step directory.
Only the weights are restored (Orbax partial restore: the optimizer state, RNG and data-iterator state are
never read), onto one CPU device whatever mesh or number of hosts wrote them, and each restored leaf is
checked against the fingerprint recorded at save time (see ``train/checkpoint.py``). GRPO checkpoints hold
``params``; SFT ones ``trainable``: the full parameters, or LoRA factors that are merged into the base's
weights exactly as the trainer does (``merge_lora``). Without ``--step`` the newest usable step is used
(unusable ones are skipped with a warning); with it, that step or an error.

The gate (:func:`verify_export`) reloads the written folder, never the in-memory weights:

1. parity: transformers on OUT_DIR versus our JAX model built from the checkpoint's weights, on one probe
   prompt with images through the folder's own processor and chat template (``parity.run_parity``; float32:
   largest |logit difference| / largest |logit| <= 1e-4, bfloat16: mean KL <= 1e-3);
2. tensors: every tensor of OUT_DIR equals the checkpoint's weight under the HF name map, bit for bit (the
   probe prompt cannot reach e.g. embedding rows of tokens it does not use).

For a bfloat16 export both sides use the weights rounded to bfloat16 (the rounding is what was asked for;
the gate checks the conversion, not the precision).

On failure the folder is left for inspection, but its card opens with a "parity gate FAILED, do not use"
banner and carries no "passed" line, :attr:`ExportReport.passed` is False and the command exits 1. The card
is first written as "not verified" before the gate runs, so a crash during the gate also leaves a folder
marked as unusable. An existing OUT_DIR is replaced only if it is empty or a previous export (its card
says so), or with ``overwrite=True``; only the files an export writes are removed (a ``.git`` stays).

Host memory: the restored weights stay resident, plus one more copy at a time: the host copy
``save_pretrained`` gathers while writing, then transformers' model during the gate (about 2 x 30 GB for a
float32 7B model).

Exit codes of :func:`export_main`: 0 passed, 1 gate failed, 2 bad input (a clear error naming the path,
step or key).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from scalereasoner_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from scalereasoner_jax.models.qwen2_5_vl.model import Qwen25VL
from scalereasoner_jax.models.qwen2_5_vl.params import (
    BASE_FILES,
    from_pretrained,
    hf_state_dict,
    save_pretrained,
)
from scalereasoner_jax.models.qwen2_5_vl.parity import DEFAULT_PROMPT, THRESHOLDS, ParityReport, run_parity
from scalereasoner_jax.parallel import make_mesh
from scalereasoner_jax.train.checkpoint import (
    COMMIT_MARKER,
    TMP_MARKER,
    checkpoint_path,
    fingerprints,
    spec_diff,
    tree_spec,
)

log = logging.getLogger(__name__)

__all__ = [
    "CARD_MARKER",
    "ExportError",
    "ExportReport",
    "RestoredCheckpoint",
    "TensorCheck",
    "VerifyReport",
    "export_checkpoint",
    "export_main",
    "parse_size",
    "restore_checkpoint",
    "verify_export",
]

# Besides BASE_FILES (never weights), folders of the base an export carries over.
BASE_DIRS = ("additional_chat_templates",)
INDEX = "model.safetensors.index.json"
CARD = "README.md"
# Written into every card: how a later export recognises a folder it may replace.
CARD_MARKER = "<!-- written by scalereasoner export -->"
EXPORT_DTYPES = tuple(THRESHOLDS)  # float32, bfloat16: the dtypes the parity gate has a threshold for


class ExportError(ValueError):
    """Bad input to an export: no checkpoint, a missing step, base files missing, a shape mismatch."""


# ---------------------------------------------------------------------------------------------------------
# Reports


@dataclasses.dataclass(frozen=True)
class TensorCheck:
    """Every tensor of the folder against the checkpoint's weights under the HF name map."""

    n_tensors: int
    mismatched: tuple[str, ...]  # name: what differs
    missing: tuple[str, ...]  # expected from the checkpoint, absent from the folder
    unexpected: tuple[str, ...]  # in the folder, not from the checkpoint
    max_abs_diff: float

    @property
    def passed(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)

    def summary(self) -> str:
        if self.passed:
            return f"tensors PASS: all {self.n_tensors} tensors equal the checkpoint's bit for bit"
        parts = (
            [f"{len(self.mismatched)} differ (max |diff| {self.max_abs_diff:.3e})"] if self.mismatched else []
        )
        parts += [f"{len(self.missing)} missing"] if self.missing else []
        parts += [f"{len(self.unexpected)} unexpected"] if self.unexpected else []
        shown = (self.mismatched + self.missing + self.unexpected)[:5]
        return f"tensors FAIL: {', '.join(parts)} of {self.n_tensors}: {'; '.join(shown)}"


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The export gate: logit parity on a probe prompt and the tensor-by-tensor check."""

    parity: ParityReport
    tensors: TensorCheck

    @property
    def passed(self) -> bool:
        return self.parity.passed and self.tensors.passed

    def summary(self) -> str:
        return f"{self.parity.summary()}\n{self.tensors.summary()}"


@dataclasses.dataclass(frozen=True)
class ExportReport:
    step: int
    out: Path
    checkpoint: str  # the step directory that was read
    kind: str  # "grpo", "sft" or "sft-lora" (LoRA factors merged)
    dtype: str  # of the written weights
    n_params: int
    n_shards: int
    parity: ParityReport
    tensors: TensorCheck
    passed: bool

    def summary(self) -> str:
        verdict = "ready to upload" if self.passed else "FAILED its gate: do not use"
        return (
            f"exported {self.kind} step {self.step} from {self.checkpoint} to {self.out} "
            f"({self.n_params:,} parameters, {self.dtype}, {self.n_shards} shard(s)): {verdict}\n"
            f"{self.parity.summary()}\n{self.tensors.summary()}"
        )


# ---------------------------------------------------------------------------------------------------------
# Reading checkpoints (read-only: unlike Checkpointer, nothing here creates or cleans up files)


@dataclasses.dataclass
class RestoredCheckpoint:
    """The model of one checkpoint step, on one device, with what its metadata says about the run."""

    step: int
    step_dir: str
    kind: str  # "grpo", "sft" or "sft-lora"
    config: dict[str, Any]  # the run's config (``to_dict`` form)
    metrics: dict[str, Any]  # logged at that step
    base: Path  # the HF folder giving the architecture (and, for LoRA, the merged-into weights)
    model: Qwen25VL


def _is_step_dir(p: epath.Path) -> bool:
    return re.fullmatch(r"\d+", p.name) is not None and (p / "state").is_dir() and (p / "meta").is_dir()


def _resolve(checkpoint: str | Path | epath.Path) -> tuple[epath.Path, int | None]:
    """(the directory holding step directories, the step if ``checkpoint`` is itself a step directory).

    Accepts a training workdir (``WORKDIR/checkpoints``), the checkpoints directory or a step directory.
    """
    path = checkpoint_path(checkpoint)
    if not path.exists():
        raise ExportError(f"checkpoint path {path} does not exist")
    if _is_step_dir(path):
        return path.parent, int(path.name)
    for cand in (path / "checkpoints", path):
        if cand.is_dir() and any(re.fullmatch(r"\d+", p.name) for p in cand.iterdir()):
            return cand, None
    raise ExportError(
        f"no checkpoint in {path}: expected a training workdir (with checkpoints/<step>/), its checkpoints "
        "directory or one step directory"
    )


def _steps(ckpt_dir: epath.Path) -> tuple[list[int], dict[int, str]]:
    """(committed steps newest first, {step: why it is not usable}) from a listing."""
    committed, partial = [], {}
    for p in ckpt_dir.iterdir():
        if re.fullmatch(r"\d+", p.name):
            if (p / COMMIT_MARKER).exists():
                committed.append(int(p.name))
            else:
                partial[int(p.name)] = f"no commit marker {COMMIT_MARKER} (the save never finished)"
        elif (m := re.match(r"(\d+)" + re.escape(TMP_MARKER), p.name)) is not None:
            partial[int(m.group(1))] = f"uncommitted temporary directory {p.name}"
    return sorted(committed, reverse=True), partial


def _read_meta(step_dir: epath.Path) -> dict[str, Any]:
    path = step_dir / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except Exception as e:
        raise _Unusable(f"unreadable {path}: {type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise _Unusable(f"{path} has no training config (was it written by a scalereasoner trainer?)")
    return meta


class _Unusable(Exception):
    """A step that cannot be exported; the message is the reason (another step may be tried)."""


def _kind(config: Mapping[str, Any], spec: Mapping[str, Any], where: str) -> tuple[str, str]:
    """(kind, the state key holding the weights) from the run's config and the saved leaf paths."""
    keys = {re.match(r"\['([^']+)'\]", p).group(1) for p in spec if p.startswith("['")}
    if "params" in keys:
        return "grpo", "params"
    if "trainable" in keys:
        lora = int((config.get("sft") or {}).get("lora_rank") or 0) > 0
        return ("sft-lora" if lora else "sft"), "trainable"
    raise ExportError(f"{where}: the saved state holds neither 'params' (GRPO) nor 'trainable' (SFT): {keys}")


def _check_spec(saved: Mapping[str, Any], want: Mapping[str, Any], key: str, where: str, base: Path) -> None:
    saved = {p: v for p, v in saved.items() if p.startswith(f"['{key}']")}
    only_saved, only_want, differ = spec_diff(saved, want)
    differ = [f"{p}: checkpoint {saved[p]}, base {want[p]}" for p in differ]
    if not (only_saved or only_want or differ):
        return
    parts = []
    if differ:
        parts.append("shape/dtype differ:\n  " + "\n  ".join(differ[:10]))
    if only_saved:
        parts.append("only in the checkpoint:\n  " + "\n  ".join(only_saved[:10]))
    if only_want:
        parts.append("only in the base's architecture:\n  " + "\n  ".join(only_want[:10]))
    raise ExportError(
        f"{where} does not match the architecture of {base / 'config.json'} (is --base the folder this "
        "run started from?): " + "\n".join(parts)
    )


def _default_base(config: Mapping[str, Any], ckpt_dir: epath.Path) -> Path | None:
    """The HF folder the run started from: ``model.hf_dir``, or ``WORKDIR/init_model`` for a tiny model."""
    model = config.get("model") or {}
    if model.get("init") == "tiny":
        return Path(str(ckpt_dir.parent / "init_model")) if ckpt_dir.name == "checkpoints" else None
    hf_dir = model.get("hf_dir")
    return Path(hf_dir) if hf_dir and "://" not in str(hf_dir) else None


def _check_base(base: Path) -> None:
    """The base folder must give a config and a tokenizer, processor and chat template to copy."""
    if not base.is_dir():
        raise ExportError(f"base folder {base} does not exist")
    have = {p.name for p in base.iterdir()}
    missing = []
    if "config.json" not in have:
        missing.append("config.json")
    if (
        "tokenizer.json" not in have
        and not {"vocab.json", "merges.txt"} <= have
        and "tokenizer.model" not in have
    ):
        missing.append("a tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if "tokenizer_config.json" not in have:
        missing.append("tokenizer_config.json")
    if not {"preprocessor_config.json", "processor_config.json"} & have:
        missing.append("an image processor config (preprocessor_config.json or processor_config.json)")
    has_template = bool({"chat_template.jinja", "chat_template.json"} & have)
    for name in ("tokenizer_config.json", "processor_config.json"):
        if not has_template and name in have:
            with contextlib.suppress(OSError, ValueError):
                has_template = bool(json.loads((base / name).read_text()).get("chat_template"))
    if not has_template:
        missing.append(
            "a chat template (chat_template.jinja / chat_template.json, or in tokenizer_config.json)"
        )
    if missing:
        raise ExportError(f"base folder {base} lacks " + "; ".join(missing))


def _single_device_mesh(device: jax.Device | None) -> jax.sharding.Mesh:
    # CPU by default: on a TPU host one chip's memory may not hold the whole model; the host's does.
    return make_mesh({"fsdp": 1}, devices=[device or jax.devices("cpu")[0]])


def _restore_tree(step_dir: epath.Path, target: dict[str, Any]) -> dict[str, Any]:
    """Orbax partial restore: only the leaves of ``target`` are read (the optimizer state is skipped)."""
    import orbax.checkpoint as ocp

    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
        )


def _verify_fingerprints(restored: Any, record: Mapping[str, Any]) -> None:
    saved = record.get("fingerprints")
    if not saved:
        return  # written with verify=False
    got = fingerprints(restored)
    bad = [p for p, fp in got.items() if saved.get(p) != fp]
    if bad:
        raise _Unusable(f"fingerprint mismatch (corrupted array data) in {bad[:3]}")


def _resolve_base(config: Mapping[str, Any], ckpt_dir: epath.Path, base: Path | None, where: str) -> Path:
    recorded = _default_base(config, ckpt_dir)
    if base is None:
        model_cfg = config.get("model") or {}
        if recorded is None or not recorded.is_dir():
            named = "WORKDIR/init_model" if model_cfg.get("init") == "tiny" else repr(model_cfg.get("hf_dir"))
            found = f" ({recorded} does not exist here)" if recorded is not None else ""
            raise ExportError(
                f"{where}: the run started from {named}{found}; pass --base with that HF folder"
            )
        base = recorded
    elif recorded is not None and recorded.exists() and recorded.resolve() != base.resolve():
        # The architecture check catches a different shape; a different model of the same shape only
        # matters for LoRA, whose factors are merged into the base's weights.
        log.warning("--base %s is not the folder the run started from (%s)", base, recorded)
    _check_base(base)
    return base


def _restore_full(
    step_dir: epath.Path,
    key: str,
    spec: Mapping[str, Any],
    record: Mapping[str, Any],
    cfg: Qwen25VLConfig,
    mesh: jax.sharding.Mesh,
    where: str,
    base: Path,
) -> tuple[nnx.GraphDef, nnx.State]:
    """GRPO ``params`` or full-SFT ``trainable``: restored into the base architecture's abstract state."""
    # The param dtype the run stored (model.param_dtype) decides the abstract model's dtypes.
    leaf_dtypes = {dtype for p, (_, dtype) in spec.items() if p.startswith(f"['{key}']")}
    param_dtype = jnp.dtype(leaf_dtypes.pop()) if len(leaf_dtypes) == 1 else jnp.float32
    abstract = nnx.eval_shape(
        lambda: Qwen25VL(cfg, dtype=jnp.float32, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, abs_params = nnx.split(abstract)
    replicated = NamedSharding(mesh, PartitionSpec())
    target = {
        key: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abs_params)
    }
    _check_spec(spec, tree_spec(target), key, where, base)
    try:
        restored = _restore_tree(step_dir, target)
    except Exception as e:
        raise _Unusable(f"restore failed: {type(e).__name__}: {str(e)[:300]}") from e
    _verify_fingerprints(restored, record)
    return graphdef, restored[key]


def _restore_lora(
    step_dir: epath.Path,
    config: Mapping[str, Any],
    spec: Mapping[str, Any],
    record: Mapping[str, Any],
    cfg: Qwen25VLConfig,
    mesh: jax.sharding.Mesh,
    where: str,
    base: Path,
) -> tuple[nnx.GraphDef, nnx.State]:
    """SFT LoRA: the factors restored and merged into the base's weights exactly as the trainer does."""
    from scalereasoner_jax.train.sft import merge_lora

    sft = config.get("sft") or {}
    rank = int(sft["lora_rank"])
    scale = float(sft.get("lora_alpha", 16.0)) / max(rank, 1)
    # As the trainer loaded the base: the merge happens in the run's param dtype.
    param_dtype = jnp.dtype((config.get("model") or {}).get("param_dtype") or "float32")
    base_params = nnx.state(
        from_pretrained(base, mesh=mesh, dtype=jnp.float32, param_dtype=param_dtype), nnx.Param
    )
    kernels = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(base_params)}
    replicated = NamedSharding(mesh, PartitionSpec())
    factors: dict[str, dict[str, jax.ShapeDtypeStruct]] = {}
    for path, (shape, dtype) in spec.items():
        m = re.fullmatch(r"\['trainable'\]\['([^']+)'\]\['(a|b)'\]", path)
        if m is None:
            if path.startswith("['trainable']"):
                raise ExportError(f"{where}: sft.lora_rank={rank} but {path} is not a LoRA factor")
            continue
        name, ab = m.groups()
        kernel = kernels.get(name)
        if kernel is None:
            raise ExportError(
                f"{where}: LoRA factor {path} adapts {name}, which the base {base} does not have"
            )
        want = [kernel[0], rank] if ab == "a" else [rank, kernel[1]]
        if list(shape) != want:
            raise ExportError(
                f"{where}: LoRA factor {path} has shape {shape}; the base {base} needs {want} for {name}"
            )
        factors.setdefault(name, {})[ab] = jax.ShapeDtypeStruct(
            tuple(shape), np.dtype(dtype), sharding=replicated
        )
    if not factors:
        raise ExportError(f"{where}: sft.lora_rank={rank} but the checkpoint holds no LoRA factors")
    try:
        restored = _restore_tree(step_dir, {"trainable": factors})
    except Exception as e:
        raise _Unusable(f"restore failed: {type(e).__name__}: {str(e)[:300]}") from e
    _verify_fingerprints(restored, record)
    graphdef = nnx.graphdef(
        nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=jnp.float32, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    )
    return graphdef, merge_lora(base_params, restored["trainable"], scale)


def _load_step(
    ckpt_dir: epath.Path, step: int, base: Path | None, mesh: jax.sharding.Mesh
) -> RestoredCheckpoint:
    step_dir = ckpt_dir / str(step)
    where = f"checkpoint step {step} ({step_dir})"
    if not (step_dir / COMMIT_MARKER).exists():
        raise _Unusable(f"no commit marker {COMMIT_MARKER} (the save never finished)")
    if not (step_dir / "state").is_dir():
        raise _Unusable("no state/ directory")
    meta = _read_meta(step_dir)
    record = meta.get("_checkpoint") or {}
    spec = record.get("spec") or {}
    if not spec:
        raise _Unusable("its metadata records no leaf spec")
    config = meta["config"]
    kind, key = _kind(config, spec, where)
    base = _resolve_base(config, ckpt_dir, base, where)
    cfg = Qwen25VLConfig.from_pretrained(base)
    if kind == "sft-lora":
        graphdef, params = _restore_lora(step_dir, config, spec, record, cfg, mesh, where, base)
    else:
        graphdef, params = _restore_full(step_dir, key, spec, record, cfg, mesh, where, base)
    return RestoredCheckpoint(
        step=step,
        step_dir=str(step_dir),
        kind=kind,
        config=config,
        metrics=dict(meta.get("metrics") or {}),
        base=base,
        model=nnx.merge(graphdef, params),
    )


def restore_checkpoint(
    checkpoint: str | Path,
    *,
    step: int | None = None,
    base: str | Path | None = None,
    device: jax.Device | None = None,
) -> RestoredCheckpoint:
    """The model of a GRPO or SFT checkpoint (LoRA merged) on one device (CPU by default), float32 compute.

    ``checkpoint``: a workdir, its ``checkpoints/`` directory or a step directory (local or ``gs://``).
    ``base``: the HF folder the run started from (default: the one its config names). Without ``step``
    the newest usable step; unusable ones (partial, unreadable, corrupted) are skipped with a warning.
    """
    if jax.process_count() > 1:
        raise ExportError("export runs on one host: start it as a single process")
    ckpt_dir, step_of_dir = _resolve(checkpoint)
    if step is not None and step_of_dir is not None and step != step_of_dir:
        raise ExportError(f"--step {step} contradicts the step directory {checkpoint}")
    step = step if step is not None else step_of_dir
    committed, partial = _steps(ckpt_dir)
    base_path = Path(base) if base is not None else None
    mesh = _single_device_mesh(device)
    if step is not None:
        if step not in committed:
            if step in partial:
                raise ExportError(f"checkpoint step {step} in {ckpt_dir} is unusable: {partial[step]}")
            raise ExportError(
                f"no checkpoint step {step} in {ckpt_dir}; committed steps: {sorted(committed)}"
            )
        try:
            return _load_step(ckpt_dir, step, base_path, mesh)
        except _Unusable as e:
            raise ExportError(f"checkpoint step {step} in {ckpt_dir} is unusable: {e}") from e
    if not committed:
        why = "; ".join(f"step {s}: {r}" for s, r in sorted(partial.items()))
        raise ExportError(f"no committed checkpoint in {ckpt_dir}" + (f" ({why})" if why else ""))
    for s in sorted(partial, reverse=True):
        if s > committed[0]:
            log.warning("checkpoint step %d in %s is partial (%s); skipped", s, ckpt_dir, partial[s])
    for s in committed:
        try:
            return _load_step(ckpt_dir, s, base_path, mesh)
        except _Unusable as e:
            log.warning("checkpoint step %d in %s is unusable (%s); trying the previous step", s, ckpt_dir, e)
    raise ExportError(f"no usable checkpoint in {ckpt_dir} (steps {committed} all failed; see the warnings)")


# ---------------------------------------------------------------------------------------------------------
# The gate


def _cast(model: Qwen25VL, dtype: str) -> Qwen25VL:
    """``model`` computing in ``dtype`` with its weights rounded to ``dtype`` (what the folder holds)."""
    if dtype == "float32" and model.dtype == jnp.float32:
        return model
    dt = jnp.dtype(dtype)
    # One program for all leaves (eager astype would dispatch and compile once per leaf).
    params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dt), p))(nnx.state(model, nnx.Param))
    graphdef = nnx.graphdef(
        nnx.eval_shape(lambda: Qwen25VL(model.config, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
    )
    return nnx.merge(graphdef, params)


def _folder_dtype(out: Path) -> str:
    cfg = json.loads((out / "config.json").read_text())
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"{out / 'config.json'}: dtype {dtype!r}; the gate knows {list(EXPORT_DTYPES)}")
    return dtype


def _check_tensors(out: Path, model: Qwen25VL, dtype: str) -> TensorCheck:
    from safetensors import safe_open

    index = out / INDEX
    if not index.is_file():
        raise ExportError(f"{out}: no {INDEX}")
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    on_disk = {}
    for fname in sorted(set(weight_map.values())):
        if not (out / fname).is_file():
            raise ExportError(f"{out}: shard {fname} named by {INDEX} is missing")
        with safe_open(str(out / fname), framework="numpy") as f:
            on_disk.update({k: fname for k in f.keys()})  # noqa: SIM118 (safe_open is not a mapping)
    mismatched, missing, seen = [], [], set()
    worst = 0.0
    np_dtype = np.dtype(jnp.dtype(dtype))
    for name, want in hf_state_dict(model, np_dtype):
        seen.add(name)
        if name not in on_disk:
            missing.append(name)
            continue
        with safe_open(str(out / on_disk[name]), framework="numpy") as f:
            got = f.get_tensor(name)
        if got.shape != want.shape or got.dtype != want.dtype:
            mismatched.append(f"{name}: folder {got.shape} {got.dtype}, checkpoint {want.shape} {want.dtype}")
        elif not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            worst = max(worst, diff)
            mismatched.append(f"{name}: max |diff| {diff:.3e}")
    unexpected = sorted(set(on_disk) - seen) + sorted(set(weight_map) - set(on_disk))
    return TensorCheck(len(seen), tuple(mismatched), tuple(missing), tuple(unexpected), worst)


def verify_export(
    out_dir: str | Path,
    source: str | Path | Qwen25VL | nnx.State | RestoredCheckpoint,
    *,
    step: int | None = None,
    base: str | Path | None = None,
    dtype: str | None = None,
    images: Sequence[str | Path] | None = None,
    prompt: str = DEFAULT_PROMPT,
) -> VerifyReport:
    """The export gate: ``out_dir`` (as written on disk) against the weights of ``source``.

    ``source``: a checkpoint path (restored with ``step`` / ``base`` as in :func:`restore_checkpoint`),
    a restored checkpoint, our model, or its parameters (``nnx.State``; the architecture then comes from
    ``base``'s config.json, else the folder's). ``dtype``: the folder's (default: its config.json).
    ``images``: the probe's images (default: three generated images of different sizes).
    """
    out = Path(out_dir)
    if isinstance(source, str | Path):
        source = restore_checkpoint(source, step=step, base=base)
    if isinstance(source, nnx.State):
        cfg = Qwen25VLConfig.from_pretrained(base if base is not None else out)
        dt = jnp.dtype(jax.tree.leaves(source)[0].dtype)
        graphdef = nnx.graphdef(
            nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=jnp.float32, param_dtype=dt, rngs=nnx.Rngs(0)))
        )
        source = nnx.merge(graphdef, source)
    model = source.model if isinstance(source, RestoredCheckpoint) else source
    dtype = dtype or _folder_dtype(out)
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    ours = _cast(model, dtype)
    # Our forward runs where the weights live (one CPU device), whatever the default backend is.
    device = next(iter(jax.tree.leaves(nnx.state(ours, nnx.Param))[0].sharding.device_set))
    with jax.default_device(device):
        tensors = _check_tensors(out, ours, dtype)
        parity = run_parity(out, images=images, prompt=prompt, dtype=dtype, our_model=ours)
    return VerifyReport(parity=parity, tensors=tensors)


# ---------------------------------------------------------------------------------------------------------
# The folder


def parse_size(size: int | str) -> int:
    """Bytes from ``4294967296``, ``"5GB"`` (10^9), ``"4GiB"`` (2^30) or ``"500MB"``, as transformers does."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if m is None:
        raise ExportError(f"max shard size {size!r}: expected bytes or e.g. 5GB, 500MB, 4GiB")
    number, unit, binary = m.groups()
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def _managed(name: str) -> bool:
    """Whether ``name`` in an output folder is one an export writes (and so may replace)."""
    return (
        name in BASE_FILES
        or name in BASE_DIRS
        or name in (INDEX, "config.json", CARD, "model.safetensors")
        or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None
    )


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        card = out / CARD
        previous = card.is_file() and CARD_MARKER in card.read_text(errors="replace")
        if not (previous or overwrite):
            raise ExportError(
                f"--out {out} is not empty and not a previous export; choose another folder or pass "
                "--overwrite (only the files an export writes are replaced)"
            )
        for p in out.iterdir():
            if _managed(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _copy_base_files(base: Path, out: Path) -> list[str]:
    copied = []
    for name in BASE_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
            copied.append(name)
    for name in BASE_DIRS:
        if (base / name).is_dir():
            shutil.copytree(base / name, out / name)
            copied.append(name + "/")
    return copied


def _base_card_license(base: Path) -> str | None:
    card = base / CARD
    if not card.is_file():
        return None
    m = re.match(r"---\n(.*?)\n---", card.read_text(errors="replace"), re.S)
    try:
        front = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        return None
    return str(front["license"]) if isinstance(front, dict) and front.get("license") else None


def _base_model_id(base: Path, given: str | None) -> str | None:
    """A Hub id for ``base_model``: the one given, else the base config's ``_name_or_path`` if it is one."""
    if given:
        return given
    try:
        name = json.loads((base / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError):
        return None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _config_yaml(config: Mapping[str, Any], kind: str) -> str:
    from scalereasoner_jax.config import from_dict, to_yaml

    try:  # canonical form when the config still parses with today's schema
        return to_yaml(from_dict(config, kind="sft" if kind.startswith("sft") else "grpo"))
    except Exception:
        return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def write_model_card(
    out: Path,
    restored: RestoredCheckpoint,
    *,
    dtype: str,
    n_params: int,
    n_shards: int,
    verify: VerifyReport | None,
    base_model_id: str | None = None,
) -> Path:
    """README.md for the Hub. ``verify`` None: written before the gate ran (marked "not verified")."""
    front: dict[str, Any] = {"library_name": "transformers"}
    if (license_ := _base_card_license(restored.base)) is not None:
        front["license"] = license_
    if (model_id := _base_model_id(restored.base, base_model_id)) is not None:
        front["base_model"] = model_id
    front["pipeline_tag"] = "image-text-to-text"
    method = {"grpo": "grpo", "sft": "sft", "sft-lora": "lora"}[restored.kind]
    front["tags"] = ["qwen2_5_vl", "pathology", "scale-vqa", "scalereasoner-jax", method]
    if verify is None or not verify.passed:
        front["tags"].append("unverified-export")
    training = {
        "grpo": "GRPO",
        "sft": "supervised fine-tuning (full)",
        "sft-lora": "supervised fine-tuning with LoRA (the factors are merged into these weights)",
    }[restored.kind]
    short = {"grpo": "GRPO", "sft": "full SFT", "sft-lora": "LoRA SFT"}[restored.kind]
    total = (restored.config.get("train") or {}).get("steps")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", CARD_MARKER, ""]
    if verify is None:
        lines += [
            "> **Not verified**: the export's parity gate has not run (or did not finish). Do not use.",
            "",
        ]
    elif not verify.passed:
        lines += [
            "> **Parity gate FAILED**: these weights do not reproduce the training checkpoint in "
            "transformers. Do not use or upload this folder.",
            "",
        ]
    lines += [
        f"# {out.name}",
        "",
        "Qwen2.5-VL weights exported by `scalereasoner export` (ScaleReasoner-JAX) from step "
        f"{restored.step}" + (f" (of {total})" if total else "") + f" of a {short} run.",
        "",
        "| | |",
        "|---|---|",
        f"| training | {training} |",
        f"| step | {restored.step} |",
        f"| checkpoint | `{restored.step_dir}` |",
        f"| base model | {front.get('base_model') or f'`{restored.base}`'} |",
        f"| weights | {n_params:,} parameters, {dtype}, {n_shards} safetensors shard(s) |",
        f"| exported | {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} |",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'model = AutoModelForImageTextToText.from_pretrained("PATH_OR_REPO_ID")',
        'processor = AutoProcessor.from_pretrained("PATH_OR_REPO_ID")',
        "```",
        "",
    ]
    if verify is not None:
        p, t = verify.parity, verify.tensors
        metric, threshold = p.metric, p.threshold
        lines += [
            f"## Export parity gate: {'passed' if verify.passed else 'FAILED'}",
            "",
            "This folder, loaded in transformers, against the JAX model built from the checkpoint's weights "
            f"on one probe prompt with {p.n_images} images ({p.n_tokens} tokens), {p.dtype}:",
            "",
            "| max abs logit diff | relative to max abs logit | mean KL(HF, ours) | argmax agreement "
            "| gate |",
            "|---|---|---|---|---|",
            f"| {p.max_abs_diff:.3e} | {p.max_rel_diff:.3e} | {p.mean_kl:.3e} | {p.argmax_agreement:.4f} "
            f"| {metric} <= {threshold:g}: {'pass' if p.passed else 'FAIL'} |",
            "",
            "Tensor check: "
            + (
                f"all {t.n_tensors} tensors equal the checkpoint's weights bit for bit."
                if t.passed
                else t.summary().removeprefix("tensors FAIL: ")
            ),
            "",
        ]
    numbers = {
        k: v
        for k, v in restored.metrics.items()
        if isinstance(v, int | float) and not k.startswith("time_") and not k.endswith("_per_s")
    }
    if numbers:
        lines += [f"## Metrics logged at step {restored.step}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in numbers.items()]
        lines += [""]
    lines += [
        "## Training config",
        "",
        "```yaml",
        _config_yaml(restored.config, restored.kind).rstrip(),
        "```",
        "",
    ]
    path = out / CARD
    path.write_text("\n".join(lines))
    return path


def export_checkpoint(
    checkpoint: str | Path,
    *,
    base: str | Path | None = None,
    out: str | Path,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_size: int | str = "4GB",
    images: Sequence[str | Path] | None = None,
    prompt: str = DEFAULT_PROMPT,
    base_model_id: str | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Orbax checkpoint -> HF folder, gated by :func:`verify_export`; see the module docstring.

    ``base``: the HF folder the run started from (default: ``model.hf_dir`` of the run's config, or
    ``WORKDIR/init_model`` for a tiny model); its config gives the architecture and its tokenizer /
    processor files are copied. Raises :class:`ExportError` on bad input; a failed gate is reported
    (``passed`` False), not raised.
    """
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    shard_bytes = parse_size(max_shard_size)
    out = Path(out)
    restored = restore_checkpoint(checkpoint, step=step, base=base)
    if out.resolve() == restored.base.resolve():
        raise ExportError(f"--out {out} is the base folder; write the export somewhere else")
    _prepare_out(out, overwrite)
    save_pretrained(
        restored.model, out, reference_dir=None, max_shard_bytes=shard_bytes, dtype=np.dtype(jnp.dtype(dtype))
    )
    _copy_base_files(restored.base, out)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(restored.model, nnx.Param)))
    n_shards = len(set(json.loads((out / INDEX).read_text())["weight_map"].values()))
    card = {"dtype": dtype, "n_params": n_params, "n_shards": n_shards, "base_model_id": base_model_id}
    write_model_card(out, restored, verify=None, **card)
    verify = verify_export(out, restored, dtype=dtype, images=images, prompt=prompt)
    write_model_card(out, restored, verify=verify, **card)
    return ExportReport(
        step=restored.step,
        out=out,
        checkpoint=restored.step_dir,
        kind=restored.kind,
        dtype=dtype,
        n_params=n_params,
        n_shards=n_shards,
        parity=verify.parity,
        tensors=verify.tensors,
        passed=verify.passed,
    )


# ---------------------------------------------------------------------------------------------------------
# Command line


def export_main(args: argparse.Namespace) -> int:
    """Run an export from parsed flags; 0 passed, 1 the gate failed, 2 bad input."""
    from scalereasoner_jax.models.qwen2_5_vl.params import WeightsError
    from scalereasoner_jax.train.checkpoint import CheckpointMismatchError

    try:
        report = export_checkpoint(
            args.checkpoint,
            base=args.base,
            out=args.out,
            step=args.step,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            images=args.image,
            prompt=args.prompt,
            base_model_id=args.base_model_id,
            overwrite=args.overwrite,
        )
    except (ExportError, WeightsError, CheckpointMismatchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    if not report.passed:
        print(
            f"error: the export in {report.out} failed its parity gate (marked in its {CARD})",
            file=sys.stderr,
        )
        return 1
    return 0
