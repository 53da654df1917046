"""Weights in and out of Hugging Face format.

A table maps each Hugging Face tensor name to our parameter path and a transform: torch stores Linear
weights (out, in), we store kernels (in, out); the Conv3d patch embedding becomes a (C*T*P*P, D)
matmul kernel. Transforms are transposes and reshapes only, so HF -> ours -> HF is bit-exact.

Loading streams one tensor at a time from the safetensors shards onto its devices, into a model that
was built abstractly (``nnx.eval_shape``): host memory never holds the model twice, and nothing is
ever randomly initialised. Only safetensors is read (never pickle).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from scalereasoner_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
from scalereasoner_jax.models.qwen2_5_vl.model import Qwen25VL
from scalereasoner_jax.parallel import Rules, param_sharding

Path_ = tuple[str | int, ...]


class WeightsError(ValueError):
    """Missing, unexpected or wrongly shaped tensors; the message names each one."""


def _linear() -> tuple[Callable, Callable]:
    return (lambda w: w.T), (lambda k: k.T)


def _identity() -> tuple[Callable, Callable]:
    return (lambda w: w), (lambda k: k)


def _patch(cfg: VisionConfig) -> tuple[Callable, Callable]:
    shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    return (lambda w: w.reshape(w.shape[0], -1).T), (lambda k: k.T.reshape(shape))


def _table(cfg: Qwen25VLConfig) -> list[tuple[str, str, tuple[Callable, Callable]]]:
    """(HF name regex, our path template, (to_ours, to_hf)). ``{i}`` is the layer index."""
    lin, ident = _linear(), _identity()
    rows = [
        (r"visual\.patch_embed\.proj\.weight", "visual.patch_embed", _patch(cfg.vision)),
        (r"visual\.blocks\.(\d+)\.norm(1|2)\.weight", "visual.blocks.{0}.norm{1}.scale", ident),
        (r"visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.weight", "visual.blocks.{0}.attn.{1}.kernel", lin),
        (r"visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.bias", "visual.blocks.{0}.attn.{1}.bias", ident),
        (
            r"visual\.blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
            "visual.blocks.{0}.mlp.{1}.kernel",
            lin,
        ),
        (
            r"visual\.blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias",
            "visual.blocks.{0}.mlp.{1}.bias",
            ident,
        ),
        (r"visual\.merger\.ln_q\.weight", "visual.merger.ln_q.scale", ident),
        (r"visual\.merger\.mlp\.0\.weight", "visual.merger.fc1.kernel", lin),
        (r"visual\.merger\.mlp\.0\.bias", "visual.merger.fc1.bias", ident),
        (r"visual\.merger\.mlp\.2\.weight", "visual.merger.fc2.kernel", lin),
        (r"visual\.merger\.mlp\.2\.bias", "visual.merger.fc2.bias", ident),
        (r"model\.embed_tokens\.weight", "language_model.embed_tokens", ident),
        (
            r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
            "language_model.layers.{0}.{1}.scale",
            ident,
        ),
        (
            r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
            "language_model.layers.{0}.self_attn.{1}.kernel",
            lin,
        ),
        (
            r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.bias",
            "language_model.layers.{0}.self_attn.{1}.bias",
            ident,
        ),
        (
            r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
            "language_model.layers.{0}.mlp.{1}.kernel",
            lin,
        ),
        (r"model\.norm\.weight", "language_model.norm.scale", ident),
    ]
    if not cfg.tie_word_embeddings:
        rows.append((r"lm_head\.weight", "lm_head.kernel", lin))
    return rows


def normalize_hf_name(name: str) -> str:
    """transformers 4.5x wrote ``model.language_model.*`` / ``model.visual.*``; map to the Hub layout."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def _to_path(dotted: str) -> Path_:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def hf_to_path(cfg: Qwen25VLConfig, name: str) -> tuple[Path_, Callable] | None:
    """Our parameter path and the to-ours transform for a HF tensor name, or None if unknown."""
    name = normalize_hf_name(name)
    for pattern, template, (to_ours, _) in _table(cfg):
        m = re.fullmatch(pattern, name)
        if m:
            return _to_path(template.format(*m.groups())), to_ours
    return None


def path_to_hf(cfg: Qwen25VLConfig, path: Path_) -> tuple[str, Callable]:
    """The HF tensor name and the to-HF transform for one of our parameter paths."""
    dotted = ".".join(str(p) for p in path)
    for pattern, template, (_, to_hf) in _table(cfg):
        # Invert the template: turn {k} slots into the regex groups they came from.
        groups = re.findall(r"\([^)]*\)", pattern)
        regex = re.escape(template)
        for k, g in enumerate(groups):
            regex = regex.replace(re.escape(f"{{{k}}}"), g)
        m = re.fullmatch(regex, dotted)
        if m:
            name = pattern
            for g in m.groups():
                name = re.sub(r"\([^)]*\)", g, name, count=1)
            return name.replace("\\.", "."), to_hf
    raise WeightsError(f"parameter {dotted} has no Hugging Face name")


