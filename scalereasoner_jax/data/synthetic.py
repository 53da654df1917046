"""Synthetic cross-scale Scale-VQA set: procedurally drawn H&E-like view triplets in the release layout.

Why this exists: tests and the demo need a dataset that (1) has exactly the release's files and record
layout (DESIGN.md §3), (2) can only be answered by looking at *two* magnifications, and (3) has no
text-only shortcut, so that a tiny model trained on it must learn from the pixels.

Each view triplet carries two attributes, drawn independently:

* the low view (10x) shows the **architecture** (default values: glands with lumens / solid sheets);
* the high view (200x) shows the **nuclei** (default values: small monomorphic / large pleomorphic).

The mid view (40x) is a true zoom into the low view's scene (same glands or sheets, closer), with
nuclei drawn the same way for every nuclear value, so it is consistent with both but not needed. The
low and mid views never depend on the nuclear value and the high view never depends on the architecture
(each view has its own random stream). When a triplet has no high view (``high_mag_missing_rate``) the
mid view draws its nuclei in the triplet's nuclear style instead, so that two-view items stay answerable.

Every item has four options, the 2 x 2 grid of combinations {key architecture, one other} x {key nuclei,
one other} (with two values per attribute: all four combinations). So every option shares one feature
with two others and none with the fourth: the option-hub solver of DESIGN.md §3 ties across all options.
Option strings depend only on (question type, combination), phrases of one attribute have equal length
and word count, combinations are balanced in blocks and answer letters are balanced in blocks of four, so
longest/shortest-option, letter-prior and option-overlap rules are all at chance. The question wording
depends only on the question type.

Everything is deterministic in ``seed``: the plan (slides, splits, combinations, letters, UUIDs) comes from
one stream and every view is drawn from its own ``SeedSequence(seed, spawn_key=...)`` stream, so two runs
give byte-identical JSON and PNG files, with any number of worker processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_VOCABULARY",
    "FIELD_OF_VIEW_UM",
    "MAGNIFICATION",
    "NUCLEI",
    "OPTION_TEMPLATES",
    "QUESTION_TEMPLATES",
    "QUESTION_TYPES",
    "AttributeValue",
    "Vocabulary",
    "check_vocabulary",
    "make_vocabulary",
    "option_combination",
    "render_triplet",
    "synthesize",
]

QUESTION_TYPES: tuple[str, ...] = ("type_A", "type_B", "type_C", "type_D", "type_E")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
# Views are named after total magnification in the release's file names.
MAGNIFICATION: dict[str, int] = {"low_mag": 10, "mid_mag": 40, "high_mag": 200}
# Field of view (micrometres across) of each view, whatever the pixel size: 5, 1.25, 0.5 um/px at 224 px.
FIELD_OF_VIEW_UM: dict[str, float] = {"low_mag": 1120.0, "mid_mag": 280.0, "high_mag": 112.0}


@dataclass(frozen=True)
class AttributeValue:
    """One value of a visual attribute: the renderer's key, the option phrase and the rationale text."""

    key: str  # names the drawing routine (see ARCHITECTURES / NUCLEI)
    phrase: str  # goes into option texts; keep one attribute's phrases equal in length and word count
    description: str  # what the view shows, for the rationale


# Registries of drawable values. Phrases within one attribute have equal length and word count, and no
# word is shared with the option templates, so option texts stay symmetric for any choice of values.
ARCHITECTURES: dict[str, AttributeValue] = {
    "glandular": AttributeValue(
        "glandular",
        "glands with lumens",
        "epithelial cells line round and oval glands around open, pale lumens",
    ),
    "solid": AttributeValue(
        "solid",
        "solid sheet growth",
        "the cells fill broad solid sheets, and no lumens are formed",
    ),
    "cords": AttributeValue(
        "cords",
        "slender cell cords",
        "the cells form thin, branching cords that join and part, with stroma between them",
    ),
}
NUCLEI: dict[str, AttributeValue] = {
    "small_round": AttributeValue(
        "small_round",
        "small monomorphic nuclei",
        "the nuclei are small, round and uniform, with evenly dark chromatin",
    ),
    "large_pleomorphic": AttributeValue(
        "large_pleomorphic",
        "large pleomorphic nuclei",
        "the nuclei are large and vary in size and shape, with irregular outlines, open chromatin "
        "and visible nucleoli",
    ),
    "spindle": AttributeValue(
        "spindle",
        "elongated spindle nuclei",
        "the nuclei are long and spindle-shaped, lying in parallel streams",
    ),
}

# Per question type: the question (the same for every item of that type) and the option template.
QUESTION_TEMPLATES: dict[str, str] = {
    "type_A": (
        "The images show one region at 10x, 40x and 200x. Which description corresponds to this region "
        "at both low and high magnification?"
    ),
    "type_B": (
        "Which pair of findings do the images confirm: the growth pattern at low magnification and the "
        "nuclear features at high magnification?"
    ),
    "type_C": (
        "The 200x view was taken from within the 10x field. Which option correctly describes the "
        "surrounding field and the cells at the 200x site?"
    ),
    "type_D": (
        "Which explanation of this lesion's appearance is supported by both the low-magnification "
        "architecture and the high-magnification cytology?"
    ),
    "type_E": (
        "Considering the architecture at 10x and the nuclear features at 200x together, which "
        "description best fits this lesion?"
    ),
}
OPTION_TEMPLATES: dict[str, str] = {
    "type_A": "{low} at 10x, {high} at 200x",
    "type_B": "Low power: {low}; high power: {high}",
    "type_C": "Surrounding field: {low}; cells at the 200x site: {high}",
    "type_D": "Explained by {low} (10x) plus {high} (200x)",
    "type_E": "Lesion of {low} and {high}",
}


