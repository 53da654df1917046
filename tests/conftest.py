"""Shared pytest fixtures: tiny local Qwen2.5-VL folders and the location of the real test data."""

from __future__ import annotations

import os

# Offline always: nothing in the test suite may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Eight virtual CPU devices for the sharding tests; must be set before jax initialises its backends.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

from pathlib import Path

import pytest

# Real, redistributable pathology files (see ../shared/data/README.md), relative to the repo root.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PATCHES_DIR = SHARED_DATA / "patches"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips (with the expected path) only when it is truly absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-VL HF folder (untied embeddings), built once per session."""
    from scalereasoner_jax.models.qwen2_5_vl.tiny import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir_tied(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path) -> Path:
    """Same as `tiny_hf_dir` but with `tie_word_embeddings=True` (shares its tokenizer)."""
    from scalereasoner_jax.models.qwen2_5_vl.tiny import make_tiny_hf_model

    return make_tiny_hf_model(
        tmp_path_factory.mktemp("tiny_qwen2_5_vl_tied"),
        seed=1,
        tie_word_embeddings=True,
        tokenizer_from=tiny_hf_dir,
    )
