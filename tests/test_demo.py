"""A short variant of the main job (``scalereasoner demo``): every stage runs and writes its outputs.

The real figures (learning from the images) come from the full ``make demo``; here a few steps on a small
set check the plumbing: data -> TFDS -> tiny model -> SFT -> GRPO -> export -> HF evaluation -> results.
"""

from __future__ import annotations

import json

import pytest

from scalereasoner_jax.demo import DemoConfig, run_demo


def test_short_demo_runs_every_stage(tmp_path):
    cfg = DemoConfig(
        out=str(tmp_path / "demo"),
        questions=100,
        image_size=56,
        sft_steps=2,
        grpo_steps=2,
        prompts_per_step=2,
        group_size=2,
        eval_limit=4,
    )
    lines: list[str] = []
    results = run_demo(cfg, log=lines.append)
    out = tmp_path / "demo"
    saved = json.loads((out / "results.json").read_text())
    assert saved["final_accuracy"] == results["final_accuracy"]
    for key in ("warmup_accuracy", "final_accuracy", "no_image_accuracy", "chance"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved["chance"] == 0.25 and saved["eval_items"] == 4
    # Had the no-image row's unanswered items been guessed: their expected 1/4 on top of what it got right.
    guessed = saved["no_image_accuracy"] + saved["no_image_unanswered_rate"] * 0.25
    assert saved["no_image_accuracy_if_guessed"] == pytest.approx(guessed)
    assert (out / "curve.png").stat().st_size > 10_000
    assert (out / "hf" / "model.safetensors.index.json").is_file() and (out / "hf" / "README.md").is_file()
    assert saved["export_parity"]["passed"] is True
    assert len(json.loads((out / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])) > 5
    rows = json.loads((out / "eval" / "results.json").read_text())["rows"]
    assert set(rows) == {"images", "no_images", "option_hub"}
    assert any("Summary" in line for line in lines)
