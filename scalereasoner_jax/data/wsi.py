"""Whole-slide images -> fields of view at chosen magnifications (tiffslide; no TensorFlow, no TFDS).

Scale-VQA items show one place at several magnifications, so every view here is defined by a centre in
level-0 pixels, a target resolution in micrometres per pixel (mpp) and an output size. Conventions, all
chosen so that views from different pyramids of the same pixels agree and so that the shared reference
patches are reproduced bit for bit:

* Coordinates are continuous with pixel ``i`` covering ``[i, i + 1)``. A centre ``(x, y)`` is the point at
  that coordinate, so an even-sized native view centred on integer ``(x, y)`` starts at ``x - out/2``.
* The slide's own mpp comes from ``tiffslide.mpp-x/y`` or ``openslide.mpp-x/y``; a slide without it is an
  error unless ``assume_mpp`` is given (the slide's own value always wins). A level's mpp is the level-0
  mpp times that level's per-axis downsample (``level-0 width / level width``): ``level_downsamples``
  are read, never assumed to be powers of two.
* Tolerance (``mpp_tolerance``, default 2 %): a level whose mpp is within the tolerance of the target is
  read as it is, without resampling (a 20x target, 0.5 mpp, on a 0.499 mpp slide returns level-0 pixels
  exactly) and the view records the level's true mpp. Otherwise the coarsest level whose mpp is at most
  the target (plus tolerance) is read and resized to exactly the target mpp. A target finer than level 0
  (beyond the tolerance) raises :class:`ViewUnavailable` unless ``allow_upsample`` is set.
* Resampling uses PIL's LANCZOS filter (antialiased: its support widens with the reduction factor) over
  exactly the field of view (a float box), with only the pixels the field of view touches. That is the
  filter the derived pyramid levels and the shared patches were made with. Whole-pixel aligned native
  views are plain copies; a native view whose centre falls between level pixels is shifted by the same
  filter instead of being rounded to the level grid (so different pyramids agree on where a view lies).
* Outside the slide the view is filled with the slide's background colour (white if unset).
* :func:`magnification_mpps` turns magnifications into target mpps (``numerator / magnification``,
  numerator 10 by default). When the slide's native mpp is within the tolerance of a nominal
  magnification (its objective power, else one of the requested ones), the ladder is anchored to the
  slide's true mpp: on a 0.499 mpp "20x" slide, 10x is 0.998 mpp (exactly 2x level 0), not 1.0.

Limits: ``out_size`` at most :data:`MAX_OUT_SIZE` per side; a read window at most :data:`MAX_READ_SIDE`
level pixels per side (a coarse view from a slide without pyramid levels can otherwise ask for gigabytes).

Manifests (:func:`read_manifest`): CSV with a header, or JSON Lines, with ``slide`` (required), optional
``x`` and ``y`` (level-0 centre, both or neither, rounded to whole pixels), ``label`` and ``id``; other
columns are errors, and every error names the line. Relative slide paths are resolved against the
manifest's folder and may not leave it (``..`` is refused); an absolute path is taken as an explicit
choice and allowed. Symlinks inside the folder are followed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MAX_OUT_SIZE = 4096
MAX_READ_SIDE = 16384
DEFAULT_MPP_TOLERANCE = 0.02
DEFAULT_MPP_NUMERATOR = 10.0
_SNAP = 1e-6  # box coordinates this close to an integer are treated as that integer
_RELAX = 0.8  # tissue_centres: accept fields of view within 80 % of the best tissue fraction available

_MPP_KEYS = (("tiffslide.mpp-x", "tiffslide.mpp-y"), ("openslide.mpp-x", "openslide.mpp-y"))
_POWER_KEYS = ("tiffslide.objective-power", "openslide.objective-power")
_BACKGROUND_KEYS = ("tiffslide.background-color", "openslide.background-color")


class SlideError(RuntimeError):
    """A slide that cannot be opened or read (missing, not a TIFF, truncated, corrupt tiles)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        self.path = None if path is None else str(path)
        self.reason = message
        super().__init__(f"{path}: {message}" if path is not None else message)


