"""``scalereasoner data inspect``: what a built dataset holds, and one example drawn as a PNG."""

from __future__ import annotations

import collections
import textwrap
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from scalereasoner_jax.data.pipeline import QUESTION_TYPES, data_source, normalize_example


def _builder(dataset: str | Path, data_dir: str | Path | None):
    import tensorflow_datasets as tfds

    if Path(dataset).is_dir():
        return tfds.builder_from_directory(str(dataset))
    return tfds.builder(str(dataset), data_dir=str(data_dir) if data_dir else None)


def split_counts(dataset: str | Path, data_dir: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Examples per split and per question type (when the dataset has question types)."""
    builder = _builder(dataset, data_dir)
    out: dict[str, dict[str, int]] = {}
    has_types = "question_type" in builder.info.features
    for split, info in sorted(builder.info.splits.items()):
        counts: dict[str, int] = {"total": int(info.num_examples)}
        if has_types:
            source = data_source(dataset, split, data_dir)
            per_type = collections.Counter(
                QUESTION_TYPES[int(source[i]["question_type"])] for i in range(len(source))
            )
            counts.update(sorted(per_type.items()))
        out[split] = counts
    return out


def render_example(example: dict[str, Any], out_png: str | Path, view_size: int = 320) -> Path:
    """Views side by side (labelled with their magnification), then the question and options."""
    views = []
    for img in example["images"]:
        pil = img if isinstance(img, PIL.Image.Image) else PIL.Image.fromarray(img)
        pil = pil.convert("RGB")
        scale = view_size / max(pil.size)  # small views are enlarged too, so all share one height
        views.append(pil.resize((round(pil.width * scale), round(pil.height * scale)), PIL.Image.LANCZOS))
    font = PIL.ImageFont.load_default(size=16)
    lines = [f"[{example['id']}] {example['question_type']}"]
    lines += textwrap.wrap(example["question"], 90)
    for letter, text in example["options"].items():
        mark = "*" if letter == example["answer"] else " "
        lines += textwrap.wrap(f"{mark} {letter}. {text}", 90)
    width = max(view_size * max(len(views), 1) + 10 * (len(views) + 1), 760)
    height = view_size + 40 + 22 * len(lines) + 20
    canvas = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    mags = example.get("magnifications") or [""] * len(views)
    for i, (view, mag) in enumerate(zip(views, mags, strict=False)):
        x = 10 + i * (view_size + 10)
        canvas.paste(view, (x, 10))
        draw.text((x, view_size + 14), mag, fill="black", font=font)
    y = view_size + 40
    for line in lines:
        draw.text((10, y), line, fill="black", font=font)
        y += 22
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png


def inspect_dataset(
    dataset: str | Path,
    data_dir: str | Path | None = None,
    out_png: str | Path = "example.png",
    split: str | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """Counts per split and question type, and ``out_png`` showing example ``index`` of ``split``."""
    counts = split_counts(dataset, data_dir)
    split = split or next(iter(counts))
    source = data_source(dataset, split, data_dir)
    if not 0 <= index < len(source):
        raise IndexError(f"example {index} is outside split {split!r} of {len(source)} examples")
    example = normalize_example(source[index])
    return {"counts": counts, "png": str(render_example(example, out_png)), "split": split, "index": index}
