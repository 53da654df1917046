"""The synthetic cross-scale set: release layout, determinism, no text-only shortcut, pixels that teach.

One module-scoped set of 80 view triplets (400 items) serves most tests; a few tiny sets cover
determinism, two-view items, three values per attribute and argument errors.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import PIL.Image
import pytest
from scipy import stats

from scalereasoner_jax.data.synthetic import (
    DEFAULT_VOCABULARY,
    OPTION_TEMPLATES,
    QUESTION_TYPES,
    AttributeValue,
    Vocabulary,
    check_vocabulary,
    make_vocabulary,
    option_combination,
    render_triplet,
    synthesize,
)

N_TRIPLETS = 80  # 400 items
SPLITS = (("train", 0.55), ("val", 0.1), ("test", 0.35))
LETTERS = ("A", "B", "C", "D")
RECORD_KEYS = {"question", "options", "answer", "rationale", "No", "image_path", "extra_info"}
LONE_CAPITAL = re.compile(r"(?<![\w'-])[A-Z](?![\w'-])")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, list[dict]]]:
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize(out, 5 * N_TRIPLETS, seed=7, splits=SPLITS)
    records = {name: json.loads((out / f"{name}.json").read_text(encoding="utf-8")) for name, _ in SPLITS}
    return out, summary, records


def _all(records: dict[str, list[dict]]) -> list[dict]:
    return [r for split in records.values() for r in split]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- layout and schema ------------------------------------------------------------------------------


def test_layout_and_schema(synth: tuple[Path, dict, dict]) -> None:
    out, summary, records = synth
    assert sorted(p.name for p in out.iterdir()) == ["images", "test.json", "train.json", "val.json"]
    items = _all(records)
    assert len(items) == 5 * N_TRIPLETS == summary["records"]
    assert len({r["No"] for r in items}) == len(items)  # unique across the whole set
    for name, _ in SPLITS:
        assert summary["splits"][name]["records"] == len(records[name]) > 0
        assert Path(summary["splits"][name]["path"]) == out / f"{name}.json"
        assert [r["No"] for r in records[name]] == sorted(r["No"] for r in records[name])
    for r in items:
        assert set(r) == RECORD_KEYS
        assert isinstance(r["No"], int) and isinstance(r["question"], str) and isinstance(r["rationale"], str)
        assert list(r["options"]) == list(LETTERS) and r["answer"] in LETTERS
        assert set(r["image_path"]) == {"low_mag", "mid_mag", "high_mag"}
        assert set(r["extra_info"]) == {"wsi_name", "path_id", "question_type"}
        assert r["extra_info"]["question_type"] in QUESTION_TYPES
        pid = r["extra_info"]["path_id"]
        assert str(uuid.UUID(pid)) == pid
        for key, mag in (("low_mag", 10), ("mid_mag", 40), ("high_mag", 200)):
            rel = r["image_path"][key]
            assert rel == f"images/{r['extra_info']['wsi_name']}/{pid}_{mag}.png"
            assert not PurePosixPath(rel).is_absolute() and ".." not in PurePosixPath(rel).parts
            assert (out / rel).is_file()
    n_files = sum(1 for p in (out / "images").rglob("*") if p.is_file())
    assert n_files == summary["images"] == 3 * N_TRIPLETS
    with PIL.Image.open(out / items[0]["image_path"]["low_mag"]) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (224, 224))


def test_passes_the_release_validator(synth: tuple[Path, dict, dict]) -> None:
    from scalereasoner_jax.data.schema import load_split

    out, _, records = synth
    for name, _ in SPLITS:
        valid, report = load_split(out / f"{name}.json", out, name)
        assert report.ok and len(valid) == len(records[name])


def test_splits_by_slide_and_five_types_per_triplet(synth: tuple[Path, dict, dict]) -> None:
    _, summary, records = synth
    slides = {name: {r["extra_info"]["wsi_name"] for r in recs} for name, recs in records.items()}
    names = list(slides)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not slides[a] & slides[b], (a, b)
        assert summary["splits"][a]["slides"] == len(slides[a])
    per_triplet: dict[str, list[dict]] = {}
    for r in _all(records):
        per_triplet.setdefault(r["extra_info"]["path_id"], []).append(r)
    assert len(per_triplet) == N_TRIPLETS
    per_slide = Counter(rs[0]["extra_info"]["wsi_name"] for rs in per_triplet.values())
    assert max(per_slide.values()) <= 6 and len(per_slide) > 1
    for rs in per_triplet.values():
        assert sorted(r["extra_info"]["question_type"] for r in rs) == list(QUESTION_TYPES)
        assert len({r["extra_info"]["wsi_name"] for r in rs}) == 1
        assert len({option_combination(r) for r in rs}) == 1  # one triplet, one pair of attributes


def test_options_are_the_four_combinations(synth: tuple[Path, dict, dict]) -> None:
    """Every item's options are the full 2 x 2 grid, with one fixed string per (type, combination)."""
    _, _, records = synth
    vocab = DEFAULT_VOCABULARY
    for r in _all(records):
        qt = r["extra_info"]["question_type"]
        grid = {vocab.option_text(qt, lo, hi) for lo in vocab.architecture for hi in vocab.nuclei}
        assert set(r["options"].values()) == grid
        assert r["question"] == vocab.questions[qt]
        assert len({len(t) for t in r["options"].values()}) == 1  # equal lengths within the item
        assert not any(LONE_CAPITAL.search(t) for t in r["options"].values())


