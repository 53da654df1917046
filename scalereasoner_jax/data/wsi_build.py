"""Cross-scale view groups from whole-slide images: the example generator behind the TFDS builder.

``tfds_builders/wsi_cross_scale`` is a thin TFDS shell around :func:`iter_cross_scale_examples`; the CLI
calls :func:`build_wsi_cross_scale`. Generation needs no TensorFlow: views are encoded to PNG here with
PIL, so TFDS only stores bytes.

Failure policy: a slide that cannot be opened (missing, not a TIFF, truncated, no mpp without
``assume_mpp``) or whose pixels fail to decode is recorded in the report; the build then fails, listing
every failed slide, unless ``skip_unreadable`` is set, in which case that slide contributes no examples
(never a partial set). A view finer than the slide's resolution is skipped and counted unless
``allow_upsample`` is set. Manifest errors (bad rows, duplicate ids, a centre outside its slide) always
fail and name the manifest line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scalereasoner_jax.data import wsi

REPORT_FILENAME = "build_report.json"


@dataclasses.dataclass(frozen=True)
class CrossScaleOptions:
    """How views are cut; the TFDS builder config carries the same fields (names are contracts)."""

    magnifications: tuple[float, ...] = (5, 10, 20)
    mpp_per_magnification_numerator: float = wsi.DEFAULT_MPP_NUMERATOR
    out_size: int = 448
    centres_per_slide: int = 4
    seed: int = 0
    allow_upsample: bool = False
    skip_unreadable: bool = False
    assume_mpp: float | None = None
    mpp_tolerance: float = wsi.DEFAULT_MPP_TOLERANCE
    anchor_to_native: bool = True
    min_tissue_fraction: float = 0.5

    def __post_init__(self) -> None:
        mags = tuple(float(m) for m in self.magnifications)
        if not mags or any(not (math.isfinite(m) and m > 0) for m in mags):
            raise ValueError(f"magnifications must be positive numbers, got {self.magnifications!r}")
        if len(set(mags)) != len(mags):
            raise ValueError(f"duplicate magnifications {self.magnifications!r}")
        # Views are ordered low -> high magnification (the Scale-VQA order: low, mid, high).
        object.__setattr__(self, "magnifications", tuple(sorted(mags)))
        if not (1 <= int(self.out_size) <= wsi.MAX_OUT_SIZE):
            raise ValueError(f"out_size must be within 1..{wsi.MAX_OUT_SIZE}, got {self.out_size}")
        if self.centres_per_slide < 1:
            raise ValueError(f"centres_per_slide must be >= 1, got {self.centres_per_slide}")
        if self.mpp_per_magnification_numerator <= 0:
            raise ValueError("mpp_per_magnification_numerator must be positive")
        if not (0 <= self.mpp_tolerance < 0.5):
            raise ValueError(f"mpp_tolerance must be in [0, 0.5), got {self.mpp_tolerance}")
        if self.assume_mpp is not None and not self.assume_mpp > 0:
            raise ValueError(f"assume_mpp must be positive, got {self.assume_mpp}")
        if not (0 <= self.min_tissue_fraction <= 1):
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}")

    @classmethod
    def from_config(cls, config: Any) -> CrossScaleOptions:
        """Options from any object with the same attribute names (e.g. the TFDS builder config)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class CrossScaleReport:
    """Counts for ``build_report.json``: what was read, what failed and why, what was skipped."""

    def __init__(self, options: CrossScaleOptions, manifest: Path | None = None) -> None:
        self.options = options
        self.manifest = manifest
        self.slides: list[dict[str, Any]] = []
        self.failed: list[dict[str, str]] = []
        self.views_written = 0
        self.views_upsampled = 0
        self.views_skipped: Counter[str] = Counter()
        self.views_skipped_by_mag: dict[str, Counter[str]] = defaultdict(Counter)
        self.examples_written = 0
        self.examples_skipped: Counter[str] = Counter()
        self.slides_without_tissue: list[str] = []

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": None if self.manifest is None else str(self.manifest),
            "config": self.options.to_dict(),
            "slides_total": len(self.slides) + len(self.failed),
            "slides_read": len(self.slides),
            "slides_failed": list(self.failed),
            "slides_without_tissue": list(self.slides_without_tissue),
            "views_written": self.views_written,
            "views_upsampled": self.views_upsampled,
            "views_skipped": dict(self.views_skipped),
            "views_skipped_by_magnification": {k: dict(v) for k, v in self.views_skipped_by_mag.items()},
            "examples_written": self.examples_written,
            "examples_skipped": dict(self.examples_skipped),
            "slides": list(self.slides),
        }


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclasses.dataclass
class _Job:
    entry: wsi.ManifestEntry
    id: str
    centre: tuple[int, int] | None  # None: sampled on tissue
    sample_index: int = 0


