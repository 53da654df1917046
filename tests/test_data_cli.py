"""`scalereasoner data synth | build | inspect` end to end, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from scalereasoner_jax.cli import main


@pytest.fixture(scope="module")
def synth_release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "release"
    assert main(["data", "synth", "--out", str(out), "--n", "60", "--seed", "3"]) == 0
    return out


def test_synth_build_inspect(synth_release, tmp_path, capsys):
    capsys.readouterr()
    data_dir = tmp_path / "tfds"
    assert (
        main(["data", "build", "scale_vqa", "--manual_dir", str(synth_release), "--data_dir", str(data_dir)])
        == 0
    )
    out = capsys.readouterr().out
    built = json.loads(out[out.index("{\n") :])  # TFDS may print progress before the result
    records = {s: len(json.loads((synth_release / f"{s}.json").read_text())) for s in built["splits"]}
    assert built["splits"] == records and sum(records.values()) == 60

    png = tmp_path / "example.png"
    assert (
        main(
            [
                "data",
                "inspect",
                "scale_vqa",
                "--data_dir",
                str(data_dir),
                "--split",
                "train",
                "--out",
                str(png),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"train: total {records['train']}" in out
    for qtype in ("type_A", "type_B", "type_C", "type_D", "type_E"):
        assert f"{qtype} {records['train'] // 5}" in out  # five questions per triplet
    with Image.open(png) as im:
        assert im.width >= 3 * 320 and im.height > 320  # three views side by side, text below


def test_build_fails_with_every_bad_record_listed(synth_release, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    records = json.loads((synth_release / "train.json").read_text())[:3]
    records[0]["answer"] = "Z"
    records[1]["image_path"]["low_mag"] = "../outside.png"
    for rec in records:
        for rel in rec["image_path"].values():
            if rel and ".." not in rel:
                (bad / rel).parent.mkdir(parents=True, exist_ok=True)
                (bad / rel).write_bytes((synth_release / rel).read_bytes())
    (bad / "train.json").write_text(json.dumps(records))
    code = main(["data", "build", "scale_vqa", "--manual_dir", str(bad), "--data_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"split=train index=0 No={records[0]['No']}" in err and "answer" in err
    assert f"split=train index=1 No={records[1]['No']}" in err and "../outside.png" in err
