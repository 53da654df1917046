"""Qwen2.5-VL inputs in numpy/PIL: image patches, chat prompts and token ids, equal to Hugging Face.

Why this exists: the JAX pipeline must not depend on torch at data-loading time, yet its inputs must
be bit-for-bit what `transformers`' `Qwen2_5_VLProcessor` produces, so that HF-trained weights see
the pixels and token layout they were trained on.

Resize kernels. In transformers 5.24 `AutoProcessor` gives the *torchvision* `Qwen2VLImageProcessor`
(the PIL one is `Qwen2VLImageProcessorPil`, used with `backend="pil"`). The torchvision processor
resizes the uint8 image with `tvF.resize(..., BICUBIC, antialias=True)`, which on CPU runs torch's
native uint8 anti-aliased kernel: Pillow's algorithm (Keys cubic a=-0.5, support scaled by the
downscale factor) but with int16 fixed-point weights whose precision is chosen per pass, horizontal
pass first, rounding to uint8 between passes. PIL uses 22-bit int32 weights instead, so the two HF
processors differ by 1-2 grey levels (~0.015-0.03 after normalisation) on resized images. This
module reimplements torch's kernel exactly in numpy (`backend="torchvision"`, the default) and uses
PIL itself for `backend="pil"`; both match their HF counterpart to float32 rounding (~2e-7).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.ImageOps

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_INSTRUCTION",
    "IMAGE_TOKEN",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VIDEO_TOKEN",
    "ImageProcessor",
    "ImageTooLargeError",
    "PromptEncoder",
    "batch_encode",
    "build_messages",
    "encode_prompt",
    "resize_bicubic_antialias",
    "smart_resize",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
BICUBIC = int(PIL.Image.Resampling.BICUBIC)
BACKENDS = ("torchvision", "pil")

DEFAULT_INSTRUCTION = (
    "You are a pathology expert. Think through the question step by step inside <think> </think> "
    "tags, then give only the letter of the single best option inside <answer> </answer> tags, "
    "for example <answer>A</answer>. Never write the option text inside the answer tags."
)


class ImageTooLargeError(ValueError):
    """An input image has more pixels than `ImageProcessor.max_image_pixels` allows."""


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Target (height, width) for Qwen2-VL: multiples of `factor`, pixel count within bounds.

    Identical arithmetic to `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`
    (Python's round-half-even included), so grids and token counts agree with HF.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {ratio} for an image of "
            f"{height}x{width} px (height x width); crop or pad it to a less extreme shape"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --------------------------------------------------------------------------- resize kernels


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic (a=-0.5), written in the operation order of torch's `aa_filter`."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _torch_aa_int16_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Taps of torch's uint8 antialiased bicubic resize along one axis.

    Mirrors `HelperInterpBase::_compute_index_ranges_int16_weights` (ATen UpSampleKernel.cpp):
    float64 weights normalised by their sequential sum, one precision for the whole pass (as many
    bits as keep the largest weight within int16), and round-half-away-from-zero quantisation.
    Returns (xmin, xsize, int weights [out, taps], precision).
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    max_taps = math.ceil(support) * 2 + 1
    center = scale * (np.arange(out_size, dtype=np.int64) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    xsize = np.clip(xsize, 0, max_taps)
    j = np.arange(max_taps, dtype=np.int64)
    valid = j[None, :] < xsize[:, None]
    w = _keys_cubic(((j[None, :] + xmin[:, None]) - center[:, None] + 0.5) * invscale)
    w = np.where(valid, w, 0.0)
    total = np.cumsum(w, axis=1)[:, -1]  # sequential sum, like the C++ loop
    safe_total = np.where(total != 0.0, total, 1.0)[:, None]
    w = np.where(total[:, None] != 0.0, w / safe_total, w)
    wt_max = float(w.max()) if w.size else 0.0
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * float(1 << precision)
    wi = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int64)
    taps = int(xsize.max()) if xsize.size else 0
    return xmin, xsize, wi[:, :taps], precision


def _resize_axis_torch_uint8(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One separable pass of torch's uint8 AA bicubic kernel along `axis` (uint8 in, uint8 out)."""
    in_size = image.shape[axis]
    if in_size == out_size:
        return image
    xmin, _, weights, precision = _torch_aa_int16_weights(in_size, out_size)
    src = np.moveaxis(image, axis, -1).astype(np.int64)
    acc = np.full((*src.shape[:-1], out_size), 1 << (precision - 1), dtype=np.int64)
    for k in range(weights.shape[1]):
        idx = np.minimum(xmin + k, in_size - 1)  # taps past xsize carry weight 0
        acc += src[..., idx] * weights[:, k]
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize_bicubic_antialias(
    image: np.ndarray, height: int, width: int, backend: str = "torchvision"
) -> np.ndarray:
    """Resize an (H, W, C) uint8 image with bicubic antialiasing exactly as the HF backend does.

    `backend="torchvision"`: torch's native uint8 kernel (what AutoProcessor uses on CPU);
    `backend="pil"`: `PIL.Image.resize(..., BICUBIC)` (the `Qwen2VLImageProcessorPil` path).
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) uint8 image, got {image.dtype} {image.shape}")
    if image.shape[:2] == (height, width):
        return image
    if backend == "pil":  # per channel so any channel count works; PIL resizes bands independently
        planes = [PIL.Image.fromarray(np.ascontiguousarray(image[..., c])) for c in range(image.shape[2])]
        return np.stack([np.asarray(p.resize((width, height), BICUBIC)) for p in planes], axis=-1)
    if backend != "torchvision":
        raise ValueError(f"unknown resize backend {backend!r}; expected one of {BACKENDS}")
    out = _resize_axis_torch_uint8(image, 1, width)  # horizontal pass first, as torch does
    return _resize_axis_torch_uint8(out, 0, height)


# --------------------------------------------------------------------------- image loading


ImageInput = PIL.Image.Image | np.ndarray | str | Path


def _describe(image: Any, index: int) -> str:
    """Human-readable name for error messages: the file name when there is one."""
    if isinstance(image, str | Path):
        return f"image {index} ({image})"
    name = getattr(image, "filename", "") if isinstance(image, PIL.Image.Image) else ""
    return f"image {index} ({name})" if name else f"image {index}"


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """HF's `convert_to_rgb` for PIL: composite any transparency onto white, else `convert('RGB')`."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(PIL.Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _array_to_hwc(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) uint8 -> (H, W, C), inferring the layout like HF does."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {array.shape}")
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    if array.shape[-1] in (1, 3, 4):
        return array
    if array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    raise ValueError(f"cannot tell the channel axis of an image array of shape {array.shape}")