def _plan_jobs(entries: list[wsi.ManifestEntry], options: CrossScaleOptions, manifest: Path) -> list[_Job]:
    """Example ids for every row (sampled centres get ``<id or slide>:t<k>``); ids must be unique."""
    jobs: list[_Job] = []
    seen: dict[str, int] = {}
    for e in entries:
        if e.centre is not None:
            ids = [(e.id or f"{e.slide_ref}:{e.centre[0]}_{e.centre[1]}", e.centre, 0)]
        else:
            ids = [(f"{e.id or e.slide_ref}:t{k}", None, k) for k in range(options.centres_per_slide)]
        for ident, centre, k in ids:
            if ident in seen:
                raise wsi.ManifestError(
                    manifest, e.line, f"example id {ident!r} repeats the one from line {seen[ident]}"
                )
            seen[ident] = e.line
            jobs.append(_Job(e, ident, centre, k))
    return jobs


def _slide_examples(
    path: Path,
    jobs: list[_Job],
    options: CrossScaleOptions,
    report: CrossScaleReport,
    manifest: Path,
) -> list[tuple[str, dict[str, Any]]]:
    """All examples of one slide (built fully before any is yielded: a slide fails as a whole)."""
    slide = wsi.open_slide(path, assume_mpp=options.assume_mpp)
    ref = jobs[0].entry.slide_ref
    with slide:
        mpps = wsi.magnification_mpps(
            slide,
            options.magnifications,
            numerator=options.mpp_per_magnification_numerator,
            tolerance=options.mpp_tolerance,
            anchor_to_native=options.anchor_to_native,
        )
        w0, h0 = slide.dimensions
        t_max = max(mpps.values())
        fov = (options.out_size * t_max / slide.mpp[0], options.out_size * t_max / slide.mpp[1])
        info: dict[str, Any] = {
            "slide": ref,
            "path": str(path),
            "mpp": list(slide.mpp),
            "mpp_source": slide.mpp_source,
            "objective_power": slide.objective_power,
            "dimensions": list(slide.dimensions),
            "level_downsamples": list(slide.level_downsamples),
            "target_mpp": {wsi.format_magnification(m): t for m, t in mpps.items()},
            "centres_sampled": 0,
            "examples": 0,
        }
        # Sampled centres, per manifest row (several rows of one slide draw different centres).
        sampled: dict[int, list[tuple[int, int]]] = {}
        for job in jobs:
            if job.centre is None and job.entry.line not in sampled:
                sampled[job.entry.line] = wsi.tissue_centres(
                    slide,
                    options.centres_per_slide,
                    wsi.slide_seed(options.seed, ref, job.entry.line),
                    fov_level0=fov,
                    min_tissue_fraction=options.min_tissue_fraction,
                )
                info["centres_sampled"] += len(sampled[job.entry.line])
                if not sampled[job.entry.line]:
                    report.slides_without_tissue.append(ref)
        out: list[tuple[str, dict[str, Any]]] = []
        for job in jobs:
            if job.centre is not None:
                centre = job.centre
                if not (0 <= centre[0] < w0 and 0 <= centre[1] < h0):
                    raise wsi.ManifestError(
                        manifest,
                        job.entry.line,
                        f"centre {centre} lies outside the {w0} x {h0} slide {ref!r}",
                    )
            else:
                pts = sampled[job.entry.line]
                if job.sample_index >= len(pts):
                    report.examples_skipped["no_tissue_centre"] += 1
                    continue
                centre = pts[job.sample_index]
            images, mags, view_mpps = [], [], []
            for m, target in mpps.items():
                name = wsi.format_magnification(m)
                try:
                    plan = wsi.plan_view(
                        slide,
                        centre,
                        target,
                        options.out_size,
                        allow_upsample=options.allow_upsample,
                        mpp_tolerance=options.mpp_tolerance,
                    )
                except wsi.ViewUnavailable as e:
                    report.views_skipped[e.reason] += 1
                    report.views_skipped_by_mag[name][e.reason] += 1
                    continue
                images.append(_png(wsi.render_view(slide, plan)))
                mags.append(name)
                view_mpps.append(float(np.mean(plan.mpp)))
                report.views_upsampled += int(plan.upsampled)
            if not images:
                report.examples_skipped["no_views"] += 1
                continue
            out.append(
                (
                    job.id,
                    {
                        "id": job.id,
                        "slide": ref,
                        "centre": np.asarray(centre, np.int64),
                        "label": job.entry.label,
                        "images": images,
                        "magnifications": mags,
                        "mpp": np.asarray(view_mpps, np.float32),
                    },
                )
            )
        info["examples"] = len(out)
    report.slides.append(info)
    return out


