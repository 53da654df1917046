"""The numpy/PIL Qwen2.5-VL processor against transformers' processors on real and edge-case images."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from scalereasoner_jax.models.qwen2_5_vl.processing import (
    IMAGE_TOKEN,
    ImageProcessor,
    ImageTooLargeError,
    PromptEncoder,
    batch_encode,
    build_messages,
    encode_prompt,
    smart_resize,
)

# Same location as conftest.SHARED_DATA (tests/ is not a package, so it cannot be imported from there).
PATCHES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "patches"
TOL = 1e-5
# The three CMU-1 fields of view, in the order the prompts use: low, mid, high magnification.
SCALE_PATCHES = (
    "cmu1_x768_y1792_5x_mpp1.996_256px.png",
    "cmu1_x1024_y2048_10x_mpp0.998_256px.png",
    "cmu1_x1152_y2176_20x_mpp0.499_256px.png",
)
OPTIONS = {"A": "Tumour epithelium", "B": "Normal mucosa", "C": "Lymphocytes", "D": "Stroma"}
QUESTION = "Which tissue type dominates the region across the three magnifications?"


@pytest.fixture(scope="module")
def hf_processor(tiny_hf_dir):
    return AutoProcessor.from_pretrained(str(tiny_hf_dir))


@pytest.fixture(scope="module")
def hf_pil(hf_processor):
    size = hf_processor.image_processor.size
    return Qwen2VLImageProcessorPil(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])


@pytest.fixture(scope="module")
def ours(tiny_hf_dir):
    return {
        "torchvision": ImageProcessor.from_pretrained(tiny_hf_dir),
        "pil": ImageProcessor.from_pretrained(tiny_hf_dir, backend="pil"),
    }


@pytest.fixture(scope="module")
def real_patches(shared_data) -> list[Path]:
    paths = sorted(PATCHES_DIR.glob("*.png")) + sorted(PATCHES_DIR.glob("*.tif"))
    assert any(p.suffix == ".tif" for p in paths) and any(p.suffix == ".png" for p in paths), paths
    return paths


@pytest.fixture(scope="module")
def base_rgb() -> np.ndarray:
    """A 256 px RGB tissue patch when the shared data exists, else seeded noise (the hardest case)."""
    path = PATCHES_DIR / SCALE_PATCHES[2]
    if path.is_file():
        return np.array(Image.open(path).convert("RGB"))
    return np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)


def _three_scales(base_rgb: np.ndarray) -> list[Image.Image]:
    if all((PATCHES_DIR / name).is_file() for name in SCALE_PATCHES):
        return [Image.open(PATCHES_DIR / name) for name in SCALE_PATCHES]
    return [
        Image.fromarray(base_rgb),
        Image.fromarray(base_rgb[:200, :150]),
        Image.fromarray(base_rgb[:56, :56]),
    ]


def _compare(ours_out: dict, hf_out) -> float:
    np.testing.assert_array_equal(ours_out["image_grid_thw"], np.asarray(hf_out["image_grid_thw"]))
    ref = np.asarray(hf_out["pixel_values"])
    assert ours_out["pixel_values"].dtype == np.float32
    assert ours_out["pixel_values"].shape == ref.shape
    diff = float(np.abs(ours_out["pixel_values"] - ref).max())
    assert diff <= TOL, diff
    return diff


def _check_both(ours, hf_processor, hf_pil, images) -> None:
    _compare(ours["torchvision"](images), hf_processor.image_processor(images, return_tensors="np"))
    _compare(ours["pil"](images), hf_pil(images, return_tensors="np"))


def test_auto_processor_uses_the_torchvision_backend(hf_processor):
    # Our default backend mirrors what AutoProcessor gives in transformers 5.24.
    assert type(hf_processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert hf_processor.image_processor.backend == "torchvision"


def test_from_pretrained_reads_the_folder(tiny_hf_dir, hf_processor, tmp_path):
    ip = ImageProcessor.from_pretrained(tiny_hf_dir)
    size = hf_processor.image_processor.size
    assert (ip.min_pixels, ip.max_pixels) == (size["shortest_edge"], size["longest_edge"])
    assert (ip.patch_size, ip.temporal_patch_size, ip.merge_size) == (14, 2, 2)
    # The legacy flat form of preprocessor_config.json works too.
    (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 784, "max_pixels": 12544}')
    legacy = ImageProcessor.from_pretrained(tmp_path)
    assert (legacy.min_pixels, legacy.max_pixels) == (784, 12544)
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json"):
        ImageProcessor.from_pretrained(tmp_path / "missing")


def test_real_patches_match_hf(real_patches, ours, hf_processor, hf_pil):
    for path in real_patches:
        image = Image.open(path)
        _check_both(ours, hf_processor, hf_pil, [image])
        # Paths are loaded the same way as the PIL images we hand to HF.
        from_path, from_pil = ours["torchvision"]([path]), ours["torchvision"]([image])
        np.testing.assert_array_equal(from_path["pixel_values"], from_pil["pixel_values"])


def test_real_patches_match_hf_with_default_pixel_bounds(real_patches):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    images = [Image.open(p) for p in real_patches]
    _compare(ImageProcessor()(images), Qwen2VLImageProcessor()(images, return_tensors="np"))
    _compare(ImageProcessor(backend="pil")(images), Qwen2VLImageProcessorPil()(images, return_tensors="np"))


def test_non_square_images(base_rgb, ours, hf_processor, hf_pil):
    crop = Image.fromarray(base_rgb[:, :120])  # 256 x 120, downscaled
    wide = Image.fromarray(base_rgb).resize((300, 97))  # 97 x 300
    tall_small = Image.fromarray(base_rgb[:90, :35])  # below min_pixels -> upscaled
    for image in (crop, wide, tall_small):
        _check_both(ours, hf_processor, hf_pil, [image])


def test_image_at_exactly_min_pixels(base_rgb, ours, hf_processor, hf_pil):
    ip = ours["torchvision"]
    side = round(ip.min_pixels**0.5)
    assert side * side == ip.min_pixels
    image = Image.fromarray(base_rgb[:side, :side])
    assert ip.target_size(side, side) == (side, side)
    _check_both(ours, hf_processor, hf_pil, [image])
    assert ip([image])["image_grid_thw"].tolist() == [[1, side // 14, side // 14]]


def test_rgba_and_grayscale_images(base_rgb, ours, hf_processor, hf_pil):
    alpha = np.linspace(0, 255, base_rgb.shape[1], dtype=np.uint8)[None, :, None].repeat(base_rgb.shape[0], 0)
    rgba = np.concatenate([base_rgb, alpha], axis=-1)
    for image in (
        Image.fromarray(rgba, "RGBA"),
        Image.fromarray(base_rgb).convert("L"),
        Image.fromarray(base_rgb).convert("LA"),
        Image.fromarray(base_rgb).convert("P"),
    ):
        _check_both(ours, hf_processor, hf_pil, [image])
    # Arrays carry no mode: 4 channels are RGBA and 1 channel is grey, in HWC or CHW layout.
    for array in (rgba, base_rgb[..., :1], np.ascontiguousarray(np.moveaxis(base_rgb, -1, 0))):
        _check_both(ours, hf_processor, hf_pil, [array])


def test_batch_of_three_sizes(base_rgb, ours, hf_processor, hf_pil):
    images = [
        Image.fromarray(base_rgb),
        Image.fromarray(base_rgb[:200, :150]),
        Image.fromarray(base_rgb[:56, :56]),
    ]
    _check_both(ours, hf_processor, hf_pil, images)
    out = ours["torchvision"](images)
    assert out["image_grid_thw"].shape == (3, 3)
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(axis=1).sum())


def test_patch_layout_is_hf_order(ours):
    # A 28x28 image = one merged token of 2x2 patches; each patch row holds (C, T, P, P).
    rgb = np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    ip = ours["torchvision"]
    out = ip([rgb])
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    norm = (rgb.astype(np.float32) - np.float32(255) * np.float32(ip.image_mean)) / (
        np.float32(255) * np.float32(ip.image_std)
    )
    patches = out["pixel_values"].reshape(2, 2, 2, 2, 3, 2, 14, 14)  # (h/m, w/m, m, m, C, T, P, P)
    for bh, bw, mh, mw in itertools.product(range(2), repeat=4):
        y, x = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
        want = np.moveaxis(norm[y : y + 14, x : x + 14], -1, 0)
        for t in range(2):
            np.testing.assert_allclose(patches[bh, bw, mh, mw, :, t], want, atol=1e-5)


@pytest.mark.parametrize(("min_pixels", "max_pixels"), [(56 * 56, 28 * 28 * 64), (56 * 56, 28 * 28 * 1280)])
def test_smart_resize_equals_hf(min_pixels, max_pixels):
    sides = [1, 2, 13, 27, 28, 29, 42, 55, 56, 57, 100, 223, 224, 225, 256, 333, 1000, 4099]
    for h, w in itertools.product(sides, repeat=2):
        if max(h, w) / min(h, w) > 200:
            continue
        want = hf_smart_resize(h, w, 28, min_pixels, max_pixels)
        got = smart_resize(h, w, 28, min_pixels, max_pixels)
        assert got == want, (h, w)
        assert got[0] % 28 == 0 and got[1] % 28 == 0


def test_smart_resize_edge_cases():
    assert smart_resize(1, 200) == hf_smart_resize(1, 200)  # exactly 200 is allowed
    with pytest.raises(ValueError, match=r"aspect ratio must be smaller than 200.*1x201"):
        smart_resize(1, 201)
    with pytest.raises(ValueError):
        hf_smart_resize(1, 201)
    with pytest.raises(ValueError, match="must be positive"):
        smart_resize(0, 28)
    # Half-way sizes use Python's round-half-even like HF: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2.
    assert smart_resize(42, 70, min_pixels=1) == hf_smart_resize(42, 70, min_pixels=1) == (56, 56)


def test_input_size_bound_names_the_image(base_rgb, tmp_path):
    path = tmp_path / "suspicious_slide_patch.png"
    Image.fromarray(base_rgb).save(path)
    n_pixels = base_rgb.shape[0] * base_rgb.shape[1]
    assert ImageProcessor(max_image_pixels=n_pixels)([path])["pixel_values"].size > 0
    strict = ImageProcessor(max_image_pixels=n_pixels - 1)
    with pytest.raises(ImageTooLargeError, match=r"suspicious_slide_patch\.png.*max_image_pixels"):
        strict([path])
    small = Image.fromarray(base_rgb[:28, :28])
    with pytest.raises(ImageTooLargeError, match=r"image 1\b"):
        strict([small, Image.fromarray(base_rgb)])
    with pytest.raises(ImageTooLargeError, match="image 0"):
        strict([base_rgb])


def test_build_messages_layout():
    msgs = build_messages(QUESTION, OPTIONS, 3)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    content = msgs[0]["content"]
    assert [c["type"] for c in content] == ["image", "image", "image", "text"]
    lines = content[-1]["text"].split("\n")
    assert lines[0] == QUESTION and lines[1] == "Options:"
    assert lines[2:6] == [f"{k}. {v}" for k, v in OPTIONS.items()]
    instruction = "\n".join(lines[6:])
    assert "pathology expert" in instruction
    assert "<think> </think>" in instruction and "<answer> </answer>" in instruction
    assert "letter" in instruction and "Never write the option text" in instruction
    with pytest.raises(ValueError, match="2 images for n_images=3"):
        build_messages(QUESTION, OPTIONS, 3, images=[1, 2])


@pytest.mark.parametrize("n_images", [1, 3])
def test_encode_prompt_equals_hf_processor(n_images, tiny_hf_dir, hf_processor, base_rgb):
    images = _three_scales(base_rgb)[-n_images:]
    encoder = PromptEncoder.from_pretrained(tiny_hf_dir)
    messages = build_messages(QUESTION, OPTIONS, n_images)
    got = encode_prompt(encoder.tokenizer, encoder.image_processor, messages, images)

    ref = hf_processor.apply_chat_template(
        build_messages(QUESTION, OPTIONS, n_images, images=images),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
    )
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    ref_call = hf_processor(text=[text], images=images, return_tensors="np")
    for hf_out in (ref, ref_call):
        np.testing.assert_array_equal(got["input_ids"], hf_out["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], hf_out["attention_mask"])
        np.testing.assert_array_equal(got["mm_token_type_ids"], hf_out["mm_token_type_ids"])
        _compare(got, hf_out)

    image_id = encoder.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_tokens = int((got["input_ids"] == image_id).sum())
    assert n_tokens == int(got["image_grid_thw"].prod(axis=1).sum()) // 4
    decoded = encoder.tokenizer.decode(got["input_ids"][0])
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert decoded.startswith(system + "<|im_start|>user\n")
    assert decoded.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert decoded.count("<|vision_start|>") == n_images
    # The convenience wrapper is the same thing.
    same = encoder.encode_question(QUESTION, OPTIONS, images)
    np.testing.assert_array_equal(same["input_ids"], got["input_ids"])


def test_batch_encode_left_pads_like_hf(tiny_hf_dir, hf_processor, base_rgb):
    encoder = PromptEncoder.from_pretrained(tiny_hf_dir)
    scales = _three_scales(base_rgb)
    items = [
        (build_messages("Is there necrosis?", {"A": "Yes", "B": "No"}, 1), scales[:1]),
        (build_messages(QUESTION, OPTIONS, 3), scales),
    ]
    got = batch_encode(encoder.tokenizer, encoder.image_processor, items)
    texts = [hf_processor.apply_chat_template(m, add_generation_prompt=True) for m, _ in items]
    ref = hf_processor(
        text=texts,
        images=[im for _, ims in items for im in ims],
        padding=True,
        padding_side="left",
        return_tensors="np",
    )
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        np.testing.assert_array_equal(got[key], ref[key])
    _compare(got, ref)
    assert got["input_ids"][0, 0] == encoder.tokenizer.pad_token_id and got["attention_mask"][0, 0] == 0
    np.testing.assert_array_equal(encoder.batch(items)["input_ids"], got["input_ids"])


def test_image_count_mismatch_is_an_error(tiny_hf_dir, base_rgb):
    encoder = PromptEncoder.from_pretrained(tiny_hf_dir)
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        encoder(build_messages(QUESTION, OPTIONS, 2), [base_rgb])
