"""The wsi_cross_scale TFDS builder end to end on the real slides, built with TensorFlow hidden, read back
with ``as_data_source``; failure handling and the build report."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile

from scalereasoner_jax.data import wsi, wsi_build

SLIDES = ("CMU-1-Small-Region.svs", "CMU-1-Small-Region.pyramid.tif", "CMU-1-Small-Region.3level.svs")
REPO = Path(__file__).resolve().parents[1]
CONFIG = {"magnifications": (20, 5, 10, 40), "out_size": 256, "centres_per_slide": 2, "seed": 3}

# TFDS (through etils) treats `sys.modules['tensorflow'] = None` as "TensorFlow already imported" and
# then fails on its own import, so "not installed" is simulated by a path finder that cannot see it.
HIDE_TF = textwrap.dedent(
    """
    import importlib.machinery, importlib.util, sys

    class _NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)

        def find_distributions(self, *args, **kwargs):
            return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)

        def invalidate_caches(self):
            importlib.machinery.PathFinder.invalidate_caches()

    sys.meta_path[:] = [
        _NoTensorFlow() if f is importlib.machinery.PathFinder else f for f in sys.meta_path
    ]
    assert importlib.util.find_spec("tensorflow") is None
    """
)


@pytest.fixture(scope="module")
def wsi_dir(shared_data: Path) -> Path:
    d = shared_data / "wsi"
    if not d.is_dir():
        pytest.skip(f"real slide folder not found at {d}")
    return d


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory: pytest.TempPathFactory, wsi_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("manual")
    (d / "slides").mkdir()
    for name in SLIDES:
        shutil.copy(wsi_dir / name, d / "slides" / name)
    (d / "manifest.csv").write_text(
        "slide,x,y,label,id\n"
        f"slides/{SLIDES[0]},1280,2304,skin,svs_centre\n"
        f"slides/{SLIDES[1]},1280,2304,skin,pyramid_centre\n"
        f"slides/{SLIDES[2]},1280,2304,,\n"
        f"slides/{SLIDES[0]},,,sampled,\n"
    )
    return d


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, manual_dir: Path) -> dict:
    """Build in a subprocess where TensorFlow cannot be imported, exactly as the issue asks."""
    data_dir = tmp_path_factory.mktemp("tfds")
    script = HIDE_TF + textwrap.dedent(
        f"""
        import json
        import tensorflow_datasets as tfds
        from tfds_builders.wsi_cross_scale import wsi_cross_scale_dataset_builder as mod

        config = mod.WsiCrossScaleConfig(name="test_config", **{CONFIG!r})
        builder = mod.Builder(data_dir={str(data_dir)!r}, config=config)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir={str(manual_dir)!r})
        )
        train = builder.as_data_source()["train"]
        first = train[0]
        print(json.dumps({{
            "data_path": str(builder.data_path),
            "file_format": str(builder.info.file_format.value),
            "num_examples": len(train),
            "first_shapes": [list(im.shape) for im in first["images"]],
            "tensorflow_imported": any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules),
        }}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def test_builds_without_tensorflow_as_array_record(built):
    assert built["tensorflow_imported"] is False
    assert built["file_format"] == "array_record"
    assert built["num_examples"] == 5
    assert built["first_shapes"] == [[256, 256, 3]] * 3
    version_dir = Path(built["data_path"])
    assert version_dir.name == "1.0.0" and version_dir.parent.name == "test_config"
    assert list(version_dir.glob("wsi_cross_scale-train.array_record-*"))


def test_examples_read_back(built, manual_dir):
    import tensorflow_datasets as tfds

    train = tfds.builder_from_directory(built["data_path"]).as_data_source()["train"]
    examples = {_text(ex["id"]): ex for ex in (train[i] for i in range(len(train)))}
    ref3 = f"slides/{SLIDES[2]}"
    ref0 = f"slides/{SLIDES[0]}"
    assert set(examples) == {"svs_centre", "pyramid_centre", f"{ref3}:1280_2304", f"{ref0}:t0", f"{ref0}:t1"}
    for ex in examples.values():
        assert [_text(m) for m in ex["magnifications"]] == ["5x", "10x", "20x"]  # 40x skipped, low -> high
        assert np.asarray(ex["mpp"]) == pytest.approx([1.996, 0.998, 0.499], abs=2e-3)
        assert len(ex["images"]) == 3
        for im in ex["images"]:
            assert im.shape == (256, 256, 3) and im.dtype == np.uint8
    svs = examples["svs_centre"]
    assert (_text(svs["slide"]), _text(svs["label"])) == (ref0, "skin")
    assert _text(examples[f"{ref3}:1280_2304"]["label"]) == ""
    assert np.asarray(svs["centre"]).tolist() == [1280, 2304]
    # PNG is lossless: the stored 20x view is the slide's level-0 pixels.
    with wsi.open_slide(manual_dir / ref0) as s:
        direct = np.asarray(s.read_region((1280 - 128, 2304 - 128), 0, (256, 256)))
        assert np.array_equal(svs["images"][2], direct)
        # Sampled centres are the tissue sampler's, for the config seed and this manifest row (line 5).
        fov = 256 * 4 * 0.499 / 0.499
        expected = wsi.tissue_centres(s, 2, wsi.slide_seed(3, ref0, 5), fov_level0=(fov, fov))
    assert [np.asarray(examples[f"{ref0}:t{k}"]["centre"]).tolist() for k in (0, 1)] == [
        list(c) for c in expected
    ]
    # The multi-level file read from other levels still agrees with the single-level one.
    pyr = examples["pyramid_centre"]
    for k in range(3):
        assert float(np.abs(pyr["images"][k].astype(int) - svs["images"][k].astype(int)).mean()) < 8.0


def test_build_report(built):
    report = json.loads((Path(built["data_path"]) / "build_report.json").read_text())
    assert report["slides_read"] == 3 and report["slides_failed"] == []
    assert report["examples_written"] == 5 and report["views_written"] == 15
    assert report["views_skipped"] == {"finer_than_native": 5}
    assert report["views_skipped_by_magnification"] == {"40x": {"finer_than_native": 5}}
    assert report["config"]["magnifications"] == [5.0, 10.0, 20.0, 40.0]
    by_slide = {s["slide"]: s for s in report["slides"]}
    assert by_slide[f"slides/{SLIDES[1]}"]["level_downsamples"] == pytest.approx(
        [1.0, 2.000337, 4.002024], 1e-6
    )
    assert by_slide[f"slides/{SLIDES[0]}"]["target_mpp"]["40x"] == pytest.approx(0.2495)


# ----------------------------------------------------------------------------------- failure handling


@pytest.fixture
def mixed_dir(tmp_path: Path, wsi_dir: Path) -> Path:
    """One good slide, a truncated copy and a TIFF without resolution."""
    d = tmp_path / "manual"
    d.mkdir()
    shutil.copy(wsi_dir / SLIDES[0], d / "good.svs")
    data = (wsi_dir / SLIDES[0]).read_bytes()
    (d / "cut.svs").write_bytes(data[: len(data) // 2])
    rgb = np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)
    tifffile.imwrite(d / "nores.tif", rgb, tile=(64, 64), photometric="rgb", metadata=None)
    rows = [
        {"slide": "good.svs", "x": 1280, "y": 2304, "id": "good"},
        {"slide": "cut.svs", "x": 100, "y": 100, "id": "cut"},
        {"slide": "nores.tif", "x": 300, "y": 300, "id": "nores"},
    ]
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


SMALL = {"magnifications": (10,), "out_size": 64}


def test_unreadable_slides_fail_the_build_by_default(mixed_dir, tmp_path):
    with pytest.raises(wsi.SlideError) as exc:
        wsi_build.build_wsi_cross_scale(mixed_dir, tmp_path / "data", **SMALL)
    msg = str(exc.value)
    assert "2 unreadable slide(s)" in msg and "cut.svs: cannot open" in msg and "nores.tif" in msg
    assert "assume_mpp" in msg
    assert not list((tmp_path / "data").glob("wsi_cross_scale/*/1.0.0"))  # nothing half-written


def test_unreadable_slides_skipped_and_reported(mixed_dir, tmp_path):
    report = wsi_build.build_wsi_cross_scale(mixed_dir, tmp_path / "data", skip_unreadable=True, **SMALL)
    assert report["examples_written"] == 1 and report["slides_read"] == 1
    failed = {f["slide"]: f["reason"] for f in report["slides_failed"]}
    assert set(failed) == {"cut.svs", "nores.tif"}
    assert failed["cut.svs"].startswith("cannot open") and "assume_mpp" in failed["nores.tif"]
    assert Path(report["data_dir"], "build_report.json").is_file()
    # With a resolution assumed, the TIFF without one is read.
    report2 = wsi_build.build_wsi_cross_scale(
        mixed_dir, tmp_path / "data", skip_unreadable=True, assume_mpp=0.5, **SMALL
    )
    assert report2["config_name"] != report["config_name"]
    assert [f["slide"] for f in report2["slides_failed"]] == ["cut.svs"]
    assert report2["examples_written"] == 2
    nores = next(s for s in report2["slides"] if s["slide"] == "nores.tif")
    assert nores["mpp_source"] == "assumed" and nores["mpp"] == [0.5, 0.5]


def test_build_helper_reuses_and_checks_options(mixed_dir, tmp_path):
    first = wsi_build.build_wsi_cross_scale(mixed_dir, tmp_path / "data", skip_unreadable=True, **SMALL)
    report_file = Path(first["data_dir"], "build_report.json")
    stamp = report_file.stat().st_mtime_ns
    again = wsi_build.build_wsi_cross_scale(mixed_dir, tmp_path / "data", skip_unreadable=True, **SMALL)
    assert again == first and report_file.stat().st_mtime_ns == stamp  # same options: reused, not rebuilt
    assert first["file_format"] == "array_record"
    with pytest.raises(ValueError, match="unknown wsi_cross_scale option"):
        wsi_build.build_wsi_cross_scale(mixed_dir, tmp_path / "data", magnification=(5,))


def _examples(manual: Path, **options) -> tuple[list, wsi_build.CrossScaleReport]:
    opts = wsi_build.CrossScaleOptions(**options)
    report = wsi_build.CrossScaleReport(opts)
    return list(wsi_build.iter_cross_scale_examples(wsi.find_manifest(manual), opts, report)), report


def test_manifest_problems_name_the_line(tmp_path, wsi_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(wsi_dir / SLIDES[0], d / "a.svs")
    (d / "manifest.csv").write_text("slide,x,y\na.svs,10,10\na.svs,5000,10\n")
    with pytest.raises(wsi.ManifestError, match=r"manifest.csv:3: centre \(5000, 10\) lies outside"):
        _examples(d, **SMALL)
    (d / "manifest.csv").write_text("slide,x,y\na.svs,10,10\na.svs,10,10\n")
    with pytest.raises(wsi.ManifestError, match=r"manifest.csv:3: example id .* repeats the one from line 2"):
        _examples(d, **SMALL)


def test_upsampling_when_configured(tmp_path, wsi_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(wsi_dir / SLIDES[0], d / "a.svs")
    (d / "manifest.csv").write_text("slide,x,y\na.svs,1280,2304\n")
    examples, report = _examples(d, magnifications=(20, 40), out_size=64, allow_upsample=True)
    ((_, ex),) = examples
    assert ex["magnifications"] == ["20x", "40x"] and ex["mpp"] == pytest.approx([0.499, 0.2495])
    assert report.views_upsampled == 1 and not report.views_skipped


def test_no_views_at_all_is_an_error(tmp_path, wsi_dir):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(wsi_dir / SLIDES[0], d / "a.svs")
    (d / "manifest.csv").write_text("slide,x,y\na.svs,1280,2304\n")
    with pytest.raises(RuntimeError, match="no examples were produced"):
        _examples(d, magnifications=(40,), out_size=64)


def test_config_mirrors_options_and_validates():
    from tfds_builders.wsi_cross_scale import wsi_cross_scale_dataset_builder as mod

    cfg_fields = {f.name: f.default for f in dataclasses.fields(mod.WsiCrossScaleConfig)}
    for f in dataclasses.fields(wsi_build.CrossScaleOptions):
        assert f.name in cfg_fields and cfg_fields[f.name] == f.default, f.name
    default = mod.Builder.builder_configs["default"]
    assert default.magnifications == (5.0, 10.0, 20.0) and default.out_size == 448
    assert default.centres_per_slide == 4 and default.mpp_per_magnification_numerator == 10
    assert default.assume_mpp is None and not default.allow_upsample and not default.skip_unreadable
    assert mod.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert mod.WsiCrossScaleConfig(name="x", magnifications=(20, 5)).magnifications == (5.0, 20.0)
    for bad in (
        {"magnifications": ()},
        {"magnifications": (5, 5)},
        {"out_size": 100_000},
        {"centres_per_slide": 0},
    ):
        with pytest.raises(ValueError):
            mod.WsiCrossScaleConfig(name="bad", **bad)
    meta = mod.Builder.get_metadata()
    assert "content.data-type.image" in meta.tags and meta.citation and "magnification" in meta.description
