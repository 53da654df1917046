"""What GRPO and SFT runs set up the same way: the mesh, the starting model, the data and the encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from scalereasoner_jax.models.qwen2_5_vl import from_pretrained
from scalereasoner_jax.models.qwen2_5_vl.model import Qwen25VL
from scalereasoner_jax.models.qwen2_5_vl.processing import PromptEncoder
from scalereasoner_jax.parallel import make_mesh


def _sync(name: str) -> None:
    """All processes wait for process 0's files (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def model_dir(model_cfg: Any, workdir: Path, seed: int = 0) -> Path:
    """The Hugging Face folder the run starts from: ``model.hf_dir``, or a tiny random model built
    (once, by process 0) into ``WORKDIR/init_model`` for ``model.init: tiny``."""
    if model_cfg.init == "pretrained":
        return Path(model_cfg.hf_dir)
    out = workdir / "init_model"
    if jax.process_index() == 0 and not (out / "config.json").is_file():
        from scalereasoner_jax.models.qwen2_5_vl.tiny import make_tiny_hf_model

        tiny = dict(model_cfg.tiny or {})
        make_tiny_hf_model(
            out,
            seed=seed,
            vision_overrides=tiny.pop("vision_config", None),
            text_overrides=tiny.pop("text_config", None),
            min_pixels=model_cfg.min_pixels,
            max_pixels=model_cfg.max_pixels,
            **tiny,
        )
    _sync("init_model")
    return out


def dataset_source(data_cfg: Any, workdir: Path, split: str):
    """A random-access source for ``split``; a ``data.synthetic`` set is generated and built first."""
    from scalereasoner_jax.data.pipeline import data_source

    if data_cfg.synthetic is None:
        return data_source(data_cfg.dataset, split, data_cfg.data_dir)
    release, tfds_dir = workdir / "data" / "release", workdir / "data" / "tfds"
    if jax.process_index() == 0:
        from scalereasoner_jax.data.build import build_scale_vqa
        from scalereasoner_jax.data.synthetic import synthesize

        if not (release / "train.json").is_file():
            s = data_cfg.synthetic
            synthesize(
                release,
                s.n,
                seed=s.seed,
                image_size=s.image_size,
                high_mag_missing_rate=s.high_mag_missing_rate,
                option_order=s.option_order,
            )
        build_scale_vqa(release, tfds_dir)
    _sync("synthetic_data")
    return data_source("scale_vqa", split, tfds_dir)


def load_model(model_cfg: Any, hf_dir: Path, mesh_cfg: Any) -> tuple[Qwen25VL, jax.sharding.Mesh]:
    mesh = make_mesh({"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor})
    model = from_pretrained(
        hf_dir,
        mesh=mesh,
        dtype=jnp.dtype(model_cfg.dtype),
        param_dtype=jnp.dtype(model_cfg.param_dtype),
        remat=model_cfg.remat,
    )
    return model, mesh


def prompt_encoder(model_cfg: Any, hf_dir: Path) -> PromptEncoder:
    return PromptEncoder.from_pretrained(
        hf_dir, min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels
    )