def test_rationale_names_both_views_and_no_letter(synth: tuple[Path, dict, dict]) -> None:
    _, _, records = synth
    arch = {v.key: v for v in DEFAULT_VOCABULARY.architecture}
    nuc = {v.key: v for v in DEFAULT_VOCABULARY.nuclei}
    for r in _all(records):
        low, high = option_combination(r)
        text = r["rationale"]
        assert "10x" in text and "200x" in text
        assert arch[low].phrase in text and nuc[high].phrase in text
        others = [v.phrase for k, v in {**arch, **nuc}.items() if k not in (low, high)]
        assert not any(p in text for p in others)
        assert not LONE_CAPITAL.search(text), text


# --- determinism -------------------------------------------------------------------------------------


def test_deterministic_byte_identical(tmp_path: Path) -> None:
    kw = dict(seed=11, high_mag_missing_rate=0.3)
    a = synthesize(tmp_path / "a", 30, **kw)
    b = synthesize(tmp_path / "b", 30, workers=2, **kw)  # processes must not change a byte
    assert a["splits"]["train"]["records"] == b["splits"]["train"]["records"]
    da, db = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert da == db and len(da) >= 3 + 2 * 6
    synthesize(tmp_path / "c", 30, seed=12, high_mag_missing_rate=0.3)
    dc = _tree_digest(tmp_path / "c")
    assert da["train.json"] != dc["train.json"]
    pngs = [{v for k, v in d.items() if k.endswith(".png")} for d in (da, dc)]
    assert not pngs[0] & pngs[1]  # another seed draws other pixels


