"""Our Qwen2.5-VL against transformers on tiny random models: same weights, same processed inputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from scalereasoner_jax.models.qwen2_5_vl import from_pretrained
from scalereasoner_jax.models.qwen2_5_vl.parity import compare_logits, processed_prompt, run_parity

from .conftest import SHARED_DATA


def _images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _min_side(hf_dir) -> int:
    ip = AutoProcessor.from_pretrained(str(hf_dir)).image_processor
    min_pixels = ip.size["shortest_edge"] if getattr(ip, "size", None) else ip.min_pixels
    side = round(min_pixels**0.5)
    assert side * side == min_pixels and side % 28 == 0, (
        "fixture min_pixels should be a square of a multiple of 28"
    )
    return side


@pytest.fixture(scope="module")
def models(tiny_hf_dir):
    hf = AutoModelForImageTextToText.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    return hf, from_pretrained(tiny_hf_dir)


def _check(hf_dir, hf, ours, images, prompt="What changes from low to high power?", dtype="float32"):
    inputs = processed_prompt(hf_dir, images, prompt)
    with torch.no_grad():
        ref = hf(**inputs).logits.float().numpy()
    got = np.asarray(ours(**inputs).logits.astype(jnp.float32))
    assert got.shape == ref.shape
    report = compare_logits(ref, got, inputs["attention_mask"].numpy(), dtype)
    assert report.passed, report.summary()
    return report, inputs


def test_text_only(tiny_hf_dir, models):
    report, _ = _check(tiny_hf_dir, *models, images=[])
    assert report.max_rel_diff < 1e-5


def test_one_image(tiny_hf_dir, models):
    report, inputs = _check(tiny_hf_dir, *models, images=_images([(112, 112)]))
    assert inputs["image_grid_thw"].shape == (1, 3)
    assert report.max_rel_diff < 1e-5


def test_three_images_of_different_sizes(tiny_hf_dir, models):
    side = _min_side(tiny_hf_dir)
    images = _images([(150, 90), (side, side), (100, 230)])  # non-square, exactly min pixels, wide
    report, inputs = _check(tiny_hf_dir, *models, images=images)
    grids = inputs["image_grid_thw"].numpy()
    assert len({tuple(g) for g in grids}) == 3, grids
    assert grids[1].prod() * 14 * 14 == side * side  # the second image stayed at the minimum
    assert report.max_rel_diff < 1e-5


def test_real_patches_across_magnifications(tiny_hf_dir, models):
    patches = sorted((SHARED_DATA / "patches").glob("cmu1_*_256px.png"))
    if not patches:
        pytest.skip(f"real patches not found under {SHARED_DATA}")
    by_mag = sorted(patches, key=lambda p: int(p.name.split("_")[3].rstrip("x")))  # 5x, 10x, 20x
    images = [Image.open(p).convert("RGB") for p in by_mag]
    report, _ = _check(
        tiny_hf_dir, *models, images=images, prompt="Low, mid, high power: what tissue is this?"
    )
    assert report.max_rel_diff < 1e-5


def test_windowed_and_full_attention_blocks_both_used(tiny_hf_dir, models):
    _, ours = models
    v = ours.config.vision
    assert 0 < len(v.fullatt_block_indexes) < v.depth
    # An image bigger than one window, so windowed blocks really see several windows.
    side = v.window_size * 2 + 28
    _, inputs = _check(tiny_hf_dir, *models, images=_images([(side, side + 56)]))
    _, h, w = inputs["image_grid_thw"].numpy()[0]
    assert h * 14 > v.window_size and w * 14 > v.window_size


def test_tied_embeddings(tiny_hf_dir_tied):
    hf = AutoModelForImageTextToText.from_pretrained(str(tiny_hf_dir_tied)).eval()
    ours = from_pretrained(tiny_hf_dir_tied)
    assert ours.lm_head is None and ours.config.tie_word_embeddings
    _check(tiny_hf_dir_tied, hf, ours, images=_images([(84, 140), (56, 56)]))


def test_bfloat16(tiny_hf_dir):
    report = run_parity(tiny_hf_dir, dtype="bfloat16")
    assert report.n_images == 3
    assert report.passed, report.summary()
    assert report.mean_kl < 1e-3


def test_parity_gate_fails_on_different_logits():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 6, 50)).astype(np.float32)
    mask = np.ones((1, 6))
    assert compare_logits(ref, ref.copy(), mask, "float32").passed
    assert not compare_logits(ref, ref + 1e-2, mask, "float32").passed
    bad = ref.copy()
    bad[0, 3] = rng.standard_normal(50) * 5
    assert not compare_logits(ref, bad, mask, "bfloat16").passed
    # Padding positions are ignored.
    padded = bad.copy()
    assert compare_logits(ref, padded, np.array([[1, 1, 1, 0, 1, 1]]), "float32").passed