@dataclass(frozen=True)
class Vocabulary:
    """The attribute values in use and the wording; 2 x 2 by default, any n x m >= 2 x 2 works."""

    architecture: tuple[AttributeValue, ...]
    nuclei: tuple[AttributeValue, ...]
    questions: Mapping[str, str] = field(default_factory=lambda: dict(QUESTION_TEMPLATES))
    options: Mapping[str, str] = field(default_factory=lambda: dict(OPTION_TEMPLATES))

    def option_text(self, question_type: str, low: AttributeValue, high: AttributeValue) -> str:
        return self.options[question_type].format(low=low.phrase, high=high.phrase)


def make_vocabulary(
    architecture: Sequence[str] = ("glandular", "solid"),
    nuclei: Sequence[str] = ("small_round", "large_pleomorphic"),
) -> Vocabulary:
    """A vocabulary from registry keys (e.g. three values each: add "cords" and "spindle")."""
    unknown = [k for k in architecture if k not in ARCHITECTURES] + [k for k in nuclei if k not in NUCLEI]
    if unknown:
        raise ValueError(
            f"unknown attribute value(s) {unknown}; architecture: {sorted(ARCHITECTURES)}, "
            f"nuclei: {sorted(NUCLEI)}"
        )
    return Vocabulary(tuple(ARCHITECTURES[k] for k in architecture), tuple(NUCLEI[k] for k in nuclei))


DEFAULT_VOCABULARY = make_vocabulary()


def _words(text: str) -> frozenset[str]:
    return frozenset("".join(c if c.isalnum() else " " for c in text.lower()).split())


_LONE_CAPITAL = re.compile(r"(?<![\w'{-])[A-Z](?![\w'}-])")


def _vocabulary_problems(vocab: Vocabulary) -> tuple[list[str], list[str]]:
    """(errors that make items malformed, asymmetries that could let a text-only rule beat chance)."""
    errors: list[str] = []
    asym: list[str] = []
    for name, values, registry in (
        ("architecture", vocab.architecture, ARCHITECTURES),
        ("nuclei", vocab.nuclei, NUCLEI),
    ):
        if len(values) < 2:
            errors.append(f"{name}: needs at least two values, got {len(values)}")
        if len({v.key for v in values}) != len(values) or len({v.phrase for v in values}) != len(values):
            errors.append(f"{name}: keys and phrases must be distinct")
        errors += [f"{name}: no drawing routine for {v.key!r}" for v in values if v.key not in registry]
        if len({len(v.phrase) for v in values}) > 1:
            asym.append(f"{name}: phrase lengths differ {[len(v.phrase) for v in values]}")
        if len({len(_words(v.phrase)) for v in values}) > 1:
            asym.append(f"{name}: phrase word counts differ {[len(_words(v.phrase)) for v in values]}")
    phrase_words = set().union(*(_words(v.phrase) for v in (*vocab.architecture, *vocab.nuclei)))
    for qt in QUESTION_TYPES:
        if qt not in vocab.questions or qt not in vocab.options:
            errors.append(f"{qt}: missing question or option template")
            continue
        tpl = vocab.options[qt]
        if tpl.count("{low}") != 1 or tpl.count("{high}") != 1:
            errors.append(f"{qt}: option template must hold {{low}} and {{high}} once each: {tpl!r}")
            continue
        shared = _words(tpl.replace("{low}", " ").replace("{high}", " ")) & phrase_words
        if shared:
            asym.append(f"{qt}: option template shares words {sorted(shared)} with the phrases")
    texts = [*vocab.questions.values(), *vocab.options.values()]
    texts += [t for v in (*vocab.architecture, *vocab.nuclei) for t in (v.phrase, v.description)]
    errors += [f"stand-alone capital letter in {t!r}" for t in texts if _LONE_CAPITAL.search(t)]
    return errors, asym


def check_vocabulary(vocab: Vocabulary) -> list[str]:
    """Why the vocabulary could give a malformed item or a text-only shortcut (empty list: neither).

    Errors: fewer than two values per attribute, repeated keys or phrases, values without a drawing
    routine, templates missing or without exactly one ``{low}`` and one ``{high}``, a stand-alone capital
    letter in any text (it could read as an answer letter). Asymmetries: phrase lengths or word counts
    differing within an attribute, a word shared by a template and a phrase (word-set overlap would then
    differ between options). With asymmetries the balanced draw still keeps text-only rules at chance on
    average, but no longer item by item.
    """
    errors, asym = _vocabulary_problems(vocab)
    return errors + asym


def option_combination(record: Mapping[str, Any], vocab: Vocabulary = DEFAULT_VOCABULARY) -> tuple[str, str]:
    """(architecture key, nuclei key) of a record's correct option, read back from its text."""
    qt = record["extra_info"]["question_type"]
    text = record["options"][record["answer"]]
    for low in vocab.architecture:
        for high in vocab.nuclei:
            if vocab.option_text(qt, low, high) == text:
                return low.key, high.key
    raise ValueError(f"option text {text!r} is not a combination of this vocabulary")


# ----------------------------------------------------------------------------------------------------
# Drawing. Images are built as hematoxylin / eosin density maps and turned into RGB by Beer-Lambert
# with Macenko's reference stain vectors (jittered per slide), which gives the pink/purple H&E look.

_H_OD = np.array([0.5626, 0.7201, 0.4062])
_E_OD = np.array([0.2159, 0.8012, 0.5581])
_BLUR = 0.6  # optical blur (pixels) applied to the stain densities


@dataclass(frozen=True)
class _Stain:
    h: np.ndarray  # optical density per unit hematoxylin, (3,)
    e: np.ndarray
    background: np.ndarray  # optical density of the glass and illumination tint


def _draw_stain(rng: np.random.Generator) -> _Stain:
    h = _H_OD * rng.uniform(0.9, 1.1, 3)
    e = _E_OD * rng.uniform(0.9, 1.1, 3)
    h = h / np.linalg.norm(h) * rng.uniform(1.1, 1.35)
    e = e / np.linalg.norm(e) * rng.uniform(0.85, 1.2)
    return _Stain(h, e, rng.uniform(0.0, 0.04, 3))