def _array_to_rgb(array: np.ndarray, backend: str) -> np.ndarray:
    """HF's RGB conversion for arrays (mode is unknown: 1 channel -> grey, 4 channels -> RGBA)."""
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (0-255), got {array.dtype}")
    hwc = _array_to_hwc(array)
    channels = hwc.shape[-1]
    if channels == 1:
        return np.repeat(hwc, 3, axis=-1)
    if channels == 3:
        return hwc
    if backend == "torchvision":  # torchvision `convert_to_rgb`: float32 blend, truncating to uint8
        alpha = hwc[..., 3:].astype(np.float32) * np.float32(1.0 / 255.0)
        rgb = hwc[..., :3].astype(np.float32) * np.float32(1.0 / 255.0)
        blended = rgb * alpha + (np.float32(1.0) - alpha)
        return (blended * np.float32(255.0 + 1.0 - 1e-3)).astype(np.uint8)
    alpha = hwc[..., 3:] / 255  # transformers.image_transforms.convert_to_rgb (numpy branch)
    return np.round(alpha * hwc[..., :3] + (1 - alpha) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- image processor


@dataclass
class ImageProcessor:
    """Numpy/PIL twin of HF `Qwen2VLImageProcessor` (torchvision) / `Qwen2VLImageProcessorPil`.

    `max_image_pixels` bounds the *input* image size (checked from the header, before decoding) as
    a guard against decompression bombs; `None` disables it.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = BICUBIC
    rescale_factor: float = 1.0 / 255.0
    max_image_pixels: int | None = 1 << 26
    backend: str = "torchvision"
    _mean_std: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        if self.backend == "torchvision" and self.resample != BICUBIC:
            raise ValueError("the torchvision backend kernel is implemented for bicubic resampling only")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        # HF torchvision fuses rescale into normalize: (x - mean/r) / (std/r) in float32.
        inv = 1.0 / self.rescale_factor
        mean = np.asarray(self.image_mean, np.float32) * np.float32(inv)
        std = np.asarray(self.image_std, np.float32) * np.float32(inv)
        self._mean_std = (mean, std)

    @property
    def factor(self) -> int:
        """Side length (px) of one merged token: patch_size * merge_size."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path, **overrides: Any) -> ImageProcessor:
        """Read `preprocessor_config.json` (or the `image_processor` entry of `processor_config.json`,
        which is where transformers 5 writes it). Accepts `min_pixels`/`max_pixels` or
        `size: {shortest_edge, longest_edge}`; explicit `overrides` win."""
        root = Path(hf_dir)
        cfg: dict[str, Any] | None = None
        if (root / "preprocessor_config.json").is_file():
            cfg = json.loads((root / "preprocessor_config.json").read_text())
        elif (root / "processor_config.json").is_file():
            cfg = json.loads((root / "processor_config.json").read_text()).get("image_processor")
        if cfg is None:
            raise FileNotFoundError(
                f"no image processor config in {root}: expected preprocessor_config.json or an "
                "'image_processor' entry in processor_config.json"
            )
        kwargs: dict[str, Any] = {}
        size = cfg.get("size") or {}
        if size.get("shortest_edge") is not None:
            kwargs["min_pixels"] = int(size["shortest_edge"])
        if size.get("longest_edge") is not None:
            kwargs["max_pixels"] = int(size["longest_edge"])
        for key in ("min_pixels", "max_pixels"):  # legacy top-level keys take precedence, as in HF
            if cfg.get(key) is not None:
                kwargs[key] = int(cfg[key])
        for key in ("patch_size", "temporal_patch_size", "merge_size", "resample"):
            if cfg.get(key) is not None:
                kwargs[key] = int(cfg[key])
        for key in ("image_mean", "image_std"):
            if cfg.get(key) is not None:
                kwargs[key] = tuple(float(v) for v in cfg[key])
        if cfg.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(cfg["rescale_factor"])
        for key, flag in (("do_rescale", True), ("do_normalize", True), ("do_resize", True)):
            if cfg.get(key, flag) is not flag:
                raise ValueError(f"{key}={cfg[key]} in {root} is not supported (HF Qwen2.5-VL uses {flag})")
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown ImageProcessor options: {sorted(unknown)}")
        kwargs.update(overrides)
        return cls(**kwargs)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized (height, width) for an input of `height` x `width` px."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Number of `<|image_pad|>` tokens an input of `height` x `width` px expands to."""
        h, w = self.target_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // (self.merge_size**2)

    def _check_size(self, width: int, height: int, name: str) -> None:
        if self.max_image_pixels is not None and width * height > self.max_image_pixels:
            raise ImageTooLargeError(
                f"{name} is {width}x{height} = {width * height} px, above max_image_pixels="
                f"{self.max_image_pixels} (decompression-bomb guard); downsample or tile it first"
            )

    def load_rgb(self, image: ImageInput, index: int = 0) -> np.ndarray:
        """Any supported input -> (H, W, 3) uint8 RGB, with HF's conversion rules and the size guard."""
        name = _describe(image, index)
        if isinstance(image, str | Path):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"{name}: no such file")
            with PIL.Image.open(path) as pil:  # lazy: the header gives the size before decoding
                self._check_size(pil.width, pil.height, name)
                pil = PIL.ImageOps.exif_transpose(pil)  # as transformers' load_image does
                return _pil_to_rgb(pil)
        if isinstance(image, PIL.Image.Image):
            self._check_size(image.width, image.height, name)
            return _pil_to_rgb(image)
        if isinstance(image, np.ndarray):
            hwc = _array_to_hwc(image)
            self._check_size(hwc.shape[1], hwc.shape[0], name)
            return _array_to_rgb(image, self.backend)
        raise TypeError(f"{name}: unsupported image type {type(image).__name__}")

    def resize(self, image: ImageInput, index: int = 0) -> np.ndarray:
        """Load and resize one image to its target size: (H, W, 3) uint8 with H, W multiples of 28.

        This is the expensive half of processing (decode + antialiased resize); ``patchify`` is the
        cheap, vectorised other half, so a data pipeline can run this in worker processes and ship
        compact uint8 images instead of float32 patches.
        """
        rgb = self.load_rgb(image, index)
        th, tw = self.target_size(*rgb.shape[:2])
        if self.backend == "pil" and self.resample != BICUBIC:
            return np.asarray(PIL.Image.fromarray(rgb).resize((tw, th), self.resample))
        return resize_bicubic_antialias(rgb, th, tw, self.backend)

    def grid(self, resized: np.ndarray) -> tuple[int, int, int]:
        """The (t, h, w) patch grid of a resized image."""
        return (1, resized.shape[0] // self.patch_size, resized.shape[1] // self.patch_size)

    def patchify(self, resized: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Normalise and flatten one resized image into (grid_h*grid_w, C*T*P*P) patches."""
        mean, std = self._mean_std
        chw = (np.moveaxis(resized, -1, 0).astype(np.float32) - mean[:, None, None]) / std[:, None, None]
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        _, gh, gw = self.grid(resized)
        c = chw.shape[0]
        x = chw.reshape(c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # repeat the frame T times
        return x.reshape(gh * gw, c * t * p * p), (1, gh, gw)

    def __call__(self, images: Sequence[ImageInput] | ImageInput) -> dict[str, np.ndarray]:
        """`{"pixel_values": (N_patches, 3*T*P*P) float32, "image_grid_thw": (n_images, 3) int64}`."""
        if isinstance(images, PIL.Image.Image | np.ndarray | str | Path):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        patches, grids = [], []
        for i, image in enumerate(images):
            flat, grid = self.patchify(self.resize(image, i))
            patches.append(flat)
            grids.append(grid)
        return {
            "pixel_values": np.ascontiguousarray(np.concatenate(patches, axis=0), dtype=np.float32),
            "image_grid_thw": np.asarray(grids, dtype=np.int64),
        }


# --------------------------------------------------------------------------- prompts


def build_messages(
    question: str,
    options: Mapping[str, str],
    n_images: int,
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    images: Sequence[Any] | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for a multiple-choice question about `n_images` views (low, mid, high scale).

    Images come first in the order given, then one text item: the question, `Options:` with one
    `A. text` line per option, and the instruction (reason in `<think>`, letter-only `<answer>`).
    Pass `images` to embed them in the content items (what HF `apply_chat_template(tokenize=True)`
    reads); their count must equal `n_images`.
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if images is not None and len(images) != n_images:
        raise ValueError(f"got {len(images)} images for n_images={n_images}")
    if not options:
        raise ValueError("a multiple-choice question needs at least one option")
    for key in options:
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"option keys must be non-empty strings like 'A', got {key!r}")
    lines = [question.strip(), "Options:"]
    lines += [f"{key.strip()}. {str(text).strip()}" for key, text in options.items()]
    lines.append(instruction.strip())
    content: list[dict[str, Any]] = []
    for i in range(n_images):
        item: dict[str, Any] = {"type": "image"}
        if images is not None:
            item["image"] = images[i]
        content.append(item)
    content.append({"type": "text", "text": "\n".join(lines)})
    return [{"role": "user", "content": content}]


def _strip_images(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Drop embedded image objects before rendering (the template only needs the placeholders)."""
    out = []
    for message in messages:
        msg = dict(message)
        if isinstance(msg.get("content"), list):
            msg["content"] = [
                {"type": "image"}
                if (c.get("type") == "image" or "image" in c or "image_url" in c)
                else dict(c)
                for c in msg["content"]
            ]
        out.append(msg)
    return out


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    image_processor: ImageProcessor,
    messages: Sequence[Mapping[str, Any]],
    images: Sequence[ImageInput],
) -> dict[str, np.ndarray]:
    """Render the chat template (generation prompt on), expand image pads, tokenize.

    Returns numpy `input_ids`, `attention_mask`, `mm_token_type_ids` (1 = image token), each
    (1, L) int64, plus `pixel_values` and `image_grid_thw`; equal to HF `Qwen2_5_VLProcessor`.
    """
    vision = image_processor(images) if images else {}
    grids = vision.get("image_grid_thw", np.zeros((0, 3), np.int64))
    return {**tokenize_prompt(tokenizer, messages, grids, image_processor.merge_size), **vision}


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    image_grid_thw: np.ndarray | Sequence[Sequence[int]],
    merge_size: int = 2,
) -> dict[str, np.ndarray]:
    """Render the chat template (generation prompt on), expand each image pad to its grid's token
    count, tokenize. Returns (1, L) int64 `input_ids`, `attention_mask`, `mm_token_type_ids`."""
    text = tokenizer.apply_chat_template(_strip_images(messages), tokenize=False, add_generation_prompt=True)
    n_pads = text.count(IMAGE_TOKEN)
    if n_pads != len(image_grid_thw):
        raise ValueError(
            f"the prompt has {n_pads} image placeholders but {len(image_grid_thw)} images were given"
        )
    if n_pads:
        counts = [int(np.prod(g)) // merge_size**2 for g in image_grid_thw]
        pieces = text.split(IMAGE_TOKEN)
        text = pieces[0] + "".join(IMAGE_TOKEN * n + rest for n, rest in zip(counts, pieces[1:], strict=True))
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)[None, :]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    mm_types = np.where(ids == image_id, 1, np.where(ids == video_id, 2, 0)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "mm_token_type_ids": mm_types}