class MissingMppError(SlideError):
    """The slide carries no resolution and no ``assume_mpp`` was given."""


class ViewUnavailable(ValueError):
    """A view that cannot be made at the requested scale; ``reason`` is a short code for reports."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class ManifestError(ValueError):
    """A manifest problem; the message names the file and line."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------------------------- slides


def mpp_from_properties(props: dict[str, Any]) -> tuple[float, float] | None:
    """The (x, y) mpp from tiffslide or OpenSlide property names, or None if absent or not positive."""
    for kx, ky in _MPP_KEYS:
        vx, vy = props.get(kx), props.get(ky)
        if vx is None and vy is None:
            continue
        try:
            fx = float(vx if vx is not None else vy)
            fy = float(vy if vy is not None else vx)
        except (TypeError, ValueError):
            continue
        if math.isfinite(fx) and math.isfinite(fy) and fx > 0 and fy > 0:
            return fx, fy
    return None


def _objective_power(props: dict[str, Any]) -> float | None:
    for k in _POWER_KEYS:
        try:
            v = float(props.get(k))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            return v
    return None


def _background(props: dict[str, Any]) -> tuple[int, int, int]:
    for k in _BACKGROUND_KEYS:
        v = props.get(k)
        if isinstance(v, str) and len(v.lstrip("#")) == 6:
            try:
                h = v.lstrip("#")
                return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
            except ValueError:
                pass
    return 255, 255, 255


class Slide:
    """An opened slide: resolution, pyramid geometry and a tiffslide handle for reading."""

    def __init__(
        self,
        path: Path,
        handle: Any,
        mpp: tuple[float, float],
        mpp_source: str,
    ) -> None:
        props = handle.properties
        self.path = path
        self.handle = handle
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        self.objective_power = _objective_power(props)
        self.vendor: str | None = props.get("tiffslide.vendor") or props.get("openslide.vendor")
        self.background = _background(props)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_downsample_xy(self, level: int) -> tuple[float, float]:
        """Per-axis downsample of a level (tiffslide averages the two; views need each axis exactly)."""
        w0, h0 = self.level_dimensions[0]
        w, h = self.level_dimensions[level]
        return w0 / w, h0 / h

    def level_mpp(self, level: int) -> tuple[float, float]:
        """The (x, y) mpp of a level."""
        dx, dy = self.level_downsample_xy(level)
        return self.mpp[0] * dx, self.mpp[1] * dy

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """tiffslide/OpenSlide ``read_region`` (level-0 location), as RGB; errors become SlideError."""
        try:
            return self.handle.read_region(location, level, size).convert("RGB")
        except Exception as e:
            raise SlideError(f"cannot read region: {type(e).__name__}: {e}", self.path) from e

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, mpp={self.mpp}, levels={self.level_dimensions}, "
            f"downsamples={self.level_downsamples}, objective_power={self.objective_power})"
        )


def _check_tile_extents(handle: Any, path: Path) -> None:
    """Refuse a slide whose pyramid tiles point past the end of the file (a truncated copy).

    Costs only the offset tables, so a truncated slide is reported when opened, not halfway through.
    """
    tf = handle.ts_tifffile
    size = tf.filehandle.size
    series = tf.series[handle.properties["tiffslide.series-index"]]
    for lvl, level in enumerate(series.levels):
        for page in level.pages:
            if page is None:
                continue
            offsets = np.asarray(getattr(page, "dataoffsets", ()), np.int64)
            counts = np.asarray(getattr(page, "databytecounts", ()), np.int64)
            if offsets.shape != counts.shape or offsets.size == 0:
                continue
            ends = np.where(counts > 0, offsets + counts, 0)  # zero-length tiles are legal (sparse)
            if ends.max() > size:
                raise SlideError(
                    f"truncated or corrupt: level {lvl} data ends at byte {int(ends.max())} "
                    f"but the file has {size} bytes",
                    path,
                )


