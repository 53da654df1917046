"""Leakage-aware curation: adversaries find planted artefacts, the symmetric set shows none, checks,
remediation, invalid records and the accounting identity (kept + flagged + invalid = n_items).

Item sets are small and text only (no images) except the symmetric synthetic set, whose 28 px views are
checked through ``--images``; the whole module runs in a few seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

from scalereasoner_jax.curation import CurationConfig, curate
from scalereasoner_jax.curation.adversaries import run_rule
from scalereasoner_jax.curation.cli import add_parser
from scalereasoner_jax.curation.constraints import (
    check_identical_options,
    check_key_length,
    check_letter_balance,
    check_magnification_words,
    check_near_duplicate_questions,
    check_rationale_letter,
)
from scalereasoner_jax.curation.folds import grouped_folds
from scalereasoner_jax.curation.leaky import make_leaky_set
from scalereasoner_jax.curation.remediation import rebalance_letters
from scalereasoner_jax.curation.text import letter_mentions, remap_letters
from scalereasoner_jax.data.schema import ScaleVQARecord, ValidationPolicy, validate_split
from scalereasoner_jax.data.synthetic import synthesize

RULE_NAMES = ("option_hub", "longest_option", "shortest_option", "question_overlap")


def _write(path: Path, items: list[Any]) -> Path:
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def _records(items: list[dict[str, Any]]) -> list[ScaleVQARecord]:
    policy = ValidationPolicy(check_images=False, skip_invalid=True)
    records, report = validate_split(items, "/nonexistent", "test", policy)
    assert not report.problems, report.format()
    return records


def _load(out: Path, name: str) -> list[dict[str, Any]]:
    return json.loads((out / name).read_text(encoding="utf-8"))


def assert_accounting(report: dict[str, Any], out: Path, raw: list[Any]) -> None:
    """kept + flagged + invalid = n_items, and every input index is in exactly one of the three."""
    n = len(raw)
    assert report["n_items"] == n
    assert report["kept"] + report["flagged"] + report["invalid"] == n
    assert report["accounting_ok"] is True
    curated, flagged, invalid = (_load(out, f) for f in ("curated.json", "flagged.json", "invalid.json"))
    assert len(flagged) == report["flagged"] and len(invalid) == report["invalid"]
    drop = report["config"]["drop_flagged"]
    assert len(curated) == report["kept"] + (0 if drop else report["flagged"])
    flagged_idx = [f["index"] for f in flagged]
    invalid_idx = [i["index"] for i in invalid]
    flagged_no = {f["No"] for f in flagged}
    index_of_no = {}
    for i, item in enumerate(raw):
        if i not in invalid_idx:
            index_of_no[item["No"]] = i  # valid records have distinct No (duplicates are invalid)
    kept_idx = [index_of_no[c["No"]] for c in curated if not (not drop and c["No"] in flagged_no)]
    every = kept_idx + flagged_idx + invalid_idx
    assert sorted(every) == list(range(n)), "an item is lost or counted twice"


# --- planted artefacts ---------------------------------------------------------------------------------

LEAKS = [("longest", "longest_option"), ("hub", "option_hub"), ("letter", "letter_prior")]


@pytest.mark.parametrize(("kind", "matching"), LEAKS)
def test_leaky_set_found_by_its_adversary_and_flagged(tmp_path: Path, kind: str, matching: str) -> None:
    raw = make_leaky_set(kind, n_triplets=24, seed=1)
    report = curate(_write(tmp_path / f"{kind}.json", raw), tmp_path / "out")
    adv = report["adversaries"]
    assert adv[matching]["accuracy"] == 1.0
    assert adv[matching]["ci95"][0] > adv[matching]["chance"] == 0.25
    assert adv["learned"]["accuracy"] >= 0.95
    # Only the planted artefact is found: the matching specialist and the learned generalist.
    assert {name for name, a in adv.items() if a["above_chance"]} == {matching, "learned"}
    assert report["flag_rule"]["counted"] == [n for n in adv if n in (matching, "learned")]
    assert report["flagged"] == len(raw) and report["kept"] == 0
    for entry in _load(tmp_path / "out", "flagged.json"):
        assert entry["votes"][matching] == {
            "answer": entry["record"]["answer"],
            "vote": True,
            "counted": True,
        }
        assert entry["n_votes"] >= 2 and any(r.startswith("adversaries: ") for r in entry["reasons"])
    per_type = adv[matching]["per_type"]
    assert sorted(per_type) == ["type_A", "type_B", "type_C", "type_D", "type_E"]
    assert all(t["accuracy"] == 1.0 and t["n"] == 24 for t in per_type.values())
    checks = report["constraints"]
    assert checks["answer_letter_balance"]["passed"] is (kind != "letter")
    assert checks["key_longest_or_shortest"]["passed"] is (kind != "longest")
    assert_accounting(report, tmp_path / "out", raw)
    assert (tmp_path / "out" / "report.md").read_text(encoding="utf-8").startswith("# Leakage report")


def test_symmetric_synthetic_set_has_no_adversary_above_chance(tmp_path: Path) -> None:
    synthesize(tmp_path / "syn", 300, seed=3, image_size=28, splits=(("test", 1.0),))
    data = tmp_path / "syn" / "test.json"
    raw = json.loads(data.read_text(encoding="utf-8"))
    report = curate(data, tmp_path / "out", images=tmp_path / "syn")
    adv = report["adversaries"]
    assert set(adv) == {*RULE_NAMES, "letter_prior", "learned"}
    for name, a in adv.items():
        assert a["n"] == 300
        assert not a["above_chance"], (name, a["accuracy"], a["ci95"])
        assert a["ci95"][0] <= 0.25, name
    for name in ("option_hub", "longest_option", "shortest_option"):
        assert adv[name]["accuracy"] == pytest.approx(0.25, abs=1e-12)  # tied on every item
        assert adv[name]["votes"] == 0  # a tie is never right under every rotation
    assert report["flag_rule"]["counted"] == []
    assert report["flagged"] == 0 and report["invalid"] == 0 and report["kept"] == 300
    assert report["constraints"]["answer_letter_balance"]["passed"] is True
    assert report["constraints"]["key_longest_or_shortest"]["passed"] is True
    assert_accounting(report, tmp_path / "out", raw)


def test_rule_vote_means_right_under_every_rotation() -> None:
    items = make_leaky_set("longest", n_triplets=2, seed=0)
    # Item 0: the key ties with one distractor for the longest option.
    key = items[0]["answer"]
    other = next(k for k in items[0]["options"] if k != key)
    items[0]["options"][other] = items[0]["options"][key].upper()
    res = run_rule("longest_option", _records(items))
    assert res.credit[0] == 0.5 and not res.votes[0]  # tie split; not right under every rotation
    assert res.credit[1:].tolist() == [1.0] * 9 and res.votes[1:].all()


# --- invalid records, image paths, accounting ------------------------------------------------------------


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.full((28, 28, 3), 200, np.uint8)).save(path)


def test_invalid_records_reported_not_lost(tmp_path: Path) -> None:
    raw: list[Any] = make_leaky_set("hub", n_triplets=6, seed=2)
    root = tmp_path / "images"
    for item in raw:
        for rel in item["image_path"].values():
            _png(root / rel)
    outside = tmp_path / "outside.png"
    _png(outside)
    (root / "escape.png").symlink_to(outside)
    bad = copy.deepcopy(raw[:7])
    for i, b in enumerate(bad):
        b["extra_info"]["path_id"] = f"copy-{i}"  # not a duplicate (path_id, question_type)
    bad[0]["answer"] = "E"
    del bad[1]["rationale"]
    bad[2]["image_path"]["low_mag"] = "../outside.png"
    bad[3]["image_path"]["mid_mag"] = "escape.png"  # inside lexically, outside once the link is followed
    bad[4]["image_path"]["high_mag"] = "images/missing.png"
    bad[5]["No"] = raw[0]["No"]  # duplicate No
    for b, no in zip(bad, range(1000, 1007), strict=True):
        if b is not bad[5]:
            b["No"] = no
    bad[6]["extra_info"]["question_type"] = "type_Z"
    raw = [*raw, *bad, "not a record"]
    data = _write(tmp_path / "val.json", raw)
    report = curate(data, tmp_path / "out", images=root)
    invalid = {i["index"]: i for i in _load(tmp_path / "out", "invalid.json")}
    base = len(raw) - 8
    assert sorted(invalid) == list(range(base, len(raw)))
    reasons = {i - base: {r["reason"] for r in inv["reasons"]} for i, inv in invalid.items()}
    assert reasons == {
        0: {"answer_not_in_options"},
        1: {"missing_field"},
        2: {"unsafe_image_path"},
        3: {"unsafe_image_path"},
        4: {"missing_image"},
        5: {"duplicate_no"},
        6: {"bad_question_type"},
        7: {"not_an_object"},
    }
    detail = invalid[base + 3]["reasons"][0]["detail"]
    assert f"split=val index={base + 3} No=1003" in detail and "escape.png" in detail
    assert invalid[base + 7]["record"] == "not a record"
    assert report["invalid"] == 8 and report["invalid_reasons"]["unsafe_image_path"] == 2
    assert_accounting(report, tmp_path / "out", raw)
    # Text only (no --images): the link is not followed and the missing file is not looked for.
    report2 = curate(data, tmp_path / "out2")
    assert report2["invalid"] == 6
    assert_accounting(report2, tmp_path / "out2", raw)


def test_keep_flagged_and_no_overwrite(tmp_path: Path) -> None:
    raw = make_leaky_set("letter", n_triplets=8, seed=0)
    data = _write(tmp_path / "x.json", raw)
    report = curate(data, tmp_path / "out", config=CurationConfig(drop_flagged=False))
    assert report["flagged"] == 40 and report["curated"] == 40
    assert _load(tmp_path / "out", "curated.json") == raw
    assert_accounting(report, tmp_path / "out", raw)
    with pytest.raises(FileExistsError, match=r"curated\.json"):
        curate(data, tmp_path / "out")


# --- constraint checks -----------------------------------------------------------------------------------


def test_item_checks_find_what_they_should() -> None:
    items = make_leaky_set("hub", n_triplets=2, seed=0)
    items[0]["options"]["B"] = items[0]["options"]["A"].upper().replace(",", " ;")
    items[1]["rationale"] = f"Option {'A' if items[1]['answer'] != 'A' else 'B'} matches the 40x view."
    items[2]["rationale"] = f"The answer is ({items[2]['answer']})."
    e = next(i for i, it in enumerate(items) if it["extra_info"]["question_type"] == "type_E")
    items[e]["options"]["C"] += " at 200x"
    items[3]["options"]["A"] += " seen at high power"  # type_D: allowed, but uneven
    recs = _records(items)
    ident = check_identical_options(recs)
    assert list(ident.items) == [0] and "A == B" in ident.items[0]
    rat = check_rationale_letter(recs)
    assert list(rat.items) == [1] and rat.summary["rationales_naming_the_key"] == 1
    mag = check_magnification_words(recs, ["type_E"])
    assert list(mag.items) == [e] and "200x" in mag.items[e]
    assert mag.summary["uneven_items"] == 2  # item e and item 3


def test_dataset_checks() -> None:
    letter = _records(make_leaky_set("letter", n_triplets=8, seed=0))
    balanced = _records(make_leaky_set("hub", n_triplets=8, seed=0))
    longest = _records(make_leaky_set("longest", n_triplets=8, seed=0))
    lb = check_letter_balance(letter)
    assert lb.passed is False and lb.summary["counts"] == {"A": 40, "B": 0, "C": 0, "D": 0}
    assert lb.count == 30 and lb.summary["p_value"] < 1e-10
    assert check_letter_balance(balanced).passed is True
    kl = check_key_length(longest)
    assert kl.passed is False and kl.summary["longest"]["rate"] == 1.0
    assert kl.summary["longest"]["expected_rate"] == pytest.approx(0.25)
    assert check_key_length(balanced).passed is True


def test_near_duplicate_questions() -> None:
    items = make_leaky_set("hub", n_triplets=2, seed=0)
    long_q = "Which combination of glandular architecture and nuclear detail is seen in this field today?"
    items[0]["question"] = long_q
    items[6]["question"] = long_q.replace("today", "here")  # one word changed: trigram Jaccard 0.867
    items[7]["question"] = long_q.upper() + "!!"  # identical after normalisation
    for i in (1, 2, 3, 4, 5, 8, 9):
        items[i]["question"] = f"Question number {i} about a different topic entirely, item {i * 7}."
    res = check_near_duplicate_questions(_records(items), threshold=0.8)
    assert sorted(res.items) == [0, 6, 7]
    assert res.summary["groups"] == 1 and res.examples[0]["size"] == 3
    assert check_near_duplicate_questions(_records(items), threshold=0.9).summary["groups"] == 1  # 0 & 7 only
    assert sorted(check_near_duplicate_questions(_records(items), threshold=0.9).items) == [0, 7]


def test_letter_mentions_and_remap() -> None:
    keys = ["A", "B", "C", "D"]
    text = "Option C is wrong; options A and D fit, so (B). A gland is seen."
    assert [m[2] for m in letter_mentions(text, keys)] == ["C", "A", "D", "B"]
    assert letter_mentions("A gland with hepatitis B features", keys) == []
    new, n = remap_letters(text, keys, {"A": "B", "B": "C", "C": "D", "D": "A"})
    assert n == 4 and new == "Option D is wrong; options B and A fit, so (C). A gland is seen."


def test_grouped_folds_never_split_a_slide() -> None:
    groups = [f"s{i % 7}" for i in range(50)]
    folds = grouped_folds(groups, 5, seed=0)
    assert {(g, int(f)) for g, f in zip(groups, folds, strict=True)} == {
        (g, int(folds[groups.index(g)])) for g in set(groups)
    }
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least 2 groups"):
        grouped_folds(["one"] * 5, 5)


# --- remediation -------------------------------------------------------------------------------------------


def test_rebalance_letters_keeps_items_and_rationales(tmp_path: Path) -> None:
    items = make_leaky_set("letter", n_triplets=24, seed=0)
    items[3]["rationale"] = "Option A fits both views; option C does not."
    items[5]["options"]["D"] = "All of the above"
    recs = _records(items)
    rb = rebalance_letters(recs, seed=0)
    assert 5 in rb.not_permuted and rb.records[5] == recs[5]
    assert rb.before["p_value"] < 1e-10 and rb.after["p_value"] > 0.9
    for qt in ("type_A", "type_B", "type_C", "type_D", "type_E"):
        counts = Counter(r.answer for r in rb.records if r.question_type == qt)
        assert max(counts.values()) - min(counts.values()) <= 2, (qt, counts)  # balanced per type too
    for old, new in zip(recs, rb.records, strict=True):
        assert new.options[new.answer] == old.options[old.answer]
        assert sorted(new.options.values()) == sorted(old.options.values())
    m = rb.permutations[3]
    assert rb.records[3].rationale == f"Option {m['A']} fits both views; option {m['C']} does not."
    assert rb.records[3].options[m["C"]] == recs[3].options["C"]
    assert rebalance_letters(recs, seed=0).permutations == rb.permutations
    assert rebalance_letters(recs, seed=1).permutations != rb.permutations

    raw = make_leaky_set("letter", n_triplets=24, seed=0)
    report = curate(_write(tmp_path / "l.json", raw), tmp_path / "out", config=CurationConfig(rebalance=True))
    assert report["remediation"]["letters_before"]["counts"]["A"] == 120
    assert report["remediation"]["letters_after"]["p_value"] > 0.9
    assert not report["adversaries"]["letter_prior"]["above_chance"]  # the artefact is gone
    assert report["flagged"] == 0 and report["constraints"]["answer_letter_balance"]["passed"] is False
    curated = _load(tmp_path / "out", "curated.json")
    by_no = {r["No"]: r for r in raw}
    for c in curated:
        src = by_no[c["No"]]
        assert c["options"][c["answer"]] == src["options"][src["answer"]]
        assert {k: v for k, v in c.items() if k not in ("options", "answer", "rationale")} == {
            k: v for k, v in src.items() if k not in ("options", "answer", "rationale")
        }
    assert_accounting(report, tmp_path / "out", raw)


# --- the CLI entry ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalereasoner")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_curate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = make_leaky_set("longest", n_triplets=8, seed=0)
    data = _write(tmp_path / "test.json", raw)
    out = tmp_path / "out"
    args = _parser().parse_args(
        ["curate", "--data", str(data), "--out", str(out), "--adversaries", "longest_option,learned"]
    )
    assert args.func(args) == 0
    assert "40 items: kept 0, flagged 40, invalid 0" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert list(report["adversaries"]) == ["longest_option", "learned"]
    assert report["flag_rule"]["n_adversaries"] == 2 and report["flag_rule"]["min_votes"] == 2
    assert_accounting(report, out, raw)
    # Outputs present: refused without --overwrite; accepted with it.
    args = _parser().parse_args(["curate", "--data", str(data), "--out", str(out)])
    assert args.func(args) == 2
    assert "use overwrite" in capsys.readouterr().err
    args = _parser().parse_args(
        ["curate", "--data", str(data), "--out", str(out), "--overwrite", "--keep_flagged"]
    )
    assert args.func(args) == 0
    # Bad input names the file; bad options name the option.
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    args = _parser().parse_args(
        ["curate", "--data", str(tmp_path / "broken.json"), "--out", str(tmp_path / "b")]
    )
    assert args.func(args) == 2
    assert "broken.json: not valid JSON" in capsys.readouterr().err
    args = _parser().parse_args(
        ["curate", "--data", str(data), "--out", str(tmp_path / "c"), "--adversaries", "oracle"]
    )
    assert args.func(args) == 2
    assert "unknown adversaries ['oracle']" in capsys.readouterr().err
    args = _parser().parse_args(
        ["curate", "--data", str(data), "--out", str(tmp_path / "d"), "--min_votes", "9"]
    )
    assert args.func(args) == 2
    assert "min_votes (h) must be between 1 and the 6 adversaries" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["curate", "--data", "x", "--out", "y", "--keep_flagged", "--drop_flagged"])
