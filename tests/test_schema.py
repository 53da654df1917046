"""Scale-VQA record validation: every problem named by split, index and No; images checked by header only."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import PIL.Image
import pytest

from scalereasoner_jax.data import schema
from scalereasoner_jax.data.schema import Reason, ValidationError, ValidationPolicy, load_split

OPTIONS = {"A": "Glands", "B": "Lymphocytes", "C": "Necrosis", "D": "Fat"}


def _crop(src: Path, path: Path, fmt: str, size: int = 32) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.open(src).convert("RGB").crop((0, 0, size, size)).save(path, format=fmt)
    return path.name


def _record(no: int, path_id: str, qtype: str, views: dict[str, str | None], **over) -> dict:
    rec = {
        "No": no,
        "question": f"Question {no}?",
        "options": dict(OPTIONS),
        "answer": "B",
        "rationale": "Because.",
        "image_path": {
            "low_mag": views.get("low"),
            "mid_mag": views.get("mid"),
            "high_mag": views.get("high"),
        },
        "extra_info": {"wsi_name": "CMU-1", "path_id": path_id, "question_type": qtype},
    }
    rec.update(over)
    return rec


@pytest.fixture
def root(tmp_path: Path, shared_data: Path) -> Path:
    """An image root with one real three-view triplet (JPEG low, PNG mid and high)."""
    r, patches = tmp_path / "release", shared_data / "patches"
    _crop(patches / "cmu1_x768_y1792_5x_mpp1.996_256px.png", r / "img" / "t1_10x.jpg", "JPEG")
    _crop(patches / "cmu1_x1024_y2048_10x_mpp0.998_256px.png", r / "img" / "t1_40x.png", "PNG")
    _crop(patches / "cmu1_x1152_y2176_20x_mpp0.499_256px.png", r / "img" / "t1_200x.png", "PNG")
    (r / "kather1.tif").write_bytes((patches / "kather1.tif").read_bytes())
    return r


V3 = {"low": "img/t1_10x.jpg", "mid": "img/t1_40x.png", "high": "img/t1_200x.png"}


def _write(root: Path, items: list) -> Path:
    p = root / "test.json"
    p.write_text(json.dumps(items))
    return p


def test_valid_records_parse_in_order(root: Path):
    items = [_record(1, "p1", "type_A", V3), _record(2, "p1", "type_B", {**V3, "high": None})]
    records, report = load_split(_write(root, items), root, "test")
    assert report.ok and report.num_records == {"test": 2} and report.num_kept == {"test": 2}
    r0, r1 = records
    assert (r0.id, r0.index, r0.split, r0.answer, r0.question_type) == ("1", 0, "test", "B", "type_A")
    assert list(r0.options) == ["A", "B", "C", "D"]
    assert r0.magnifications == ["low", "mid", "high"]
    assert r1.magnifications == ["low", "mid"]  # `high_mag: null`: a two-view record, kept
    assert r0.image_files(root) == [root / V3["low"], root / V3["mid"], root / V3["high"]]
    assert r1.to_release_json() == items[1]


def test_default_policy_fails_listing_every_problem(root: Path):
    outside = root.parent / "outside.png"
    outside.write_bytes((root / V3["mid"]).read_bytes())  # exists: must still be refused, never opened
    items = [
        _record(1, "p1", "type_A", V3),
        _record(2, "p1", "type_B", {**V3, "mid": "img/nope_40x.png"}),
        _record(3, "p1", "type_C", {**V3, "low": "../outside.png"}),
        _record(4, "p1", "type_D", {**V3, "high": "/etc/hostname"}),
        _record(5, "p1", "type_E", V3, answer="E"),
        _record(1, "p2", "type_A", V3),
        _record(7, "p1", "type_A", V3),
        _record(8, "p3", "type_A", V3, options={"A": "x", "C": "y"}, answer="A"),
        {k: v for k, v in _record(9, "p4", "type_A", V3).items() if k != "rationale"},
        _record(10, "p5", "type_F", V3),
        "not a record",
    ]
    with pytest.raises(ValidationError) as err:
        load_split(_write(root, items), root, "test")
    lines = str(err.value).splitlines()
    assert lines[0].startswith("10 invalid Scale-VQA record(s), 10 problem(s)")
    assert lines[1:] == [
        "split=test index=1 No=2: image file not found: mid_mag='img/nope_40x.png'",
        "split=test index=2 No=3: image path low_mag='../outside.png' escapes the image root "
        "(refused, not opened)",
        "split=test index=3 No=4: image path high_mag='/etc/hostname' is absolute (refused, not opened)",
        "split=test index=4 No=5: answer 'E' is not among the options ['A', 'B', 'C', 'D']",
        "split=test index=5 No=1: duplicate No 1 (first at index 0)",
        "split=test index=6 No=7: duplicate (path_id, question_type) = ('p1', 'type_A') "
        "(first at index 0, No=1)",
        "split=test index=7 No=8: option keys ['A', 'C'] are not consecutive letters from A (at least A, B)",
        "split=test index=8 No=9: missing field 'rationale'",
        "split=test index=9 No=10: question_type 'type_F' is not one of "
        "type_A, type_B, type_C, type_D, type_E",
        "split=test index=10 No=?: record is not a JSON object",
    ]
    report = err.value.report
    assert report.counts() == {
        "answer_not_in_options": 1,
        "bad_question_type": 1,
        "duplicate_no": 1,
        "duplicate_path_id_question_type": 1,
        "missing_field": 1,
        "missing_image": 1,
        "not_an_object": 1,
        "option_keys": 1,
        "unsafe_image_path": 2,
    }


def test_skip_invalid_keeps_the_rest_and_reports(root: Path):
    items = [
        _record(1, "p1", "type_A", V3),
        _record(2, "p1", "type_B", {**V3, "mid": "img/nope_40x.png"}, answer="Z"),  # two problems, one record
        _record(3, "p1", "type_C", {**V3, "high": None}),
    ]
    records, report = load_split(_write(root, items), root, "test", ValidationPolicy(skip_invalid=True))
    assert [r.no for r in records] == [1, 3]
    assert report.bad_records() == [("test", 1, 2)]
    out = report.to_json()
    assert out["counts"] == {"answer_not_in_options": 1, "missing_image": 1}
    assert out["num_records"] == {"test": 3} and out["num_kept"] == {"test": 2}
    assert out["num_skipped"] == {"test": 1}
    assert [(s["split"], s["index"], s["No"], s["reason"]) for s in out["skipped"]] == [
        ("test", 1, 2, "answer_not_in_options"),
        ("test", 1, 2, "missing_image"),
    ]


def test_unsafe_paths_are_never_opened(root: Path, monkeypatch: pytest.MonkeyPatch):
    opened: list[str] = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    items = [
        _record(1, "p1", "type_A", {**V3, "low": "../release/img/t1_10x.jpg"}),
        _record(2, "p1", "type_B", {**V3, "low": "img\\..\\..\\x.png"}),
        _record(3, "p1", "type_C", {**V3, "low": "C:\\x.png"}),
    ]
    _, report = load_split(_write(root, items), root, "test", ValidationPolicy(skip_invalid=True))
    assert [p.reason for p in report.problems] == [Reason.UNSAFE_IMAGE_PATH] * 3
    assert set(opened) == {str(root / V3["mid"]), str(root / V3["high"])}  # only the safe views
    with pytest.raises(schema.UnsafeImagePath, match=r"'\.\./x\.png' escapes the image root"):
        schema.resolve_image_path(root, "../x.png")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds no pixel data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_pixel_bound_reads_headers_only(root: Path):
    _png_header_only(root / "img" / "bomb_200x.png", 100_000, 100_000)
    _png_header_only(root / "img" / "big_200x.png", 9_000, 9_000)
    (root / "img" / "junk_200x.png").write_bytes(b"not an image")
    PIL.Image.open(root / "kather1.tif").save(root / "img" / "tiff_200x.tif")
    items = [
        _record(1, "p1", "type_A", {**V3, "high": "img/bomb_200x.png"}),
        _record(2, "p1", "type_B", {**V3, "high": "img/big_200x.png"}),
        _record(3, "p1", "type_C", {**V3, "high": "img/junk_200x.png"}),
        _record(4, "p1", "type_D", {**V3, "high": "img/tiff_200x.tif"}),
        _record(5, "p1", "type_E", V3),
    ]
    t0 = time.perf_counter()
    _, report = load_split(_write(root, items), root, "test", ValidationPolicy(skip_invalid=True))
    assert time.perf_counter() - t0 < 5  # nothing was decoded
    msgs = [str(p) for p in report.problems]
    assert msgs[0] == (
        "split=test index=0 No=1: image high_mag='img/bomb_200x.png' has 10000000000 pixels, above the bound "
        "of 67108864 (max_image_pixels)"
    )
    assert msgs[1] == (
        "split=test index=1 No=2: image high_mag='img/big_200x.png' is 9000x9000 = 81000000 pixels, "
        "above the bound of 67108864 (max_image_pixels)"
    )
    assert msgs[2].startswith(
        "split=test index=2 No=3: image high_mag='img/junk_200x.png' is not a readable image"
    )
    assert (
        msgs[3]
        == "split=test index=3 No=4: image high_mag='img/tiff_200x.tif' is TIFF; accepted formats: JPEG, PNG"
    )
    assert len(msgs) == 4
    # The bound is configurable: a tight one rejects the real 32 px views too.
    _, tight = load_split(
        _write(root, [_record(1, "p1", "type_A", V3)]),
        root,
        "test",
        ValidationPolicy(skip_invalid=True, max_image_pixels=32 * 32 - 1),
    )
    assert tight.counts() == {"image_too_large": 3}


def test_bad_types_and_nulls(root: Path):
    items = [
        _record(True, "p1", "type_A", V3),  # a bool is not an integer No
        _record(2, "p1", "type_B", {**V3, "low": None}),
        _record(3, "p1", "type_C", V3, question=7, options={"A": "x", "B": 2}),
    ]
    _, report = load_split(_write(root, items), root, "test", ValidationPolicy(skip_invalid=True))
    assert [str(p) for p in report.problems] == [
        "split=test index=0 No=True: field 'No' must be an integer, got bool",
        "split=test index=1 No=2: missing field 'image_path.low_mag'",
        "split=test index=2 No=3: field 'question' must be a string, got int",
        "split=test index=2 No=3: option 'B' must be a string, got int",
    ]


def test_file_level_errors(tmp_path: Path):
    (tmp_path / "test.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_split(tmp_path / "test.json", tmp_path, "test")
    (tmp_path / "test.json").write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_split(tmp_path / "test.json", tmp_path, "test")
    (tmp_path / "val.json").write_text("[]")
    assert schema.find_split_files(tmp_path) == {"val": tmp_path / "val.json", "test": tmp_path / "test.json"}
