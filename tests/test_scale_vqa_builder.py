"""The Scale-VQA TFDS builder: both build paths, byte-exact images, no TensorFlow to build or read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_parser

from scalereasoner_jax.data.build import build_scale_vqa, raw_image_decoders
from scalereasoner_jax.data.schema import QUESTION_TYPES, ValidationError

REPO = Path(__file__).resolve().parents[1]
DUMMY = REPO / "tfds_builders" / "scale_vqa" / "dummy_data"
MAGS = ("low", "mid", "high")

# Makes TensorFlow uninstalled for a child process: `find_spec` says it is absent and `import` fails.
# (`sys.modules["tensorflow"] = None` would not do: etils takes any sys.modules entry as "TF is loaded"
# and then fails inside TFDS itself.)
NO_TF = textwrap.dedent(
    """
    import importlib.machinery, sys
    class _NoTF(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if name.partition(".")[0] == "tensorflow" else super().find_spec(name, path, target)
    sys.meta_path[:] = [_NoTF if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    """
)


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _source(manual_dir: Path, split: str) -> list[dict]:
    return json.loads((manual_dir / f"{split}.json").read_text())


def _views(rec: dict) -> list[tuple[str, str]]:
    return [(m, rec["image_path"][f"{m}_mag"]) for m in MAGS if rec["image_path"].get(f"{m}_mag")]


def _check_matches_source(ds, manual_dir: Path, split: str) -> None:
    """Every example equals its source record, in source order; images are the files' own bytes."""
    src = _source(manual_dir, split)
    assert len(ds) == len(src)
    for ex, rec in zip(ds, src, strict=True):
        assert ex["id"] == str(rec["No"]).encode()
        assert ex["question"] == rec["question"].encode()
        assert [x.decode() for x in ex["options"]["letter"]] == list(rec["options"])
        assert [x.decode() for x in ex["options"]["text"]] == list(rec["options"].values())
        assert ex["answer"] == rec["answer"].encode()
        assert ex["rationale"] == rec["rationale"].encode()
        assert QUESTION_TYPES[ex["question_type"]] == rec["extra_info"]["question_type"]
        assert ex["wsi_name"] == rec["extra_info"]["wsi_name"].encode()
        assert ex["path_id"] == rec["extra_info"]["path_id"].encode()
        views = _views(rec)
        assert [m.decode() for m in ex["magnifications"]] == [m for m, _ in views]
        assert ex["images"] == [(manual_dir / p).read_bytes() for _, p in views]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's dummy release (val + test; JPEG and PNG views; a two-view triplet) in a temp dir."""
    d = tmp_path_factory.mktemp("release") / "manual"
    shutil.copytree(DUMMY, d, ignore=shutil.ignore_patterns("*.py"))
    return d


@pytest.fixture(scope="module")
def built(release: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_scale_vqa(release, tmp_path_factory.mktemp("out_main"))


def test_main_build_round_trip(built: dict, release: Path):
    assert built["name"] == "scale_vqa/default:1.0.0" and built["config"] == "default"
    assert built["splits"] == {"val": 2, "test": 7} and built["skip_report"] is None
    assert built["file_format"] == "array_record" and not built["reused"]
    data_dir = Path(built["builder_dir"]).parents[2]
    for split in ("val", "test"):
        ds = tfds.data_source("scale_vqa", data_dir=data_dir, split=split, decoders=raw_image_decoders())
        _check_matches_source(ds, release, split)
    test = _source(release, "test")
    assert any(rec["image_path"]["high_mag"] is None for rec in test)  # the two-view records were kept
    assert {Path(p).suffix for rec in test for _, p in _views(rec)} == {".jpg", ".png"}

    # The serialized record itself holds each file's bytes (no re-encoding, not just equal pixels).
    builder = tfds.builder_from_directory(built["builder_dir"])
    raw = builder.as_data_source(split="test", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    parser = example_parser.ExampleParserNp(builder.info.features.get_serialized_info())
    stored = parser.parse_example(raw[0])["images"]
    assert [bytes(b) for b in stored] == [(release / p).read_bytes() for _, p in _views(test[0])]

    # Default decoding: numpy pixels, one array per view, equal to decoding the source file.
    ex = tfds.data_source("scale_vqa", data_dir=data_dir, split="test")[5]
    assert len(ex["images"]) == 2 and ex["magnifications"] == [b"low", b"mid"]
    for arr, (_, p) in zip(ex["images"], _views(test[5]), strict=True):
        np.testing.assert_array_equal(arr, np.asarray(PIL.Image.open(release / p).convert("RGB")))

    again = build_scale_vqa(release, data_dir)
    assert again["reused"] and again["splits"] == built["splits"]


def test_stock_tfds_build_matches_main_path(built: dict, release: Path, tmp_path: Path):
    tfds_cli = Path(sys.executable).parent / "tfds"
    out = tmp_path / "out_stock"
    _run(
        [
            str(tfds_cli),
            "build",
            "tfds_builders/scale_vqa",
            "--manual_dir",
            str(release),
            "--data_dir",
            str(out),
        ]
    )
    stock = tfds.builder_from_directory(out / "scale_vqa" / "default" / "1.0.0")
    assert stock.info.file_format.value == "array_record"
    main = tfds.builder_from_directory(built["builder_dir"])
    for split in ("val", "test"):
        a = stock.as_data_source(split=split, decoders=raw_image_decoders())
        b = main.as_data_source(split=split, decoders=raw_image_decoders())
        _check_matches_source(a, release, split)
        assert [ex["images"] for ex in a] == [ex["images"] for ex in b]


def test_build_and_read_without_tensorflow(release: Path, tmp_path: Path):
    script = NO_TF + textwrap.dedent(
        f"""
        import json
        from scalereasoner_jax.data.build import build_scale_vqa, raw_image_decoders
        import tensorflow_datasets as tfds
        try:
            import tensorflow
            raise SystemExit("tensorflow is importable")
        except ImportError:
            pass
        out = build_scale_vqa({str(release)!r}, {str(tmp_path / "out")!r})
        raw = tfds.data_source("scale_vqa", data_dir={str(tmp_path / "out")!r}, split="test",
                               decoders=raw_image_decoders())
        dec = tfds.data_source("scale_vqa", data_dir={str(tmp_path / "out")!r}, split="test")
        print(json.dumps({{
            "splits": out["splits"],
            "raw_types": sorted({{type(x).__name__ for ex in raw for x in ex["images"]}}),
            "shapes": [list(x.shape) for x in dec[0]["images"]],
            "n_images_two_view": len(raw[5]["images"]),
            "first_bytes_len": len(raw[0]["images"][0]),
            "tf_loaded": "tensorflow" in sys.modules,
        }}))
        """
    )
    proc = _run([sys.executable, "-c", script])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    low = _views(_source(release, "test")[0])[0][1]
    assert got == {
        "splits": {"val": 2, "test": 7},
        "raw_types": ["bytes"],
        "shapes": [[48, 48, 3]] * 3,
        "n_images_two_view": 2,
        "first_bytes_len": len((release / low).read_bytes()),
        "tf_loaded": False,
    }


# ---- an invalid release: default policy fails listing everything; skip_invalid reports ----


@pytest.fixture(scope="module")
def bad_release(release: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad") / "manual"
    shutil.copytree(release / "images", d / "images")
    (d.parent / "secret.jpg").write_bytes(b"outside the image root")
    t1 = _source(release, "test")[0]["image_path"]  # three views
    t2 = {**_source(release, "test")[5]["image_path"], "high_mag": None}  # two views

    def rec(no: int, path_id: str, qtype: str, views: dict, **over) -> dict:
        extra = {"wsi_name": "CMU-1", "path_id": path_id, "question_type": qtype}
        return {
            "No": no,
            "question": f"Q{no}?",
            "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
            "answer": "C",
            "rationale": "r",
            "image_path": dict(views),
            "extra_info": extra,
            **over,
        }

    test = [
        rec(1, "p1", "type_A", t1),
        rec(2, "p2", "type_A", t2),  # two-view, valid: kept
        rec(3, "p1", "type_B", {**t1, "mid_mag": "images/CMU-1/nope_40x.png"}),  # missing image
        rec(4, "p1", "type_C", {**t1, "low_mag": "../secret.jpg"}),  # escapes the root
        rec(5, "p1", "type_D", t1, answer="E"),  # answer not among the options
        rec(1, "p1", "type_E", t1),  # duplicate No
        rec(6, "p2", "type_B", t2),
    ]
    val = [rec(10, "p9", "type_A", t1), rec(11, "p9", "type_B", {**t1, "low_mag": "images/nope_10x.jpg"})]
    (d / "test.json").write_text(json.dumps(test))
    (d / "val.json").write_text(json.dumps(val))
    return d


def test_invalid_release_fails_listing_every_bad_record(bad_release: Path, tmp_path: Path):
    with pytest.raises(ValidationError) as err:
        build_scale_vqa(bad_release, tmp_path / "out")
    assert str(err.value).splitlines()[1:] == [
        "split=val index=1 No=11: image file not found: low_mag='images/nope_10x.jpg'",
        "split=test index=2 No=3: image file not found: mid_mag='images/CMU-1/nope_40x.png'",
        "split=test index=3 No=4: image path low_mag='../secret.jpg' escapes the image root "
        "(refused, not opened)",
        "split=test index=4 No=5: answer 'E' is not among the options ['A', 'B', 'C', 'D']",
        "split=test index=5 No=1: duplicate No 1 (first at index 0)",
    ]
    assert not (tmp_path / "out" / "scale_vqa" / "default" / "1.0.0").exists()  # nothing half-written


def test_skip_invalid_builds_the_rest_and_writes_a_report(bad_release: Path, tmp_path: Path):
    out = build_scale_vqa(bad_release, tmp_path / "out", skip_invalid=True)
    assert out["config"] == "skip_invalid" and out["splits"] == {"val": 1, "test": 3}
    report_path = Path(out["skip_report"])
    assert report_path == Path(out["builder_dir"]) / "skip_report.json"
    report = json.loads(report_path.read_text())
    assert report["counts"] == {
        "answer_not_in_options": 1,
        "duplicate_no": 1,
        "missing_image": 2,
        "unsafe_image_path": 1,
    }
    assert report["num_records"] == {"val": 2, "test": 7} and report["num_skipped"] == {"val": 1, "test": 4}
    assert [(s["split"], s["index"], s["No"], s["reason"]) for s in report["skipped"]] == [
        ("val", 1, 11, "missing_image"),
        ("test", 2, 3, "missing_image"),
        ("test", 3, 4, "unsafe_image_path"),
        ("test", 4, 5, "answer_not_in_options"),
        ("test", 5, 1, "duplicate_no"),
    ]
    ds = tfds.data_source("scale_vqa/skip_invalid", data_dir=tmp_path / "out", split="test")
    assert [ex["id"] for ex in ds] == [b"1", b"2", b"6"]
    assert [len(ex["images"]) for ex in ds] == [3, 2, 2]
    builder = tfds.builder_from_directory(out["builder_dir"])
    assert builder.info.metadata["validation"]["counts"] == report["counts"]


def test_empty_split_is_left_out_and_said_so(release: Path, tmp_path: Path):
    manual = tmp_path / "manual"
    shutil.copytree(release, manual)
    (manual / "val.json").write_text("[]")  # TFDS cannot write an empty split
    out = build_scale_vqa(manual, tmp_path / "out")
    assert out["splits"] == {"test": 7}
    info = tfds.builder_from_directory(out["builder_dir"]).info
    assert info.metadata["validation"]["empty_splits_left_out"] == ["val"]
    assert info.metadata["validation"]["num_records"] == {"val": 0, "test": 7}


# ---- the official test split's size ----


def _official_size_release(root: Path, patches: Path, n_triplets: int = 201, n_images: int = 540) -> int:
    """1,005 records (201 triplets x 5 types, 7% two-view) over ~540 small real-patch-derived views."""
    sources = sorted(patches.glob("cmu1_*.png"))
    tiles = [np.asarray(PIL.Image.open(p).convert("RGB")) for p in sources]
    two_view = set(range(0, n_triplets, 14))
    n_low = n_images - n_triplets - (n_triplets - len(two_view))  # low views are shared by neighbours
    made: dict[str, str] = {}

    def view(kind: str, i: int, total: str, fmt: str) -> str:
        rel = f"images/slide{i // 10}/{kind}{i}_{total}.{'jpg' if fmt == 'JPEG' else 'png'}"
        if rel not in made:
            tile = tiles[(ord(kind) + i) % len(tiles)]
            y, x = (7 * i) % 190, (13 * i) % 190
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(tile[y : y + 64, x : x + 64]).save(root / rel, format=fmt)
            made[rel] = fmt
        return rel

    items = []
    for t in range(n_triplets):
        views = {
            "low_mag": view("l", t * n_low // n_triplets, "10x", "JPEG"),
            "mid_mag": view("m", t, "40x", "PNG"),
            "high_mag": None if t in two_view else view("h", t, "200x", "JPEG" if t % 2 else "PNG"),
        }
        for k, qtype in enumerate(QUESTION_TYPES):
            items.append(
                {
                    "No": 5 * t + k,
                    "question": f"Triplet {t}: question of {qtype}?",
                    "options": {"A": "one", "B": "two", "C": "three", "D": "four"},
                    "answer": "ABCD"[(t + k) % 4],
                    "rationale": "Because of the views.",
                    "image_path": views,
                    "extra_info": {
                        "wsi_name": f"slide{t // 10}",
                        "path_id": f"triplet-{t}",
                        "question_type": qtype,
                    },
                }
            )
    (root / "test.json").write_text(json.dumps(items))
    return len(made)


def test_official_size_test_split_builds_quickly(tmp_path: Path, shared_data: Path):
    manual = tmp_path / "manual"
    n_images = _official_size_release(manual, shared_data / "patches")
    t0 = time.perf_counter()
    out = build_scale_vqa(manual, tmp_path / "out")
    seconds = time.perf_counter() - t0
    print(f"\nScale-VQA test split: 1005 records, {n_images} images, built in {seconds:.1f} s")
    assert out["splits"] == {"test": 1005} and 500 <= n_images <= 560