def _to_rgb(h: np.ndarray, e: np.ndarray, stain: _Stain, rng: np.random.Generator) -> np.ndarray:
    od = h[..., None] * stain.h + e[..., None] * stain.e + stain.background
    rgb = 255.0 * np.exp(-od) + rng.normal(0.0, 1.0, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Standardised smooth Gaussian noise; large sigmas are drawn on a coarse grid and upsampled (fast)."""
    f = max(1, int(sigma // 3))
    if f == 1:
        g = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap", truncate=3.0)
    else:
        coarse = rng.standard_normal((shape[0] // f + 3, shape[1] // f + 3))
        g = ndimage.zoom(ndimage.gaussian_filter(coarse, sigma / f, mode="wrap", truncate=3.0), f, order=1)
        g = g[: shape[0], : shape[1]]
    return (g - g.mean()) / (g.std() + 1e-8)


def _fibres(rng: np.random.Generator, size: int, um_per_px: float, angle: float) -> np.ndarray:
    """Collagen-like texture in [-1, 1]: noise stretched along ``angle`` (radians), wavy, 2-5 um bundles."""
    big = int(size * 1.5) + 16
    across = max(0.7, rng.uniform(1.5, 3.0) / um_per_px)
    along = float(np.clip(25.0 / um_per_px, 2.0, 24.0))
    fc = max(1, int(along // 3))  # the base is smooth along its columns: store it coarsely there
    base = rng.standard_normal((big, big // fc + 2))
    base = ndimage.gaussian_filter(base, (across, along / fc), mode="wrap", truncate=3.0)
    amp = float(np.clip(8.0 / um_per_px, 1.5, 10.0))
    dx, dy = (amp * _noise(rng, (size, size), size / 7) for _ in range(2))
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * xx + s * yy + dx, -s * xx + c * yy + dy
    f = ndimage.map_coordinates(base, [v + big / 2, (u + big / 2) / fc], order=1, mode="wrap")
    return np.tanh((f - f.mean()) / (f.std() + 1e-8))


@dataclass
class _Nuclei:
    """Nuclei in micrometres: centres, semi-axes, orientation, outline harmonics, stain amount, style."""

    xy: np.ndarray  # (K, 2)
    rx: np.ndarray
    ry: np.ndarray
    theta: np.ndarray
    harm: np.ndarray  # (K, 4): amplitude and phase of the 2nd and 3rd outline harmonics
    amp: np.ndarray  # hematoxylin density at the centre
    vesicular: np.ndarray  # 0: solid dark chromatin; 1: pale centre, dark rim

    @staticmethod
    def concat(parts: Sequence[_Nuclei]) -> _Nuclei:
        return _Nuclei(*(np.concatenate([getattr(p, f) for p in parts]) for f in _NUCLEI_FIELDS))

    def take(self, idx: np.ndarray) -> _Nuclei:
        return _Nuclei(*(getattr(self, f)[idx] for f in _NUCLEI_FIELDS))


_NUCLEI_FIELDS = ("xy", "rx", "ry", "theta", "harm", "amp", "vesicular")


def _nuclei(
    xy: np.ndarray,
    r: np.ndarray,
    aspect: np.ndarray,
    theta: np.ndarray,
    amp: np.ndarray,
    harm: np.ndarray | None = None,
    vesicular: np.ndarray | None = None,
) -> _Nuclei:
    k = len(xy)
    return _Nuclei(
        xy=np.asarray(xy, float).reshape(k, 2),
        rx=r / np.sqrt(aspect),
        ry=r * np.sqrt(aspect),
        theta=theta,
        harm=np.zeros((k, 4)) if harm is None else harm,
        amp=amp,
        vesicular=np.zeros(k) if vesicular is None else vesicular,
    )


def _nuclear_style(rng: np.random.Generator, key: str, xy: np.ndarray, base_angle: float = 0.0) -> _Nuclei:
    """Nuclei of one nuclear value at the given centres (um)."""
    k = len(xy)
    u = rng.uniform
    if key == "small_round":
        return _nuclei(xy, u(2.8, 3.5, k), u(0.82, 1.0, k), u(0, np.pi, k), u(1.35, 1.6, k))
    if key == "large_pleomorphic":
        r = np.exp(rng.normal(math.log(7.5), 0.18, k)).clip(5.5, 11.0)
        harm = np.stack([u(0.03, 0.14, k), u(0, 2 * np.pi, k), u(0.02, 0.1, k), u(0, 2 * np.pi, k)], 1)
        return _nuclei(xy, r, u(0.6, 1.0, k), u(0, np.pi, k), u(0.95, 1.6, k), harm, u(0.4, 0.8, k))
    if key == "spindle":
        return _nuclei(
            xy, u(3.5, 4.5, k), u(0.14, 0.22, k), base_angle + rng.normal(0, 0.12, k), u(1.2, 1.5, k)
        )
    raise ValueError(f"no drawing routine for nuclear value {key!r}")


def _stamp(shape: tuple[int, int], n: _Nuclei, origin: np.ndarray, um_per_px: float) -> np.ndarray:
    """Hematoxylin density of soft-edged nuclei (max-composited), pixel centres at ``origin + (j+.5)*s``."""
    out = np.zeros(shape)
    if len(n.xy) == 0:
        return out
    px = (n.xy - origin) / um_per_px - 0.5  # (x, y) in pixel index units
    rx, ry = n.rx / um_per_px, n.ry / um_per_px
    grow = 1.0 + n.harm[:, 0] + n.harm[:, 2]
    w = math.ceil(float((np.maximum(rx, ry) * grow).max()) + 1.5)
    off = np.arange(-w, w + 1)
    cx, cy = np.rint(px[:, 0]).astype(int), np.rint(px[:, 1]).astype(int)
    gx = (cx[:, None] + off[None, :])[:, None, :]  # (K, 1, W)
    gy = (cy[:, None] + off[None, :])[:, :, None]  # (K, W, 1)
    dx, dy = gx - px[:, 0, None, None], gy - px[:, 1, None, None]
    c, s = np.cos(n.theta)[:, None, None], np.sin(n.theta)[:, None, None]
    u, v = (c * dx + s * dy) / rx[:, None, None], (-s * dx + c * dy) / ry[:, None, None]
    rho = np.sqrt(u * u + v * v)
    if n.harm.any():
        phi = np.arctan2(v, u)
        h = n.harm[:, :, None, None]
        rho = rho / (1.0 + h[:, 0] * np.cos(2 * phi + h[:, 1]) + h[:, 2] * np.cos(3 * phi + h[:, 3]))
    r_eff = np.sqrt(rx * ry)[:, None, None]
    cover = np.clip(0.5 + (1.0 - rho) * r_eff, 0.0, 1.0)
    ves = n.vesicular[:, None, None]
    profile = (1.0 - ves) + ves * (0.45 + 0.55 * np.clip(rho, 0, 1) ** 3)
    val = cover * profile * n.amp[:, None, None]
    ok = (gx >= 0) & (gx < shape[1]) & (gy >= 0) & (gy < shape[0]) & (val > 1e-3)
    gx, gy = np.broadcast_to(gx, val.shape), np.broadcast_to(gy, val.shape)
    np.maximum.at(out, (gy[ok], gx[ok]), val[ok])
    return out


def _grid_points(rng: np.random.Generator, half: float, spacing: float, jitter: float) -> np.ndarray:
    """A jittered hexagonal lattice covering [-half, half]^2 (um), randomly rotated and shifted."""
    rows = np.arange(-half * 1.5, half * 1.5, spacing * math.sqrt(3) / 2)
    cols = np.arange(-half * 1.5, half * 1.5, spacing)
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    xx = xx + (np.arange(len(rows))[:, None] % 2) * spacing / 2
    pts = np.stack([xx.ravel(), yy.ravel()], 1) + rng.uniform(0, spacing, 2)
    a = rng.uniform(0, np.pi)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = pts @ rot.T + rng.normal(0, jitter, pts.shape)
    return pts[(np.abs(pts) <= half).all(1)]


# --- the low/mid scene ------------------------------------------------------------------------------


@dataclass
class _Scene:
    """Tissue in micrometres around the low view's centre: where epithelium, lumens and nuclei are."""

    architecture: str
    half: float  # the scene covers [-half, half]^2
    fibre_angle: float
    glands: np.ndarray  # (G, 9): cx, cy, a, b, angle, inner, c2, p2, c3 (p3 = p2 * 1.7)
    field: np.ndarray | None  # sheet / cord field on a grid of `step` um, for non-glandular scenes
    step: float
    threshold: float
    band: float  # for cords: |field| < band is epithelium
    nuclei: _Nuclei  # epithelial nuclei
    stroma_nuclei: _Nuclei

    def tissue(self, x: np.ndarray, y: np.ndarray, um_per_px: float) -> tuple[np.ndarray, np.ndarray]:
        """Soft epithelium and lumen masks in [0, 1] at points (um); edges about one pixel wide."""
        epi = np.zeros(np.shape(x))
        lumen = np.zeros(np.shape(x))
        if self.architecture == "glandular":
            for cx, cy, a, b, ang, inner, c2, p2, c3 in self.glands:
                reach = max(a, b) * (1 + c2 + c3) + 2 * um_per_px
                idx = np.nonzero((np.abs(x - cx) < reach) & (np.abs(y - cy) < reach))
                if len(idx[0]) == 0:
                    continue
                dx, dy = x[idx] - cx, y[idx] - cy
                c, s = math.cos(ang), math.sin(ang)
                u, v = (c * dx + s * dy) / a, (-s * dx + c * dy) / b
                phi = np.arctan2(v, u)
                rho = np.sqrt(u * u + v * v) / (
                    1 + c2 * np.cos(2 * phi + p2) + c3 * np.cos(3 * phi + 1.7 * p2)
                )
                edge = um_per_px / math.sqrt(a * b)
                outer = np.clip(0.5 + (1.0 - rho) / edge, 0, 1)
                inside = np.clip(0.5 + (inner - rho) / edge, 0, 1)
                epi[idx] = np.maximum(epi[idx], outer - inside)
                lumen[idx] = np.maximum(lumen[idx], inside)
            return epi, lumen
        f = ndimage.map_coordinates(
            self.field, [(y + self.half) / self.step, (x + self.half) / self.step], order=1, mode="nearest"
        )
        grad = 1.0 / 60.0  # the field is smoothed over ~60 um: about one unit of field per 60 um
        width = max(um_per_px, 2.0) * grad
        if self.architecture == "solid":
            epi = np.clip(0.5 + (f - self.threshold) / width, 0, 1)
        else:  # cords
            epi = np.clip(0.5 + (self.band - np.abs(f)) / width, 0, 1)
        return epi, lumen


def _make_scene(rng: np.random.Generator, architecture: str) -> _Scene:
    half = FIELD_OF_VIEW_UM["low_mag"] / 2 + 90.0
    u = rng.uniform
    glands = np.zeros((0, 9))
    field_ = None
    step, threshold, band = 6.0, 0.0, 0.0
    parts: list[_Nuclei] = []
    if architecture == "glandular":
        target = u(0.32, 0.45) * (2 * half) ** 2
        rows: list[list[float]] = []
        area = 0.0
        for _ in range(600):
            a = u(60.0, 135.0)
            b = a * u(0.6, 0.95)
            cx, cy = u(-half, half, 2)
            gap = u(20.0, 60.0)
            if all(math.hypot(cx - r[0], cy - r[1]) > a + r[2] + gap for r in rows):
                t = min(u(28.0, 42.0), 0.6 * b)  # tall, pseudostratified epithelium
                rows.append(
                    [cx, cy, a, b, u(0, np.pi), 1 - t / math.sqrt(a * b), u(0, 0.07), u(0, 6.3), u(0, 0.05)]
                )
                area += math.pi * a * b
                if area >= target:
                    break
        glands = np.array(rows).reshape(-1, 9)
        for cx, cy, a, b, ang, inner, c2, p2, c3 in glands:
            perim = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
            k = int(1.7 * perim / u(6.5, 8.0))
            phi = np.linspace(0, 2 * np.pi, k, endpoint=False) + u(0, 2 * np.pi) + rng.normal(0, 0.02, k)
            rho = (1 - rng.uniform(0.12, 0.55, k) * (1 - inner)) * (
                1 + c2 * np.cos(2 * phi + p2) + c3 * np.cos(3 * phi + 1.7 * p2)
            )
            lu, lv = a * rho * np.cos(phi), b * rho * np.sin(phi)
            c, s = math.cos(ang), math.sin(ang)
            xy = np.stack([cx + c * lu - s * lv, cy + s * lu + c * lv], 1)
            radial = np.arctan2(xy[:, 1] - cy, xy[:, 0] - cx)
            parts.append(_nuclei(xy, u(3.4, 4.2, k), u(0.45, 0.7, k), radial, u(1.2, 1.55, k)))
    else:
        n = int(2 * half / step) + 1
        field_ = _noise(rng, (n, n), 60.0 / step if architecture == "solid" else 45.0 / step)
        field_ = field_ / (np.abs(np.diff(field_, axis=0)).mean() / step * 60.0)  # ~1 unit per 60 um
        if architecture == "solid":
            threshold = float(np.quantile(field_, 1 - u(0.55, 0.72)))
        elif architecture == "cords":
            band = float(np.quantile(np.abs(field_), u(0.3, 0.4)))
        else:
            raise ValueError(f"no drawing routine for architecture {architecture!r}")
    empty = _nuclei(np.zeros((0, 2)), *(np.zeros(0),) * 4)
    scene = _Scene(architecture, half, u(0, np.pi), glands, field_, step, threshold, band, empty, empty)
    if architecture != "glandular":
        pts = _grid_points(rng, half, u(10.0, 12.0), 1.8)
        epi, _ = scene.tissue(pts[:, 0], pts[:, 1], 1.0)
        pts = pts[epi > 0.7]
        k = len(pts)
        if architecture == "cords":
            theta = u(0, np.pi, k)
            parts.append(_nuclei(pts, u(3.4, 4.2, k), u(0.55, 0.8, k), theta, u(1.15, 1.5, k)))
        else:
            parts.append(_nuclei(pts, u(3.4, 4.2, k), u(0.7, 0.95, k), u(0, np.pi, k), u(1.15, 1.5, k)))
    scene.nuclei = _Nuclei.concat(parts)
    # Stromal fibroblasts along the fibres and a few lymphocytes, only where there is no epithelium.
    k = rng.poisson((2 * half) ** 2 / 1400.0)
    pts = u(-half, half, (k, 2))
    epi, lumen = scene.tissue(pts[:, 0], pts[:, 1], 1.0)
    pts = pts[(epi + lumen) < 0.05]
    k = len(pts)
    lymph = u(0, 1, k) < 0.25
    scene.stroma_nuclei = _nuclei(
        pts,
        np.where(lymph, u(2.3, 2.8, k), u(3.5, 5.0, k)),
        np.where(lymph, 1.0, u(0.12, 0.3, k)),
        scene.fibre_angle + rng.normal(0, 0.25, k),
        np.where(lymph, u(1.6, 1.9, k), u(1.1, 1.4, k)),
    )
    return scene


def _mid_centre(rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    """Centre of the 40x view: on the architecture (a gland wall, a sheet or a cord), inside the 10x view."""
    lim = FIELD_OF_VIEW_UM["low_mag"] / 2 - FIELD_OF_VIEW_UM["mid_mag"] / 2
    if scene.architecture == "glandular":
        g = scene.glands
        inside = g[(np.abs(g[:, :2]) < lim).all(1)]
        if len(inside) == 0:
            inside = g
        cx, cy, a, _b, *_ = inside[rng.integers(len(inside))]
        d = rng.uniform(0.2, 0.7) * a
        phi = rng.uniform(0, 2 * np.pi)
        return np.clip([cx + d * math.cos(phi), cy + d * math.sin(phi)], -lim, lim)
    pts = rng.uniform(-lim, lim, (64, 2))
    epi, _ = scene.tissue(pts[:, 0], pts[:, 1], 1.0)
    return pts[int(np.argmax(epi + rng.uniform(0, 0.01, 64)))]


def _render_scene(
    rng: np.random.Generator,
    scene: _Scene,
    stain: _Stain,
    centre: np.ndarray,
    fov: float,
    size: int,
    nuclei_override: tuple[str, np.random.Generator] | None = None,
) -> np.ndarray:
    """One view (uint8 RGB) of the scene: a window of ``fov`` um around ``centre``."""
    s = fov / size
    origin = np.asarray(centre, float) - fov / 2
    coords = origin[None, :] + (np.arange(size)[:, None] + 0.5) * s
    x, y = np.meshgrid(coords[:, 0], coords[:, 1])
    epi, lumen = scene.tissue(x, y, s)
    stroma = np.clip(1.0 - epi - lumen, 0, 1)
    fib = _fibres(rng, size, s, scene.fibre_angle)
    tone = _noise(rng, (size, size), size / 6)
    fine = _noise(rng, (size, size), 0.8)
    e = stroma * (0.62 + 0.16 * fib + 0.05 * tone) * (1.0 - 0.6 * np.clip(-fib - 0.75, 0, 1) / 0.25)
    e = e + epi * (0.55 + 0.05 * tone) + lumen * 0.05
    h = stroma * 0.04 + epi * (0.24 + 0.03 * fine)
    margin = 12.0
    nuc = scene.nuclei
    sel = ((nuc.xy > origin - margin) & (nuc.xy < origin + fov + margin)).all(1)
    nuc = nuc.take(np.flatnonzero(sel))
    if nuclei_override is not None:
        key, nrng = nuclei_override
        nuc = _nuclear_style(nrng, key, nuc.xy, scene.fibre_angle)
    snuc = scene.stroma_nuclei
    snuc = snuc.take(np.flatnonzero(((snuc.xy > origin - margin) & (snuc.xy < origin + fov + margin)).all(1)))
    hn = np.maximum(_stamp((size, size), nuc, origin, s), _stamp((size, size), snuc, origin, s))
    h = np.maximum(h, hn * (1.0 + 0.12 * fine))
    e = e * (1.0 - 0.5 * np.clip(hn, 0, 1))
    h, e = ndimage.gaussian_filter(h, _BLUR), ndimage.gaussian_filter(e, _BLUR)
    return _to_rgb(h, e, stain, rng)


# --- the high view -------------------------------------------------------------------------------------


def _render_cells(rng: np.random.Generator, key: str, stain: _Stain, size: int) -> np.ndarray:
    """The 200x view: a field of tumour cells whose nuclei show the nuclear value (no architecture)."""
    fov = FIELD_OF_VIEW_UM["high_mag"]
    s = fov / size
    half = fov / 2 + 25.0
    u = rng.uniform
    spacing = {"small_round": u(10.5, 12.5), "large_pleomorphic": u(17.0, 21.0), "spindle": u(9.0, 11.0)}
    if key not in spacing:
        raise ValueError(f"no drawing routine for nuclear value {key!r}")
    base_angle = u(0, np.pi)
    if key == "spindle":  # long cells in streams: an anisotropic lattice along base_angle
        pts = _grid_points(rng, half * 2, spacing[key], 1.0)
        c, sn = math.cos(base_angle), math.sin(base_angle)
        along, across = pts @ np.array([c, sn]), pts @ np.array([-sn, c])
        pts = np.stack([along * 2.6 * c - across * 0.55 * sn, along * 2.6 * sn + across * 0.55 * c], 1)
        pts = pts[(np.abs(pts) <= half).all(1)]
    else:
        pts = _grid_points(rng, half, spacing[key], spacing[key] * 0.12)
    # Sometimes a strand of stroma crosses the field (same chance for every nuclear value).
    coords = (np.arange(size) + 0.5) * s - fov / 2
    x, y = np.meshgrid(coords, coords)
    band = np.zeros((size, size))
    fibre_angle = base_angle
    if u() < 0.35:
        a, off, wid = u(0, np.pi), u(-fov / 3, fov / 3), u(8.0, 18.0)
        fibre_angle = a
        d_img = x * -math.sin(a) + y * math.cos(a) - off
        band = np.clip(0.5 + (wid / 2 - np.abs(d_img)) / s, 0, 1)
        d_pts = pts[:, 0] * -math.sin(a) + pts[:, 1] * math.cos(a) - off
        pts = pts[np.abs(d_pts) > wid / 2 + spacing[key] * 0.3]
    # Cell borders: pixels nearly equidistant from their two nearest cell centres.
    tree = cKDTree(pts)
    d, _ = tree.query(np.stack([x.ravel(), y.ravel()], 1), k=2)
    border = np.exp(-(((d[:, 1] - d[:, 0]) / 0.9) ** 2)).reshape(size, size)
    if key == "spindle":
        border *= 0.3
    tone = _noise(rng, (size, size), size / 5)
    fine = _noise(rng, (size, size), 0.8 * 224 / size)
    fib = _fibres(rng, size, s, fibre_angle)
    cell = 1.0 - band
    e = cell * (0.5 + 0.05 * tone + 0.15 * border) + band * (0.62 + 0.16 * fib)
    h = cell * (0.2 + 0.04 * border + 0.02 * fine) + band * 0.04
    nuc = _nuclear_style(rng, key, pts + rng.normal(0, 0.6, pts.shape), base_angle)
    origin = np.array([-fov / 2, -fov / 2])
    hn = _stamp((size, size), nuc, origin, s)
    if key == "large_pleomorphic":  # nucleoli: small dark-magenta dots inside the big nuclei
        k = len(nuc.xy)
        jit = rng.normal(0, 1.0, (k, 2)) * np.minimum(nuc.rx, nuc.ry)[:, None] * 0.3
        nucleoli = _nuclei(nuc.xy + jit, u(0.9, 1.4, k), np.ones(k), np.zeros(k), u(1.6, 2.0, k))
        hn = np.maximum(hn, _stamp((size, size), nucleoli.take(np.flatnonzero(u(0, 1, k) < 0.8)), origin, s))
    grain = 1.0 + 0.22 * _noise(rng, (size, size), 0.6 * 224 / size)
    h = np.maximum(h, hn * grain)
    e = e * (1.0 - 0.45 * np.clip(hn, 0, 1))
    h, e = ndimage.gaussian_filter(h, _BLUR), ndimage.gaussian_filter(e, _BLUR)
    return _to_rgb(h, e, stain, rng)


def _view_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def render_triplet(
    seed: int,
    index: int,
    architecture: str,
    nuclei: str,
    *,
    slide: int = 0,
    image_size: int = 224,
    with_high: bool = True,
) -> dict[str, np.ndarray | None]:
    """The three views (uint8 RGB arrays; high is None when absent) of triplet ``index`` of a set.

    The low and mid views depend only on (seed, index, architecture, slide stain), the high view only
    on (seed, index, nuclei, slide stain), except that without a high view the mid view draws the nuclei.
    """
    stain = _draw_stain(_view_rng(seed, 2, slide))
    scene_rng = _view_rng(seed, 1, index, 0)
    scene = _make_scene(scene_rng, architecture)
    low = _render_scene(
        _view_rng(seed, 1, index, 1), scene, stain, np.zeros(2), FIELD_OF_VIEW_UM["low_mag"], image_size
    )
    mid_rng = _view_rng(seed, 1, index, 2)
    override = None if with_high else (nuclei, _view_rng(seed, 1, index, 4))
    mid = _render_scene(
        mid_rng, scene, stain, _mid_centre(mid_rng, scene), FIELD_OF_VIEW_UM["mid_mag"], image_size, override
    )
    high = _render_cells(_view_rng(seed, 1, index, 3), nuclei, stain, image_size) if with_high else None
    return {"low_mag": low, "mid_mag": mid, "high_mag": high}


# ----------------------------------------------------------------------------------------------------
# The plan (slides, splits, attribute combinations, answer letters) and the files.


@dataclass(frozen=True)
class _Triplet:
    index: int
    slide: int
    wsi_name: str
    path_id: str
    architecture: int  # index into vocab.architecture
    nuclei: int
    with_high: bool


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n`` draws from range(k), exactly balanced within every block of ``k``: no fixed guess beats 1/k."""
    blocks = [rng.permutation(k) for _ in range(-(-n // k))]
    return np.concatenate(blocks)[:n] if blocks else np.zeros(0, int)


def _assign_splits(
    rng: np.random.Generator, slide_sizes: Sequence[int], splits: Sequence[tuple[str, float]]
) -> dict[str, list[int]]:
    """Slides (shuffled) to splits so that each split's triplet count is close to its fraction."""
    names = [name for name, _ in splits]
    fracs = np.array([float(f) for _, f in splits])
    if len(set(names)) != len(names) or (fracs < 0).any() or fracs.sum() <= 0:
        raise ValueError(f"splits must have distinct names and non-negative fractions, got {list(splits)}")
    fracs = fracs / fracs.sum()
    order = [int(i) for i in rng.permutation(len(slide_sizes))]
    total = sum(slide_sizes)
    bounds = np.cumsum(fracs) * total
    out: dict[str, list[int]] = {name: [] for name in names}
    done = 0
    split_i = 0
    for s in order:
        # Move on once this split has its share (measured at the slide's midpoint).
        while split_i < len(names) - 1 and done + slide_sizes[s] / 2 > bounds[split_i]:
            split_i += 1
        out[names[split_i]].append(s)
        done += slide_sizes[s]
    # Every split with a positive fraction gets a slide when there are enough slides.
    for i, name in enumerate(names):
        if fracs[i] > 0 and not out[name]:
            donor = max(names, key=lambda m: len(out[m]))
            if len(out[donor]) > 1:
                out[name].append(out[donor].pop())
    return out


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.integers(0, 256, 16, dtype=np.uint8).tobytes(), version=4))