def open_slide(
    path: str | os.PathLike[str],
    assume_mpp: float | None = None,
    *,
    check_integrity: bool = True,
) -> Slide:
    """Open a slide with tiffslide; any failure is a :class:`SlideError` (never a raw library error).

    ``assume_mpp`` only fills in a missing resolution. ``check_integrity`` verifies from the offset
    tables that every pyramid tile lies inside the file (cheap; catches truncated copies).
    """
    import tiffslide

    p = Path(path)
    if not p.is_file():
        raise SlideError("file not found", p)
    if assume_mpp is not None and not (math.isfinite(assume_mpp) and assume_mpp > 0):
        raise ValueError(f"assume_mpp must be a positive number, got {assume_mpp!r}")
    try:
        handle = tiffslide.TiffSlide(p)
        props = handle.properties
        _ = handle.level_dimensions, handle.level_downsamples
    except Exception as e:
        raise SlideError(f"cannot open: {type(e).__name__}: {e}", p) from e
    try:
        if check_integrity:
            _check_tile_extents(handle, p)
        mpp = mpp_from_properties(props)
        if mpp is not None:
            source = "tiffslide.mpp" if props.get("tiffslide.mpp-x") is not None else "openslide.mpp"
        elif assume_mpp is not None:
            mpp, source = (float(assume_mpp), float(assume_mpp)), "assumed"
        else:
            raise MissingMppError("no resolution (mpp) in the slide; set assume_mpp to use it anyway", p)
        return Slide(p, handle, mpp, source)
    except SlideError:
        handle.close()
        raise
    except Exception as e:
        handle.close()
        raise SlideError(f"cannot read metadata: {type(e).__name__}: {e}", p) from e


# ---------------------------------------------------------------------------------------------- views


@dataclass(frozen=True)
class ViewPlan:
    """Where a view comes from: level, float box and integer read window (level pixels), and its mpp."""

    level: int
    box: tuple[float, float, float, float]
    window: tuple[int, int, int, int]
    out_size: tuple[int, int]
    mpp: tuple[float, float]
    target_mpp: float
    native: bool
    upsampled: bool


