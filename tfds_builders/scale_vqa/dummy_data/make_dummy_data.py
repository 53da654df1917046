"""Regenerate this folder: a tiny Scale-VQA release (val + test) for the builder's tests.

Views are 48 px crops of the CC0 CMU-1 patches in ../../../../shared/data/patches (5x, 10x, 20x as
low, mid, high), saved as JPEG (low) and PNG (mid, high) since the release has both. Run from anywhere:
``python tfds_builders/scale_vqa/dummy_data/make_dummy_data.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image

HERE = Path(__file__).resolve().parent
PATCHES = HERE.parents[3] / "shared" / "data" / "patches"
SOURCES = {
    "low": ("cmu1_x768_y1792_5x_mpp1.996_256px.png", "10x", "jpg"),
    "mid": ("cmu1_x1024_y2048_10x_mpp0.998_256px.png", "40x", "png"),
    "high": ("cmu1_x1152_y2176_20x_mpp0.499_256px.png", "200x", "png"),
}
TYPES = ("type_A", "type_B", "type_C", "type_D", "type_E")


def _view(mag: str, slide: str, triplet: int) -> str:
    name, total, ext = SOURCES[mag]
    rel = f"images/{slide}/t{triplet}_{total}.{ext}"
    im = PIL.Image.open(PATCHES / name).convert("RGB")
    off = 40 * triplet
    im = im.crop((off, off, off + 48, off + 48))
    (HERE / rel).parent.mkdir(parents=True, exist_ok=True)
    im.save(HERE / rel, format="JPEG" if ext == "jpg" else "PNG", quality=85)
    return rel


def _record(no: int, slide: str, triplet: int, qtype: str, views: dict[str, str | None]) -> dict:
    return {
        "No": no,
        "question": f"Across the views of triplet {triplet}, which finding is supported ({qtype})?",
        "options": {"A": "Glandular architecture", "B": "Sheets of lymphocytes", "C": "Necrosis", "D": "Fat"},
        "answer": "ABCDA"[no % 5],
        "rationale": f"Low magnification shows the architecture; higher views confirm it (item {no}).",
        "image_path": {"low_mag": views["low"], "mid_mag": views["mid"], "high_mag": views.get("high")},
        "extra_info": {
            "wsi_name": slide,
            "path_id": f"00000000-0000-4000-8000-{triplet:012d}",
            "question_type": qtype,
        },
    }


def main() -> None:
    t1 = {m: _view(m, "CMU-1", 1) for m in ("low", "mid", "high")}
    t2 = {m: _view(m, "CMU-1", 2) for m in ("low", "mid")}  # high_mag: null, a two-view triplet
    t3 = {m: _view(m, "CMU-1b", 3) for m in ("low", "mid", "high")}
    test = [_record(100 + i, "CMU-1", 1, q, t1) for i, q in enumerate(TYPES)]
    test += [_record(105 + i, "CMU-1", 2, q, {**t2, "high": None}) for i, q in enumerate(TYPES[:2])]
    val = [_record(200 + i, "CMU-1b", 3, q, t3) for i, q in enumerate(TYPES[:2])]
    for split, items in (("test", test), ("val", val)):
        (HERE / f"{split}.json").write_text(json.dumps(items, indent=1) + "\n")


if __name__ == "__main__":
    main()