def iter_cross_scale_examples(
    manifest: str | os.PathLike[str],
    options: CrossScaleOptions,
    report: CrossScaleReport,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, example)`` pairs for every manifest row, filling ``report`` as it goes.

    Every slide is opened once up front, so all unreadable slides are named together before anything
    is written (and the build fails unless ``skip_unreadable``).
    """
    manifest = Path(manifest)
    entries = wsi.read_manifest(manifest)
    jobs = _plan_jobs(entries, options, manifest)
    by_slide: dict[Path, list[_Job]] = {}
    for job in jobs:
        by_slide.setdefault(job.entry.slide, []).append(job)

    def fail(path: Path, jobs_: list[_Job], err: wsi.SlideError) -> None:
        report.failed.append({"slide": jobs_[0].entry.slide_ref, "path": str(path), "reason": err.reason})

    bad: set[Path] = set()
    for path, slide_jobs in by_slide.items():
        try:
            wsi.open_slide(path, assume_mpp=options.assume_mpp).close()
        except wsi.SlideError as e:
            fail(path, slide_jobs, e)
            bad.add(path)
    if bad and not options.skip_unreadable:
        raise wsi.SlideError(_failure_summary(report))
    for path, slide_jobs in by_slide.items():
        if path in bad:
            continue
        try:
            examples = _slide_examples(path, slide_jobs, options, report, manifest)
        except wsi.SlideError as e:
            fail(path, slide_jobs, e)
            if not options.skip_unreadable:
                raise wsi.SlideError(_failure_summary(report)) from e
            continue
        for key, example in examples:
            report.views_written += len(example["images"])
            report.examples_written += 1
            yield key, example
    if report.examples_written == 0:
        raise RuntimeError(f"no examples were produced from {manifest}: {json.dumps(report.to_dict())}")


def _failure_summary(report: CrossScaleReport) -> str:
    lines = [f"{len(report.failed)} unreadable slide(s) (set skip_unreadable to build without them):"]
    lines += [f"  {f['slide']}: {f['reason']}" for f in report.failed]
    return "\n".join(lines)


def config_name_for(config: dict[str, Any]) -> str:
    """A stable config name for custom options: equal options -> equal name -> TFDS reuses the build."""
    opts = CrossScaleOptions(**config).to_dict()
    digest = hashlib.sha1(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:10]
    return f"custom_{digest}"


def build_wsi_cross_scale(
    manual_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    config_name: str | None = None,
    file_format: str = "array_record",
    overwrite: bool = False,
    **config: Any,
) -> dict[str, Any]:
    """Build (or reuse) the ``wsi_cross_scale`` TFDS dataset; returns the build report plus its location.

    ``config`` holds :class:`CrossScaleOptions` fields; without any, the builder's ``default`` config is
    used. Custom options get a name derived from their values unless ``config_name`` is given.
    """
    import tensorflow_datasets as tfds

    from tfds_builders.wsi_cross_scale import wsi_cross_scale_dataset_builder as mod

    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(CrossScaleOptions)})
    if unknown:
        raise ValueError(f"unknown wsi_cross_scale option(s) {unknown}")
    if config:
        name = config_name or config_name_for(config)
        cfg: Any = mod.WsiCrossScaleConfig(name=name, **config)
    else:
        cfg = config_name or "default"
    builder = mod.Builder(data_dir=os.fspath(data_dir), config=cfg)
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), download_mode=mode),
        file_format=file_format,
    )
    report = json.loads((builder.data_path / REPORT_FILENAME).read_text())
    report["data_dir"] = os.fspath(builder.data_path)
    report["config_name"] = builder.builder_config.name
    report["file_format"] = str(builder.info.file_format.value)
    return report