def _out_size(out_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(out_size, int | np.integer):
        w = h = int(out_size)
    else:
        w, h = (int(v) for v in out_size)
    if not (1 <= w <= MAX_OUT_SIZE and 1 <= h <= MAX_OUT_SIZE):
        raise ValueError(f"out_size must be within 1..{MAX_OUT_SIZE} per side, got {out_size!r}")
    return w, h


def _snap(v: float) -> float:
    r = round(v)
    return float(r) if abs(v - r) < _SNAP else v


def plan_view(
    slide: Slide,
    centre_xy_level0: Sequence[float],
    target_mpp: float,
    out_size: int | Sequence[int],
    *,
    allow_upsample: bool = False,
    mpp_tolerance: float = DEFAULT_MPP_TOLERANCE,
) -> ViewPlan:
    """Choose the pyramid level and the exact region for a view (no pixels read)."""
    out_w, out_h = _out_size(out_size)
    if not (math.isfinite(target_mpp) and target_mpp > 0):
        raise ValueError(f"target_mpp must be a positive number, got {target_mpp!r}")
    cx, cy = (float(v) for v in centre_xy_level0)
    if not (math.isfinite(cx) and math.isfinite(cy)):
        raise ValueError(f"centre must be finite, got {centre_xy_level0!r}")
    tol = float(mpp_tolerance)
    mx0, my0 = slide.level_mpp(0)
    finer = target_mpp < mx0 * (1 - tol) or target_mpp < my0 * (1 - tol)
    if finer and not allow_upsample:
        raise ViewUnavailable(
            "finer_than_native",
            f"target {target_mpp:.4g} mpp is finer than the slide's {max(mx0, my0):.4g} mpp "
            "(set allow_upsample to upsample)",
        )
    # Coarsest level whose mpp does not exceed the target (with tolerance); level 0 always qualifies.
    level = 0
    for lvl in range(1, slide.level_count):
        mx, my = slide.level_mpp(lvl)
        fits = mx <= target_mpp * (1 + tol) and my <= target_mpp * (1 + tol)
        if fits and mx * my > math.prod(slide.level_mpp(level)):
            level = lvl
    mx, my = slide.level_mpp(level)
    native = abs(mx / target_mpp - 1) <= tol and abs(my / target_mpp - 1) <= tol
    if native:
        sx = sy = 1.0  # level pixels per output pixel
        mpp = (mx, my)
    else:
        sx, sy = target_mpp / mx, target_mpp / my
        mpp = (float(target_mpp), float(target_mpp))
    dx, dy = slide.level_downsample_xy(level)
    u, v = cx / dx, cy / dy
    box = (
        _snap(u - out_w * sx / 2),
        _snap(v - out_h * sy / 2),
        _snap(u + out_w * sx / 2),
        _snap(v + out_h * sy / 2),
    )
    window = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
    if max(window[2] - window[0], window[3] - window[1]) > MAX_READ_SIDE:
        raise ViewUnavailable(
            "region_too_large",
            f"the view needs a {window[2] - window[0]} x {window[3] - window[1]} pixel read at level "
            f"{level} (limit {MAX_READ_SIDE}); the slide lacks a coarse enough pyramid level",
        )
    return ViewPlan(
        level=level,
        box=box,
        window=window,
        out_size=(out_w, out_h),
        mpp=mpp,
        target_mpp=float(target_mpp),
        native=native,
        upsampled=not native and (sx < 1 or sy < 1),
    )


def _level0_location(handle: Any, level: int, lx: int, ly: int) -> tuple[int, int]:
    """A level-0 location that tiffslide's ``read_region`` maps to level pixel (lx, ly) exactly.

    read_region converts with ``int(location / averaged_downsample)``; invert that per axis rather than
    trusting a multiplication to round the same way.
    """
    ds = float(handle.level_downsamples[level])
    out = []
    for target in (lx, ly):
        loc = math.ceil(target * ds)
        while loc > 0 and int(loc / ds) > target:
            loc -= 1
        while int(loc / ds) < target:
            loc += 1
        if int(loc / ds) != target:
            raise SlideError(f"cannot address level {level} pixel {target} with downsample {ds}")
        out.append(loc)
    return out[0], out[1]


def _to_rgb(arr: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise SlideError(f"unsupported sample type {arr.dtype} (8-bit slides only)")
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[-1]
    if c == 3:
        return arr
    if c == 1:
        return np.repeat(arr, 3, axis=-1)
    if c == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        bg = np.asarray(background, np.float32)
        return np.round(arr[..., :3] * alpha + bg * (1 - alpha)).astype(np.uint8)
    raise SlideError(f"unsupported channel count {c}")


def read_level_window(slide: Slide, level: int, window: tuple[int, int, int, int]) -> np.ndarray:
    """Level pixels ``[x0, x1) x [y0, y1)`` as uint8 RGB, filled with the background outside the slide."""
    x0, y0, x1, y1 = window
    lw, lh = slide.level_dimensions[level]
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    out[...] = np.asarray(slide.background, np.uint8)
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)
    if ix1 <= ix0 or iy1 <= iy0:
        return out
    try:
        loc = _level0_location(slide.handle, level, ix0, iy0)
        arr = np.asarray(
            slide.handle.read_region(loc, level, (ix1 - ix0, iy1 - iy0), as_array=True, padding=False)
        )
        arr = _to_rgb(arr, slide.background)
    except SlideError as e:
        raise SlideError(e.reason, slide.path) from e
    except Exception as e:
        raise SlideError(
            f"cannot read level {level} window {window}: {type(e).__name__}: {e}", slide.path
        ) from e
    if arr.shape[:2] != (iy1 - iy0, ix1 - ix0):
        raise SlideError(
            f"level {level} read returned shape {arr.shape}, expected window {window}", slide.path
        )
    out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = arr
    return out


def render_view(slide: Slide, plan: ViewPlan) -> Image.Image:
    """Read and resample the pixels of a planned view (see the module notes for the filter)."""
    arr = read_level_window(slide, plan.level, plan.window)
    img = Image.fromarray(arr, mode="RGB")
    wx0, wy0 = plan.window[0], plan.window[1]
    rel = (plan.box[0] - wx0, plan.box[1] - wy0, plan.box[2] - wx0, plan.box[3] - wy0)
    if rel == (0.0, 0.0, float(plan.out_size[0]), float(plan.out_size[1])) and img.size == plan.out_size:
        out = img  # whole-pixel native view: the level's own pixels, untouched
    else:
        out = img.resize(plan.out_size, Image.Resampling.LANCZOS, box=rel)
    out.info["mpp"] = plan.mpp
    out.info["level"] = plan.level
    return out


def read_view(
    slide: Slide,
    centre_xy_level0: Sequence[float],
    target_mpp: float,
    out_size: int | Sequence[int],
    *,
    allow_upsample: bool = False,
    mpp_tolerance: float = DEFAULT_MPP_TOLERANCE,
) -> Image.Image:
    """One RGB view centred on a level-0 point at ``target_mpp``; ``info['mpp']`` holds its true mpp.

    Raises :class:`ViewUnavailable` (``finer_than_native`` / ``region_too_large``) and
    :class:`SlideError` for unreadable pixels.
    """
    plan = plan_view(
        slide,
        centre_xy_level0,
        target_mpp,
        out_size,
        allow_upsample=allow_upsample,
        mpp_tolerance=mpp_tolerance,
    )
    return render_view(slide, plan)


def magnification_mpps(
    slide: Slide,
    magnifications: Sequence[float],
    *,
    numerator: float = DEFAULT_MPP_NUMERATOR,
    tolerance: float = DEFAULT_MPP_TOLERANCE,
    anchor_to_native: bool = True,
) -> dict[float, float]:
    """Target mpp per magnification: ``numerator / m``, anchored to the slide's native mpp when close.

    Anchoring (see the module notes) keeps the ladder an exact multiple of the slide's pixels, so a
    "10x" view of a 0.499 mpp 20x slide is a clean 2x reduction of level 0 (0.998 mpp).
    """
    if numerator <= 0:
        raise ValueError(f"numerator must be positive, got {numerator}")
    mags = [float(m) for m in magnifications]
    if any(not (math.isfinite(m) and m > 0) for m in mags):
        raise ValueError(f"magnifications must be positive numbers, got {magnifications!r}")
    factor = 1.0
    if anchor_to_native:
        native = math.sqrt(slide.mpp[0] * slide.mpp[1])
        candidates = ([slide.objective_power] if slide.objective_power else []) + sorted(mags, reverse=True)
        for m in candidates:
            nominal = numerator / m
            if abs(native / nominal - 1) <= tolerance:
                factor = native / nominal
                break
    return {m: numerator / m * factor for m in mags}


def format_magnification(m: float) -> str:
    """``5.0 -> '5x'``, ``2.5 -> '2.5x'``."""
    return f"{m:g}x"


# ----------------------------------------------------------------------------------- tissue sampling


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold for uint8 values: the t maximising between-class variance of ``<= t`` / ``> t``."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    if between.max() <= 0:  # a single value: nothing lies above it
        return int(np.flatnonzero(hist)[-1])
    # Empty bins between the classes give a plateau of equal scores: take its middle, not its start.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    return int((best[0] + best[-1]) // 2)


def tissue_mask(rgb: np.ndarray, *, min_saturation: int = 20, max_dark: int = 20) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail: Otsu on HSV saturation (stain is coloured, glass is not).

    ``min_saturation`` keeps a blank slide from having its noise split into "tissue"; pixels darker
    than ``max_dark`` everywhere (padding, scanner borders) are never tissue.
    """
    hsv = np.asarray(Image.fromarray(np.asarray(rgb, np.uint8), mode="RGB").convert("HSV"))
    sat = hsv[..., 1]
    t = max(otsu_threshold(sat), min_saturation)
    return (sat > t) & (hsv[..., 2] > max_dark)


def tissue_centres(
    slide: Slide,
    n: int,
    seed: int | Sequence[int],
    *,
    fov_level0: float | Sequence[float] = 0.0,
    min_tissue_fraction: float = 0.5,
    min_separation: float | None = None,
    thumbnail_size: int = 1024,
) -> list[tuple[int, int]]:
    """Up to ``n`` level-0 centres on tissue, deterministic for a seed.

    A centre is on tissue in the thumbnail's Otsu mask and, where the slide allows, its field of view
    ``fov_level0`` (the largest view, i.e. the lowest magnification; level-0 pixels, one side or
    (w, h)) lies wholly inside the slide with at least ``min_tissue_fraction`` of it tissue. Where no
    field of view reaches that fraction, those within 80 % of the best available one qualify; where
    none fits inside the slide, any tissue pixel does; an empty list means no tissue. Centres are
    spread out greedily (at least ``min_separation`` level-0 pixels apart, default half the field of
    view) before closer ones are accepted. The thumbnail comes from tiffslide's ``get_thumbnail`` (the
    coarsest level at least ``thumbnail_size``), so a slide without pyramid levels is read whole once.
    """
    if n <= 0:
        return []
    fw, fh = (float(fov_level0), float(fov_level0)) if np.isscalar(fov_level0) else map(float, fov_level0)
    w0, h0 = slide.dimensions
    try:
        thumb = np.asarray(slide.handle.get_thumbnail((thumbnail_size, thumbnail_size)).convert("RGB"))
    except Exception as e:
        raise SlideError(f"cannot read a thumbnail: {type(e).__name__}: {e}", slide.path) from e
    th, tw = thumb.shape[:2]
    mask = tissue_mask(thumb)
    sx, sy = w0 / tw, h0 / th
    # Level-0 coordinate of each thumbnail pixel centre.
    xs = (np.arange(tw) + 0.5) * sx
    ys = (np.arange(th) + 0.5) * sy
    inside_x = (xs >= fw / 2) & (xs <= w0 - fw / 2) if fw <= w0 else np.abs(xs - w0 / 2) <= sx / 2
    inside_y = (ys >= fh / 2) & (ys <= h0 - fh / 2) if fh <= h0 else np.abs(ys - h0 / 2) <= sy / 2
    inside = inside_y[:, None] & inside_x[None, :]
    # Tissue fraction of the field of view around each pixel (integral image; outside counts as glass).
    kw, kh = max(1, round(fw / sx)), max(1, round(fh / sy))
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    ix0 = np.clip(np.arange(tw) - kw // 2, 0, tw)
    ix1 = np.clip(np.arange(tw) - kw // 2 + kw, 0, tw)
    iy0 = np.clip(np.arange(th) - kh // 2, 0, th)
    iy1 = np.clip(np.arange(th) - kh // 2 + kh, 0, th)
    counts = integral[iy1][:, ix1] - integral[iy0][:, ix1] - integral[iy1][:, ix0] + integral[iy0][:, ix0]
    fraction = counts / float(kw * kh)
    on_tissue = mask & inside
    if on_tissue.any():
        # Where no field of view reaches the fraction (small or sparse slides), take the best ones.
        need = min(float(min_tissue_fraction), _RELAX * float(fraction[on_tissue].max()))
        cand = on_tissue & (fraction >= need)
    elif mask.any():
        cand = mask  # the field of view cannot fit inside the slide anywhere on tissue
    else:
        return []
    ty, tx = np.nonzero(cand)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tx))
    pts = np.stack([xs[tx[order]], ys[ty[order]]], axis=1)
    # Where the field of view is larger than the slide on an axis, centre on that axis.
    if fw > w0:
        pts[:, 0] = w0 / 2
    if fh > h0:
        pts[:, 1] = h0 / 2
    sep = max(fw, fh) / 2 if min_separation is None else float(min_separation)
    chosen: list[int] = []
    for i in range(len(pts)):
        if len(chosen) == n:
            break
        if all(np.hypot(*(pts[i] - pts[j])) >= sep for j in chosen):
            chosen.append(i)
    if len(chosen) < n:
        taken = set(chosen)
        chosen += [i for i in range(len(pts)) if i not in taken][: n - len(chosen)]
    return [(round(float(pts[i, 0])), round(float(pts[i, 1]))) for i in chosen]


def slide_seed(seed: int, *parts: str | int) -> list[int]:
    """A per-slide seed sequence: stable across runs and machines (crc32, not Python's ``hash``)."""
    return [int(seed)] + [zlib.crc32(str(p).encode("utf-8")) for p in parts]


# ---------------------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest row: a slide, an optional level-0 centre, a label and an optional id."""

    slide: Path
    slide_ref: str
    centre: tuple[int, int] | None
    label: str
    id: str | None
    line: int


_MANIFEST_COLUMNS = ("slide", "x", "y", "label", "id")


def _coord(value: Any, name: str, path: Path, line: int) -> int | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool):
        raise ManifestError(path, line, f"{name} must be a number, got {value!r}")
    try:
        f = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ManifestError(path, line, f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(f) or f < 0:
        raise ManifestError(path, line, f"{name} must be a non-negative level-0 pixel, got {value!r}")
    return round(f)


def _text(value: Any, name: str, path: Path, line: int) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ManifestError(path, line, f"{name} must be text, got {value!r}")
    return str(value).strip()


def _slide_path(ref: str, base: Path, path: Path, line: int) -> Path:
    if os.path.isabs(ref):
        return Path(ref)
    norm = os.path.normpath(ref)
    if norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise ManifestError(
            path, line, f"slide path {ref!r} leaves the manifest folder (give an absolute path to allow it)"
        )
    return base / norm


def _manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for i, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ManifestError(path, i, f"invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ManifestError(path, i, f"each line must be a JSON object, got {type(row).__name__}")
            yield i, row
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
        header = reader.fieldnames
        if not header:
            raise ManifestError(path, 1, "empty CSV (a header with a 'slide' column is required)")
        header = [h.strip() if h else h for h in header]
        reader.fieldnames = header
        if "slide" not in header:
            raise ManifestError(path, 1, f"no 'slide' column in the header {header}")
        if len(set(header)) != len(header):
            raise ManifestError(path, 1, f"duplicate columns in the header {header}")
        for row in reader:
            if "\0extra" in row:
                raise ManifestError(path, reader.line_num, "more fields than header columns")
            if all(v is None or not str(v).strip() for v in row.values()):
                continue
            yield reader.line_num, {k: v for k, v in row.items() if v is not None}
    else:
        raise ManifestError(path, None, "manifest must be .csv or .jsonl")


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestEntry]:
    """Parse and validate a CSV or JSONL manifest; every error names the line (see module notes)."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(p, None, "manifest not found")
    base = p.absolute().parent
    entries: list[ManifestEntry] = []
    seen_ids: dict[str, int] = {}
    for line, row in _manifest_rows(p):
        unknown = sorted(set(row) - set(_MANIFEST_COLUMNS))
        if unknown:
            raise ManifestError(p, line, f"unknown column(s) {unknown}; allowed: {list(_MANIFEST_COLUMNS)}")
        ref = _text(row.get("slide"), "slide", p, line)
        if not ref:
            raise ManifestError(p, line, "missing 'slide'")
        x = _coord(row.get("x"), "x", p, line)
        y = _coord(row.get("y"), "y", p, line)
        if (x is None) != (y is None):
            raise ManifestError(p, line, "give both x and y, or neither (centres are then sampled on tissue)")
        ident = _text(row.get("id"), "id", p, line) or None
        if ident is not None:
            if ident in seen_ids:
                raise ManifestError(p, line, f"duplicate id {ident!r} (first on line {seen_ids[ident]})")
            seen_ids[ident] = line
        entries.append(
            ManifestEntry(
                slide=_slide_path(ref, base, p, line),
                slide_ref=ref,
                centre=None if x is None else (x, y),  # type: ignore[arg-type]
                label=_text(row.get("label"), "label", p, line),
                id=ident,
                line=line,
            )
        )
    if not entries:
        raise ManifestError(p, None, "no entries")
    return entries


def find_manifest(folder: str | os.PathLike[str]) -> Path:
    """The ``manifest.csv`` or ``manifest.jsonl`` in a folder (exactly one of them)."""
    d = Path(folder)
    found = [d / n for n in ("manifest.csv", "manifest.jsonl") if (d / n).is_file()]
    if not found:
        raise ManifestError(d, None, "no manifest.csv or manifest.jsonl in this folder")
    if len(found) > 1:
        raise ManifestError(d, None, "both manifest.csv and manifest.jsonl present; keep one")
    return found[0]