def _rationale(low: AttributeValue, high: AttributeValue, with_high: bool) -> str:
    """Names what each view shows; never an option letter."""
    text = f"At 10x the low-magnification view shows {low.phrase}: {low.description}. "
    if with_high:
        text += (
            "At 40x the closer view shows the same pattern, with nuclei too small to grade. "
            f"At 200x the high-magnification view shows {high.phrase}: {high.description}. "
        )
    else:
        text += (
            "There is no 200x view, but the 40x view shows the same pattern and, at this closer range, "
            f"{high.phrase}: {high.description}. "
        )
    return text + (
        f"Neither view alone decides the question: only the option combining {low.phrase} with "
        f"{high.phrase} fits both magnifications."
    )


def _write_png(path: Path, image: np.ndarray) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(image).save(path, format="PNG", compress_level=6)
    return path.stat().st_size


def _render_and_write(job: tuple[Any, ...]) -> int:
    """Worker: draw one triplet and write its files; returns bytes written."""
    seed, t, vocab_keys, image_size, paths = job
    views = render_triplet(
        seed,
        t.index,
        vocab_keys[0][t.architecture],
        vocab_keys[1][t.nuclei],
        slide=t.slide,
        image_size=image_size,
        with_high=t.with_high,
    )
    return sum(_write_png(paths[k], views[k]) for k in MAGNIFICATION if views[k] is not None)