def _shard_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [hf_dir / f for f in sorted(set(weight_map.values()))]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(hf_dir.glob("*.bin")) or any(hf_dir.glob("*.pt")):
        raise WeightsError(f"{hf_dir}: only pickle weights (*.bin/*.pt) found; convert them to safetensors")
    raise WeightsError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def _iter_tensors(hf_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    for file in _shard_files(hf_dir):
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key)


def from_pretrained(
    hf_dir: str | Path,
    *,
    mesh: Mesh | None = None,
    dtype=jnp.float32,
    param_dtype=None,
    rules: Rules | None = None,
    remat: str = "none",
) -> Qwen25VL:
    """Build Qwen2.5-VL from a Hugging Face folder, streaming tensors onto ``mesh`` (or one device)."""
    hf_dir = Path(hf_dir)
    cfg = Qwen25VLConfig.from_pretrained(hf_dir)
    param_dtype = param_dtype or dtype
    abstract = nnx.eval_shape(
        lambda: Qwen25VL(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))
    )
    graphdef, abs_state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(abs_state))
    device = jax.devices()[0]

    loaded: dict[Path_, nnx.Variable] = {}
    unexpected, bad_shapes = [], []
    for name, tensor in _iter_tensors(hf_dir):
        hit = hf_to_path(cfg, name)
        if hit is None:
            if cfg.tie_word_embeddings and normalize_hf_name(name) == "lm_head.weight":
                continue  # a tied checkpoint may carry a copy of the embedding; transformers ignores it
            unexpected.append(name)
            continue
        path, to_ours = hit
        var = flat.get(path)
        if var is None:
            unexpected.append(name)
            continue
        value = to_ours(tensor)
        if value.shape != var.shape:
            bad_shapes.append(
                f"{name}: checkpoint {tuple(tensor.shape)} -> {value.shape}, model expects {var.shape}"
            )
            continue
        sharding = (
            param_sharding(var, mesh, rules)
            if mesh is not None
            else NamedSharding(jax.sharding.Mesh(np.array([device]), ("_",)), PartitionSpec())
        )
        host = np.ascontiguousarray(value.astype(var.dtype))
        array = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
        loaded[path] = var.replace(array)
    missing = [".".join(map(str, p)) + f" (HF {path_to_hf(cfg, p)[0]})" for p in flat if p not in loaded]
    problems = []
    if missing:
        problems.append("missing tensors:\n  " + "\n  ".join(missing))
    if unexpected:
        problems.append("unexpected tensors:\n  " + "\n  ".join(unexpected))
    if bad_shapes:
        problems.append("wrongly shaped tensors:\n  " + "\n  ".join(bad_shapes))
    if problems:
        raise WeightsError(f"{hf_dir}: " + "\n".join(problems))
    state = nnx.from_flat_state([(p, loaded[p]) for p in flat])
    return nnx.merge(graphdef, state)


def hf_state_dict(model: Qwen25VL, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array) for every parameter, gathering sharded arrays to the host."""
    from jax.experimental import multihost_utils

    cfg = model.config
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, to_hf = path_to_hf(cfg, path)
        value = var.get_value()
        if not value.is_fully_addressable:
            value = multihost_utils.process_allgather(value, tiled=True)
        array = np.asarray(jax.device_get(value))
        if dtype is not None:
            array = array.astype(dtype)
        yield name, np.ascontiguousarray(to_hf(array))


# Tokenizer, processor, chat-template and generation files a converted folder carries over (whichever exist).
BASE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def save_pretrained(
    model: Qwen25VL,
    out_dir: str | Path,
    *,
    reference_dir: str | Path | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    dtype=None,
) -> Path:
    """Write a folder transformers loads: sharded safetensors + index, config.json, and the tokenizer /
    processor / chat template / generation files copied from ``reference_dir``.

    Only process 0 writes (all processes must call it: gathering sharded weights is collective).
    """
    out = Path(out_dir)
    write = jax.process_index() == 0
    if write:
        out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = 0
    for name, array in hf_state_dict(model, dtype):
        if size and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
        total += array.nbytes
    if not write:
        return out
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = model.config.to_hf_dict()
    saved_dtype = next(iter(shards[0].values())).dtype
    config["dtype"] = "bfloat16" if saved_dtype == jnp.bfloat16 else str(saved_dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if reference_dir is not None:
        for fname in BASE_FILES:
            src = Path(reference_dir) / fname
            if src.is_file():
                shutil.copy2(src, out / fname)
    return out