# --- no text-only shortcut -----------------------------------------------------------------------------


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _jaccard(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / len(wa | wb)


def _expected_hits(scores: dict[str, float], answer: str) -> float:
    """Accuracy of picking the best-scoring option, ties broken uniformly at random (1/k)."""
    best = max(scores.values())
    top = [k for k, v in scores.items() if np.isclose(v, best)]
    return (answer in top) / len(top)


def _hub_scores(options: dict[str, str]) -> dict[str, float]:
    """DESIGN.md §3: mean word-Jaccard similarity of each option to the others."""
    return {k: np.mean([_jaccard(t, u) for j, u in options.items() if j != k]) for k, t in options.items()}


def _chance_band(n: int, p: float = 0.25) -> tuple[float, float]:
    lo, hi = stats.binom.interval(0.99, n, p)
    return lo / n, hi / n


def test_text_only_rules_at_chance(synth: tuple[Path, dict, dict]) -> None:
    _, _, records = synth
    items = _all(records)
    n = len(items)
    assert n >= 400
    train_letters = Counter(r["answer"] for r in records["train"])
    top_letter = sorted(train_letters, key=lambda k: (-train_letters[k], k))[0]
    train_combos = Counter(option_combination(r) for r in records["train"])
    top_combo = sorted(train_combos, key=lambda k: (-train_combos[k], k))[0]
    vocab = DEFAULT_VOCABULARY
    arch = {v.key: v for v in vocab.architecture}
    nuc = {v.key: v for v in vocab.nuclei}
    hits: dict[str, float] = Counter()
    for r in items:
        opts, ans = r["options"], r["answer"]
        hub = _hub_scores(opts)
        assert len({round(v, 12) for v in hub.values()}) == 1  # the hub solver ties item by item
        hits["option_hub"] += _expected_hits(hub, ans)
        hits["longest"] += _expected_hits({k: len(t) for k, t in opts.items()}, ans)
        hits["shortest"] += _expected_hits({k: -len(t) for k, t in opts.items()}, ans)
        hits["most_frequent_letter"] += ans == top_letter
        fav = vocab.option_text(r["extra_info"]["question_type"], arch[top_combo[0]], nuc[top_combo[1]])
        hits["most_frequent_combination"] += opts[ans] == fav
    lo, hi = _chance_band(n)
    accuracy = {k: v / n for k, v in hits.items()}
    for name, acc in accuracy.items():
        assert lo <= acc <= hi, (name, acc, (lo, hi))


def test_answer_letters_balanced(synth: tuple[Path, dict, dict]) -> None:
    _, _, records = synth
    for group in [_all(records), *records.values()]:
        counts = Counter(r["answer"] for r in group)
        observed = [counts.get(k, 0) for k in LETTERS]
        assert stats.chisquare(observed).pvalue > 0.01, observed


# --- the attributes are in the pixels, each in its own view ----------------------------------------------


def _spectrum(path: Path) -> np.ndarray:
    """A trivial, placement-invariant statistic: the log radial power spectrum of the 28 x 28 grey view."""
    with PIL.Image.open(path) as im:
        g = np.asarray(im.convert("L").resize((28, 28), PIL.Image.Resampling.BILINEAR), np.float64) / 255
    power = np.abs(np.fft.fft2(g - g.mean())) ** 2
    f = np.fft.fftfreq(28) * 28
    radius = np.rint(np.hypot(*np.meshgrid(f, f))).astype(int)
    return np.log(np.bincount(radius.ravel(), power.ravel())[1:14] + 1e-6)


def _nearest_centroid(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    classes = sorted(set(y_train))
    centroids = np.stack([x_train[y_train == c].mean(0) for c in classes])
    return np.asarray(classes)[((x_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]


def test_attributes_learnable_and_each_in_its_own_view(synth: tuple[Path, dict, dict]) -> None:
    out, _, records = synth

    def load(split: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        recs = [r for r in records[split] if r["extra_info"]["question_type"] == "type_A"]  # one per triplet
        x = {
            v: np.stack([_spectrum(out / r["image_path"][v]) for r in recs]) for v in ("low_mag", "high_mag")
        }
        combos = np.array([option_combination(r) for r in recs])
        return x, combos[:, 0], combos[:, 1]

    (x_tr, arch_tr, nuc_tr), (x_te, arch_te, nuc_te) = load("train"), load("test")
    assert len(arch_te) >= 20 and len(set(arch_te)) == 2 and len(set(nuc_te)) == 2
    acc = {
        "low->architecture": np.mean(_nearest_centroid(x_tr["low_mag"], arch_tr, x_te["low_mag"]) == arch_te),
        "high->nuclei": np.mean(_nearest_centroid(x_tr["high_mag"], nuc_tr, x_te["high_mag"]) == nuc_te),
        "low->nuclei": np.mean(_nearest_centroid(x_tr["low_mag"], nuc_tr, x_te["low_mag"]) == nuc_te),
        "high->architecture": np.mean(
            _nearest_centroid(x_tr["high_mag"], arch_tr, x_te["high_mag"]) == arch_te
        ),
    }
    assert acc["low->architecture"] > 0.9 and acc["high->nuclei"] > 0.9, acc
    lo, hi = _chance_band(len(arch_te), 0.5)  # the other view's attribute: near chance
    assert lo <= acc["low->nuclei"] <= hi and lo <= acc["high->architecture"] <= hi, acc


def test_each_view_depends_only_on_its_own_attribute() -> None:
    """Exact independence: changing the nuclear value leaves the low and mid views bit-identical, and
    changing the architecture leaves the high view bit-identical (so neither view can leak the other)."""
    kw = dict(slide=3, image_size=64)
    a = render_triplet(5, 17, "glandular", "small_round", **kw)
    b = render_triplet(5, 17, "glandular", "large_pleomorphic", **kw)
    c = render_triplet(5, 17, "solid", "small_round", **kw)
    assert np.array_equal(a["low_mag"], b["low_mag"]) and np.array_equal(a["mid_mag"], b["mid_mag"])
    assert np.array_equal(a["high_mag"], c["high_mag"])
    assert not np.array_equal(a["high_mag"], b["high_mag"]) and not np.array_equal(a["low_mag"], c["low_mag"])
    # Without a high view the mid view carries the nuclei instead, so two-view items stay answerable.
    d = render_triplet(5, 17, "glandular", "large_pleomorphic", with_high=False, **kw)
    assert d["high_mag"] is None and np.array_equal(a["low_mag"], d["low_mag"])
    assert not np.array_equal(a["mid_mag"], d["mid_mag"])


# --- variants and errors -----------------------------------------------------------------------------------


def test_two_view_items(tmp_path: Path) -> None:
    summary = synthesize(tmp_path, 13, seed=1, high_mag_missing_rate=1.0, splits=(("train", 1.0),))
    assert (summary["requested"], summary["records"], summary["triplets"], summary["images"]) == (
        13,
        15,
        3,
        6,
    )
    for r in json.loads((tmp_path / "train.json").read_text()):
        assert r["image_path"]["high_mag"] is None and (tmp_path / r["image_path"]["mid_mag"]).is_file()
        assert "no 200x view" in r["rationale"]
    assert not list(tmp_path.rglob("*_200.png"))


def test_three_values_per_attribute(tmp_path: Path) -> None:
    """With 3 x 3 values the options are a 2 x 2 grid holding the key, still tied for the hub solver."""
    vocab = make_vocabulary(("glandular", "solid", "cords"), ("small_round", "large_pleomorphic", "spindle"))
    assert check_vocabulary(vocab) == []
    synthesize(tmp_path, 45, seed=2, vocabulary=vocab, splits=(("train", 1.0),), image_size=112)
    items = json.loads((tmp_path / "train.json").read_text())
    assert {option_combination(r, vocab) for r in items} == {
        (a.key, h.key) for a in vocab.architecture for h in vocab.nuclei
    }  # balanced blocks: all nine combinations in nine triplets
    grid = {
        qt: {vocab.option_text(qt, a, h): (a.key, h.key) for a in vocab.architecture for h in vocab.nuclei}
        for qt in QUESTION_TYPES
    }
    for r in items:
        low, high = option_combination(r, vocab)
        shown = [grid[r["extra_info"]["question_type"]][t] for t in r["options"].values()]
        lows, highs = {a for a, _ in shown}, {h for _, h in shown}
        assert len(lows) == len(highs) == 2 and low in lows and high in highs and len(set(shown)) == 4
        assert len({round(v, 12) for v in _hub_scores(r["options"]).values()}) == 1
    with PIL.Image.open(tmp_path / items[0]["image_path"]["high_mag"]) as im:
        assert im.size == (112, 112)


def test_canonical_option_order(tmp_path: Path) -> None:
    """One fixed option list per question type: the letter names the combination the views show, the
    text carries nothing, letters stay balanced; the views are those of the shuffled set (same plan)."""
    kw = dict(seed=4, splits=(("train", 1.0),), image_size=56)
    synthesize(tmp_path / "c", 80, option_order="canonical", **kw)
    synthesize(tmp_path / "s", 80, **kw)
    canonical = json.loads((tmp_path / "c" / "train.json").read_text())
    shuffled = json.loads((tmp_path / "s" / "train.json").read_text())
    # architecture-major, in the vocabulary's order
    index = [(a.key, h.key) for a in DEFAULT_VOCABULARY.architecture for h in DEFAULT_VOCABULARY.nuclei]
    for qt in QUESTION_TYPES:
        items = [r for r in canonical if r["extra_info"]["question_type"] == qt]
        assert len({json.dumps([r["question"], r["options"]]) for r in items}) == 1  # the same text
    for c, s in zip(canonical, shuffled, strict=True):
        assert option_combination(c) == option_combination(s)  # same views, same key combination
        assert c["options"][c["answer"]] == s["options"][s["answer"]]
        assert c["answer"] == "ABCD"[index.index(option_combination(c))]
    counts = Counter(r["answer"] for r in canonical)
    assert set(counts) == set("ABCD") and max(counts.values()) - min(counts.values()) <= 5  # one triplet
    with pytest.raises(ValueError, match="option_order"):
        synthesize(tmp_path / "x", 5, option_order="sorted", **kw)


def test_argument_errors(tmp_path: Path) -> None:
    synthesize(tmp_path, 5, seed=0, splits=(("train", 1.0),))
    with pytest.raises(FileExistsError):
        synthesize(tmp_path, 5, seed=0, splits=(("train", 1.0),))
    synthesize(tmp_path, 5, seed=3, splits=(("train", 1.0),), overwrite=True)
    assert len(list((tmp_path / "images").rglob("*.png"))) == 3  # the earlier set is gone
    with pytest.raises(ValueError, match="at least two values"):
        synthesize(tmp_path / "x", 1, vocabulary=make_vocabulary(("glandular",)))
    bad = Vocabulary(
        DEFAULT_VOCABULARY.architecture,
        (*DEFAULT_VOCABULARY.nuclei[:1], AttributeValue("small_round", "type B nuclei", "x")),
        options=dict(OPTION_TEMPLATES),
    )
    with pytest.raises(ValueError, match="capital letter"):
        synthesize(tmp_path / "y", 1, vocabulary=bad)
    with pytest.raises(ValueError):
        synthesize(tmp_path / "z", 0)