def batch_encode(
    tokenizer: PreTrainedTokenizerBase,
    image_processor: ImageProcessor,
    conversations: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[ImageInput]]],
) -> dict[str, np.ndarray]:
    """Encode several (messages, images) prompts and left-pad them to one (B, L) batch.

    Left padding keeps every prompt's last token at the end, which batched generation needs. The
    images of all prompts are concatenated in order, as HF's processor does for a batch.
    """
    if not conversations:
        raise ValueError("no prompts given")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; left padding needs one")
    encoded = [encode_prompt(tokenizer, image_processor, m, imgs) for m, imgs in conversations]
    length = max(e["input_ids"].shape[1] for e in encoded)
    batch = len(encoded)
    input_ids = np.full((batch, length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    mm_types = np.zeros((batch, length), dtype=np.int64)
    for row, e in enumerate(encoded):
        n = e["input_ids"].shape[1]
        input_ids[row, length - n :] = e["input_ids"][0]
        attention_mask[row, length - n :] = 1
        mm_types[row, length - n :] = e["mm_token_type_ids"][0]
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_types}
    with_images = [e for e in encoded if "pixel_values" in e]
    if with_images:
        out["pixel_values"] = np.concatenate([e["pixel_values"] for e in with_images], axis=0)
        out["image_grid_thw"] = np.concatenate([e["image_grid_thw"] for e in with_images], axis=0)
    return out


@dataclass
class PromptEncoder:
    """A tokenizer and an `ImageProcessor` bundled, loaded from one HF folder."""

    tokenizer: PreTrainedTokenizerBase
    image_processor: ImageProcessor

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path, **image_overrides: Any) -> PromptEncoder:
        """Load the folder's tokenizer (offline, local files only) and image processor config."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        return cls(tokenizer, ImageProcessor.from_pretrained(hf_dir, **image_overrides))

    def __call__(
        self, messages: Sequence[Mapping[str, Any]], images: Sequence[ImageInput]
    ) -> dict[str, np.ndarray]:
        """See `encode_prompt`."""
        return encode_prompt(self.tokenizer, self.image_processor, messages, images)

    def encode_question(
        self,
        question: str,
        options: Mapping[str, str],
        images: Sequence[ImageInput],
        *,
        instruction: str = DEFAULT_INSTRUCTION,
    ) -> dict[str, np.ndarray]:
        """`build_messages` + `encode_prompt` for one multiple-choice question."""
        return self(build_messages(question, options, len(images), instruction=instruction), images)

    def batch(
        self, conversations: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[ImageInput]]]
    ) -> dict[str, np.ndarray]:
        """See `batch_encode`."""
        return batch_encode(self.tokenizer, self.image_processor, conversations)