def synthesize(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    *,
    image_size: int = 224,
    splits: Sequence[tuple[str, float]] = (("train", 0.8), ("val", 0.1), ("test", 0.1)),
    high_mag_missing_rate: float = 0.0,
    vocabulary: Vocabulary | None = None,
    triplets_per_slide: tuple[int, int] = (2, 6),
    workers: int = 1,
    overwrite: bool = False,
    option_order: str = "shuffled",
) -> dict[str, Any]:
    """Write a synthetic cross-scale set of ``n`` questions in the release layout.

    One view triplet carries five questions (types A-E), so ``ceil(n / 5)`` triplets are drawn and ``n`` is
    rounded up to a multiple of five (the result's ``records``).

    Files: ``<split>.json`` for every split (a JSON list of records), and PNG views under
    ``images/<wsi_name>/<path_id>_{10,40,200}.png``; image paths in the records are relative to
    ``out_dir``. Each slide holds ``triplets_per_slide`` (min, max) triplets and splits are made by slide,
    close to the given fractions of triplets. ``workers > 1`` draws in that many ``spawn`` processes
    (same bytes as one; a calling script needs the usual ``if __name__ == "__main__":`` guard). Refuses
    to write over an earlier set unless ``overwrite`` (which removes the earlier split files and
    ``images/`` first).

    ``option_order``: ``shuffled`` (default) places the key at a balanced random letter among randomly
    ordered distractors, so answering means matching the views to the option texts; ``canonical`` lists
    the combinations in one fixed order (architecture-major), so that every item of a question type has the
    same text and the letter alone names what the views show. Letters stay balanced (combinations are) and
    no text-only rule beats chance in either order; canonical is the easier task a tiny model can learn
    in minutes (the demo's).

    Returns ``{"out_dir", "seed", "requested", "splits": {name: {"path", "records", "triplets", "slides"}},
    "triplets", "records", "images", "images_dir", "image_bytes", "seconds"}``.
    """
    t0 = time.perf_counter()
    if n < 1:
        raise ValueError(f"n (number of questions) must be positive, got {n}")
    n_questions = n
    n = -(-n_questions // len(QUESTION_TYPES))  # from here on: the number of view triplets
    if image_size < 28:
        raise ValueError(f"image_size must be at least 28 px, got {image_size}")
    if option_order not in ("shuffled", "canonical"):
        raise ValueError(f"option_order must be 'shuffled' or 'canonical', got {option_order!r}")
    if not 0.0 <= high_mag_missing_rate <= 1.0:
        raise ValueError(f"high_mag_missing_rate must be in [0, 1], got {high_mag_missing_rate}")
    lo, hi = triplets_per_slide
    if not 1 <= lo <= hi:
        raise ValueError(
            f"triplets_per_slide must be (min, max) with 1 <= min <= max, got {triplets_per_slide}"
        )
    vocab = vocabulary or DEFAULT_VOCABULARY
    errors, asym = _vocabulary_problems(vocab)
    if errors:
        raise ValueError("unusable vocabulary:\n" + "\n".join(errors))
    if asym:
        warnings.warn("vocabulary is not symmetric across options:\n" + "\n".join(asym), stacklevel=2)

    out = Path(out_dir)
    split_names = [name for name, _ in splits]
    targets = [out / f"{name}.json" for name in split_names] + [out / "images"]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a set ({', '.join(p.name for p in existing)}); use overwrite"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    # The plan, from one stream.
    plan = _view_rng(seed, 0)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(plan.integers(lo, hi + 1)))
    sizes[-1] -= sum(sizes) - n
    slide_of = np.repeat(np.arange(len(sizes)), sizes)
    n_a, n_h = len(vocab.architecture), len(vocab.nuclei)
    combos = _balanced(plan, n, n_a * n_h)
    missing = plan.random(n) < high_mag_missing_rate
    width = max(4, len(str(len(sizes) - 1)))
    triplets = [
        _Triplet(
            index=i,
            slide=int(slide_of[i]),
            wsi_name=f"SYNTH-{seed}-{int(slide_of[i]):0{width}d}",
            path_id=_uuid(plan),
            architecture=int(combos[i]) // n_h,
            nuclei=int(combos[i]) % n_h,
            with_high=not bool(missing[i]),
        )
        for i in range(n)
    ]
    letters = _balanced(plan, n * len(QUESTION_TYPES), len(LETTERS))
    assignment = _assign_splits(plan, sizes, splits)
    split_of_slide = {s: name for name, slides in assignment.items() for s in slides}

    records: dict[str, list[dict[str, Any]]] = {name: [] for name in split_names}
    jobs = []
    for t in triplets:
        rel = {
            k: f"images/{t.wsi_name}/{t.path_id}_{mag}.png"
            for k, mag in MAGNIFICATION.items()
            if k != "high_mag" or t.with_high
        }
        jobs.append(
            (
                seed,
                t,
                ([v.key for v in vocab.architecture], [v.key for v in vocab.nuclei]),
                image_size,
                {k: out / r for k, r in rel.items()},
            )
        )
        key_low, key_high = vocab.architecture[t.architecture], vocab.nuclei[t.nuclei]
        for q, qt in enumerate(QUESTION_TYPES):
            no = t.index * len(QUESTION_TYPES) + q
            # The 2 x 2 grid holding the key: one other value per attribute (the only one when there are 2).
            other_a = int(plan.choice([i for i in range(n_a) if i != t.architecture]))
            other_h = int(plan.choice([i for i in range(n_h) if i != t.nuclei]))
            distractors = [(t.architecture, other_h), (other_a, t.nuclei), (other_a, other_h)]
            distractors = [distractors[i] for i in plan.permutation(3)]
            key_slot = int(letters[no])
            grid = [*distractors[:key_slot], (t.architecture, t.nuclei), *distractors[key_slot:]]
            if option_order == "canonical":  # the plan's draws above are kept: the same stream either way
                grid = sorted(grid)
                key_slot = grid.index((t.architecture, t.nuclei))
            options = {
                LETTERS[i]: vocab.option_text(qt, vocab.architecture[a], vocab.nuclei[h])
                for i, (a, h) in enumerate(grid)
            }
            records[split_of_slide[t.slide]].append(
                {
                    "question": vocab.questions[qt],
                    "options": options,
                    "answer": LETTERS[key_slot],
                    "rationale": _rationale(key_low, key_high, t.with_high),
                    "No": no,
                    "image_path": {k: rel.get(k) for k in MAGNIFICATION},
                    "extra_info": {"wsi_name": t.wsi_name, "path_id": t.path_id, "question_type": qt},
                }
            )

    if workers > 1:
        # spawn, not fork: the caller may hold threads (JAX, Grain) that a fork would copy mid-flight.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            nbytes = sum(pool.map(_render_and_write, jobs, chunksize=4))
    else:
        nbytes = sum(_render_and_write(job) for job in jobs)

    result: dict[str, Any] = {"out_dir": str(out), "seed": seed, "requested": n_questions, "splits": {}}
    for name in split_names:
        path = out / f"{name}.json"
        items = sorted(records[name], key=lambda r: r["No"])
        path.write_text(json.dumps(items, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        result["splits"][name] = {
            "path": str(path),
            "records": len(items),
            "triplets": len(items) // len(QUESTION_TYPES),
            "slides": len(assignment[name]),
        }
    n_images = sum(len(job[4]) for job in jobs)
    result.update(
        triplets=n,
        records=n * len(QUESTION_TYPES),
        images=n_images,
        images_dir=str(out / "images"),
        image_bytes=nbytes,
        seconds=time.perf_counter() - t0,
    )
    return result
