"""The language-model adversary: CircularEval logic (with stub scorers) and the Hugging Face mechanics
(a tiny random Qwen2.5-VL run on text only: rotations, k samples, hit counts, batching, tokenisation)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from scalereasoner_jax.curation import CurationConfig, curate
from scalereasoner_jax.curation.leaky import make_leaky_set
from scalereasoner_jax.curation.lm import HFLetterScorer, circular_lm_eval
from scalereasoner_jax.data.schema import ScaleVQARecord, ValidationPolicy, validate_split


def _records(kind: str, n_triplets: int, seed: int = 0) -> list[ScaleVQARecord]:
    policy = ValidationPolicy(check_images=False, skip_invalid=True)
    records, report = validate_split(make_leaky_set(kind, n_triplets, seed), "/x", "test", policy)
    assert not report.problems
    return records


def _prefers_a(prompts: Sequence[tuple[str, Mapping[str, str]]]) -> list[np.ndarray]:
    """A position-biased 'model': always option A, whatever the text."""
    return [np.array([0.0] + [-8.0] * (len(opts) - 1)) for _, opts in prompts]


def _prefers_longest(prompts: Sequence[tuple[str, Mapping[str, str]]]) -> list[np.ndarray]:
    """A content 'model': the longest option, wherever it is."""
    return [np.array([len(t) / 4.0 for t in opts.values()]) for _, opts in prompts]


def test_circular_eval_cancels_position_bias() -> None:
    recs = _records("letter", 4)  # key always A
    res = circular_lm_eval(recs, _prefers_a, samples=4, temperature=1.0, seed=0, name="biased")
    assert res.credit.mean() > 0.95  # right on the published order...
    assert not res.votes.any()  # ...but never under every rotation
    assert all(h[0] >= 3 and max(h[1:]) <= 1 for h in res.hits)
    assert res.details["picked_letters"]["A"] > 0.95 * 4 * 4 * len(recs)


def test_circular_eval_finds_a_content_shortcut() -> None:
    recs = _records("longest", 4)
    res = circular_lm_eval(recs, _prefers_longest, samples=3, temperature=0.0, name="reader")
    assert res.votes.all() and res.credit.tolist() == [1.0] * len(recs)
    assert res.hits == [[3, 3, 3, 3]] * len(recs) and res.samples == 3


def test_lm_adversary_in_the_panel(tmp_path: Path) -> None:
    raw = make_leaky_set("longest", 4, seed=0)
    data = tmp_path / "x.json"
    data.write_text(json.dumps(raw), encoding="utf-8")
    config = CurationConfig(adversaries=("option_hub",), min_votes=1, lm_samples=2, lm_temperature=0.0)
    report = curate(data, tmp_path / "out", config=config, lm_scorers={"lm:reader": _prefers_longest})
    assert report["flag_rule"]["n_adversaries"] == 2 and report["flag_rule"]["counted"] == ["lm:reader"]
    assert report["adversaries"]["lm:reader"]["accuracy"] == 1.0 and report["flagged"] == 20
    entry = json.loads((tmp_path / "out" / "flagged.json").read_text(encoding="utf-8"))[0]
    assert entry["votes"]["lm:reader"] == {
        "answer": entry["record"]["answer"],
        "vote": True,
        "counted": True,
        "hits": [2, 2, 2, 2],
        "samples": 2,
    }


def test_hf_lm_adversary_mechanics(tiny_hf_dir: Path) -> None:
    recs = _records("letter", 2)  # 10 items x 4 rotations
    scorer = HFLetterScorer(tiny_hf_dir, device="cpu", batch_size=8)
    seen: list[np.ndarray] = []

    def recording(prompts: Sequence[tuple[str, Mapping[str, str]]]) -> list[np.ndarray]:
        seen.extend(scorer(prompts))
        return seen

    res = circular_lm_eval(recs, recording, samples=5, temperature=1.0, seed=3, name="tiny")
    assert len(seen) == 40
    assert len(res.hits) == 10 and all(len(h) == 4 for h in res.hits)
    assert all(0 <= x <= 5 for h in res.hits for x in h)
    assert sum(res.details["picked_letters"].values()) == 10 * 4 * 5
    assert res.credit.tolist() == [h[0] / 5 for h in res.hits]
    assert res.votes.tolist() == [all(2 * x > 5 for x in h) for h in res.hits]
    # Rotation r moves the key: the letter probabilities of one item differ between rotations.
    assert not np.allclose(seen[0], seen[1])
    # Batching and padding do not change the scores (prompts of different lengths in one batch).
    prompts = [(r.question, r.options) for r in recs]
    one_by_one = HFLetterScorer(tiny_hf_dir, device="cpu", batch_size=1)(prompts)
    np.testing.assert_allclose(np.stack(one_by_one), np.stack(seen[::4]), atol=1e-4)
    # The seed alone fixes the samples.
    again = circular_lm_eval(recs, lambda p: seen, samples=5, temperature=1.0, seed=3)
    assert again.hits == res.hits
    assert circular_lm_eval(recs, lambda p: seen, samples=5, temperature=1.0, seed=4).hits != res.hits


def test_hf_letter_scores_match_a_direct_computation(tiny_hf_dir: Path) -> None:
    """After 'Answer: ' the tiny tokenizer has ' A' as one token but ' B' as two: the general path, which
    scores each letter's whole continuation after the tokens all letters share."""
    import torch

    rec = _records("hub", 1)[0]
    scorer = HFLetterScorer(tiny_hf_dir, device="cpu", answer_prefix="Answer: ")
    assert len(scorer._jobs(rec.question, rec.options)) == 4  # one pass per letter: the general path
    got = scorer([(rec.question, rec.options)])[0]
    ctx, sep = scorer.context(rec.question, rec.options)
    assert ctx.endswith("Answer: ") and sep == ""
    seqs = [scorer.tokenizer(ctx + k, add_special_tokens=False)["input_ids"] for k in rec.options]
    common = min(
        next((i for i, (a, b) in enumerate(zip(s, seqs[0], strict=False)) if a != b), len(s))
        for s in seqs[1:]
    )
    want = []
    for s in seqs:
        with torch.no_grad():
            logits = scorer.model(input_ids=torch.tensor([s])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        want.append(sum(float(lp[p - 1, s[p]]) for p in range(common, len(s))))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_hf_lm_through_the_cli_config(tiny_hf_dir: Path, tmp_path: Path) -> None:
    raw = make_leaky_set("letter", 4, seed=0)
    data = tmp_path / "l.json"
    data.write_text(json.dumps(raw), encoding="utf-8")
    config = CurationConfig(lm_dirs=(str(tiny_hf_dir),), lm_samples=3, lm_device="cpu")
    report = curate(data, tmp_path / "out", config=config)
    name = f"lm:{tiny_hf_dir.name}"
    assert report["flag_rule"]["n_adversaries"] == 7
    a = report["adversaries"][name]
    assert a["protocol"] == "circular" and a["samples"] == 3 and a["n"] == 20
    assert report["flagged"] == 20  # letter_prior and the learned solver
    entry = json.loads((tmp_path / "out" / "flagged.json").read_text(encoding="utf-8"))[0]
    assert len(entry["votes"][name]["hits"]) == 4 and entry["votes"][name]["samples"] == 3
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        HFLetterScorer(tmp_path)
