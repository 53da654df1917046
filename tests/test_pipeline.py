"""The Grain input pipeline on an in-memory source with the Scale-VQA builder's feature layout."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from scalereasoner_jax.data.pipeline import (
    PipelineConfig,
    PipelineError,
    make_dataset,
    normalize_example,
    shuffle_options,
)
from scalereasoner_jax.models.qwen2_5_vl import Qwen25VLConfig, prepare_inputs
from scalereasoner_jax.models.qwen2_5_vl.processing import PromptEncoder


def _png(rng, h, w) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _source(n: int, seed: int = 0) -> list[dict]:
    """Examples as `tfds.data_source` returns them: bytes text, options as a dict of lists."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        n_views = 2 if i % 7 == 3 else 3
        out.append(
            {
                "id": str(i).encode(),
                "question": f"Question {i}: what is seen across scales?".encode(),
                "options": {
                    "letter": np.array([b"A", b"B", b"C", b"D"]),
                    "text": np.array([f"option {k} of {i}".encode() for k in "ABCD"]),
                },
                "answer": "ABCD"[i % 4].encode(),
                "rationale": b"because",
                "question_type": i % 5,
                "wsi_name": f"slide{i // 5}".encode(),
                "path_id": f"p{i // 5}".encode(),
                "images": [_png(rng, 56, 56) for _ in range(n_views)],
                "magnifications": np.array([b"low", b"mid", b"high"][:n_views]),
            }
        )
    return out


@pytest.fixture(scope="module")
def encoder(tiny_hf_dir):
    return PromptEncoder.from_pretrained(tiny_hf_dir)


def test_normalize_and_option_shuffle():
    ex = normalize_example(_source(1)[0])
    assert ex["options"] == {k: f"option {k} of 0" for k in "ABCD"} and ex["answer"] == "A"
    assert ex["question_type"] == "type_A" and len(ex["images"]) == 3
    seen = set()
    for seed in range(20):
        shuffled = shuffle_options(ex, np.random.default_rng(seed))
        assert sorted(shuffled["options"].values()) == sorted(ex["options"].values())
        assert shuffled["options"][shuffled["answer"]] == "option A of 0"  # the key moves with its text
        seen.add(shuffled["answer"])
    assert seen == set("ABCD")


def test_batches_have_bucketed_shapes_and_feed_the_model(encoder, tiny_hf_dir):
    config = PipelineConfig(batch_size=4, length_buckets=(288, 320, 352, 384), seed=3)
    batches = list(make_dataset(_source(13), encoder, config, process_index=0, process_count=1))
    assert len(batches) == 3  # 13 examples, remainder dropped
    model_cfg = Qwen25VLConfig.from_pretrained(tiny_hf_dir)
    for b in batches:
        assert b["input_ids"].shape[1] in config.length_buckets
        assert b["input_ids"].shape == b["attention_mask"].shape == (4, b["input_ids"].shape[1])
        assert (b["attention_mask"][:, -1] == 1).all()  # left padding
        assert b["image_grid_thw"].shape == (b["n_images"].sum(), 3)
        inputs = prepare_inputs(
            model_cfg, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"]
        )  # validates image tokens against the grids
        assert inputs.pixel_values.shape[0] == b["pixel_values"].shape[0]
    assert {tuple(b["input_ids"].shape) for b in batches} <= {(4, L) for L in config.length_buckets}


def test_process_shards_are_disjoint_and_complete(encoder):
    config = PipelineConfig(batch_size=1, drop_remainder=False, length_buckets=(512,), seed=5)
    source = _source(11)
    shards = [
        [str(b["id"][0]) for b in make_dataset(source, encoder, config, process_index=p, process_count=2)]
        for p in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1], key=int) == [str(i) for i in range(11)]
    single = [
        str(b["id"][0]) for b in make_dataset(source, encoder, config, process_index=0, process_count=1)
    ]
    assert single != sorted(single, key=int)  # shuffled
    assert set(single) == set(shards[0]) | set(shards[1])


def test_iterator_state_round_trip(encoder):
    config = PipelineConfig(batch_size=2, length_buckets=(512,), seed=7, num_epochs=2, shuffle_options=True)
    source = _source(9)
    it = iter(make_dataset(source, encoder, config, process_index=0, process_count=1))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = iter(make_dataset(source, encoder, config, process_index=0, process_count=1))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_second_epoch_is_reshuffled(encoder):
    config = PipelineConfig(batch_size=1, length_buckets=(512,), seed=1, num_epochs=2)
    ids = [
        str(b["id"][0]) for b in make_dataset(_source(8), encoder, config, process_index=0, process_count=1)
    ]
    assert len(ids) == 16 and sorted(ids[:8]) == sorted(ids[8:]) and ids[:8] != ids[8:]


def test_no_image_ablation_and_bucket_overflow(encoder):
    blind = PipelineConfig(batch_size=2, length_buckets=(512,), drop_images=True, shuffle=False)
    batch = next(iter(make_dataset(_source(2), encoder, blind, process_index=0, process_count=1)))
    assert "pixel_values" not in batch and (batch["n_images"] == 0).all()
    tight = PipelineConfig(batch_size=2, length_buckets=(16,), shuffle=False)
    with pytest.raises(PipelineError, match="longer than the largest length bucket 16"):
        next(iter(make_dataset(_source(2), encoder, tight, process_index=0, process_count=1)))


def test_grain_worker_processes_give_the_same_batches(encoder):
    config = PipelineConfig(batch_size=2, length_buckets=(512,), seed=2)
    source = _source(6)
    local = list(make_dataset(source, encoder, config, process_index=0, process_count=1))
    workers = make_dataset(
        source,
        encoder,
        PipelineConfig(**{**config.__dict__, "worker_count": 2}),
        process_index=0,
        process_count=1,
    )
    remote = list(workers)
    assert [list(b["id"]) for b in remote] == [list(b["id"]) for b in local]
    np.testing.assert_array_equal(remote[0]["pixel_values"], local[0]["pixel_values"])


def test_reads_a_built_tfds_dataset(encoder, tmp_path):
    """Builder -> array_record -> tfds data source (encoded image bytes) -> Grain batches."""
    from pathlib import Path

    from scalereasoner_jax.data.build import build_scale_vqa
    from scalereasoner_jax.data.pipeline import data_source

    dummy = Path(__file__).resolve().parents[1] / "tfds_builders" / "scale_vqa" / "dummy_data"
    result = build_scale_vqa(dummy, tmp_path / "tfds")
    source = data_source(result["builder_dir"], "test")
    assert isinstance(source[0]["images"][0], bytes)
    config = PipelineConfig(batch_size=2, length_buckets=(512, 1024), drop_remainder=False, shuffle=False)
    batches = list(make_dataset(source, encoder, config, process_index=0, process_count=1))
    assert sum(len(b["id"]) for b in batches) == len(source) == result["splits"]["test"]
    named = list(data_source("scale_vqa", "test", tmp_path / "tfds"))
    assert [normalize_example(x)["id"] for x in named] == [
        normalize_example(source[i])["id"] for i in range(len(source))
    ]
