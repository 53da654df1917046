"""``scalereasoner bench data``: examples/s of the input pipeline against a plain Python loop.

Both sides do the same work on the same examples: decode the views, resize and patchify them as the
model's processor does, render the prompt through the chat template, tokenise, left-pad into batches.
The pipeline reads the packaged TFDS dataset through Grain (0 and 2 worker processes); the loop
reads the release JSON and the image files directly.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import PIL.Image

from scalereasoner_jax.data.pipeline import (
    PipelineConfig,
    collate,
    data_source,
    encode_example,
    make_dataset,
    patchify_batch,
)
from scalereasoner_jax.models.qwen2_5_vl.processing import ImageProcessor, PromptEncoder

BUCKETS = (512, 768, 1024)


def _encoder(tmp: Path) -> PromptEncoder:
    from scalereasoner_jax.models.qwen2_5_vl.tiny import train_tokenizer

    tokenizer = train_tokenizer(tmp / "tokenizer")
    return PromptEncoder(tokenizer, ImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224))


def _plain_loop(release_dir: Path, split: str, encoder: PromptEncoder, config: PipelineConfig):
    """The same work without TFDS or Grain: JSON records, image files, encode, pad; yields batches."""
    records = json.loads((release_dir / f"{split}.json").read_text())
    pad_id = encoder.tokenizer.pad_token_id
    pending = []
    for rec in records:
        views = [rec["image_path"][k] for k in ("low_mag", "mid_mag", "high_mag") if rec["image_path"].get(k)]
        example = {
            "id": str(rec["No"]),
            "question": rec["question"],
            "options": rec["options"],
            "answer": rec["answer"],
            "question_type": rec["extra_info"]["question_type"],
            "images": [PIL.Image.open(release_dir / v) for v in views],
        }
        pending.append(encode_example(example, encoder, config))
        if len(pending) == config.batch_size:
            yield patchify_batch(collate(pending, pad_id, config.length_buckets), encoder.image_processor)
            pending = []


def _timed(batches) -> dict:
    """Start-up (time to the first batch) apart from the steady rate over the remaining batches."""
    t0 = time.perf_counter()
    it = iter(batches)
    first = len(next(it)["id"])
    t1 = time.perf_counter()
    rest = sum(len(b["id"]) for b in it)
    t2 = time.perf_counter()
    if hasattr(it, "close"):
        it.close()
    return {
        "examples": first + rest,
        "startup_s": t1 - t0,
        "seconds": t2 - t0,
        "examples_per_s": rest / (t2 - t1),
    }


def run(n: int = 240, batch_size: int = 8, seed: int = 0, out_json: str | None = None) -> dict:
    from scalereasoner_jax.data.build import build_scale_vqa
    from scalereasoner_jax.data.synthetic import synthesize

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        synthesize(tmp / "release", n, seed=seed, splits=(("train", 1.0),))
        built = build_scale_vqa(tmp / "release", tmp / "tfds")
        source = data_source(built["builder_dir"], "train")
        encoder = _encoder(tmp)
        config = PipelineConfig(batch_size=batch_size, length_buckets=BUCKETS, shuffle=True, seed=seed)

        def pipeline(workers: int):
            cfg = PipelineConfig(**{**config.__dict__, "worker_count": workers})
            return make_dataset(source, encoder, cfg, process_index=0, process_count=1)

        for _ in _plain_loop(tmp / "release", "train", encoder, config):  # warm caches (files, tokenizer)
            pass
        rows = {
            "plain Python loop over the JSON": _timed(_plain_loop(tmp / "release", "train", encoder, config)),
            "Grain pipeline, 0 workers": _timed(pipeline(0)),
            "Grain pipeline, 2 workers": _timed(pipeline(2)),
        }
    result = {
        "examples": len(source),
        "batch_size": batch_size,
        "image_side": 224,
        "views": "3 per example",
        "rows": rows,
    }
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_result(r: dict) -> str:
    lines = [
        f"{r['examples']} synthetic examples ({r['views']}, {r['image_side']} px), batch {r['batch_size']}"
    ]
    base = r["rows"]["plain Python loop over the JSON"]["examples_per_s"]
    lines.append(f"{'':34}{'steady rate':>20}{'ratio':>8}{'start-up':>10}")
    for name, row in r["rows"].items():
        lines.append(
            f"{name:34}{row['examples_per_s']:>9.1f} examples/s{row['examples_per_s'] / base:>8.2f}x"
            f"{row['startup_s']:>9.2f}s"
        )
    return "\n".join(lines)
