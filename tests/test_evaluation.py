"""Evaluation: answer extraction, metrics on known completions, ablation inputs, and the hf and jax
backends agreeing on greedy answers of the tiny model (through the CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scalereasoner_jax.evaluation.backends import Generation
from scalereasoner_jax.evaluation.baselines import option_hub_hit
from scalereasoner_jax.evaluation.extraction import extract_choice
from scalereasoner_jax.evaluation.metrics import wilson_interval
from scalereasoner_jax.evaluation.runner import (
    EvalConfig,
    EvalError,
    evaluate_items,
    make_prompts,
    parse_data_spec,
    score,
)

OPTIONS = {
    "A": "glands with lumens at 10x",
    "B": "solid sheet growth at 10x",
    "C": "glands with lumens at 10x, large nuclei",
    "D": "slender cell cords",
}

# (completion, expected letter, expected method)
TRICKY = [
    ("<think>x</think><answer>B</answer>", "B", "strict"),
    ("<think>x</think><answer> c </answer>", "C", "strict"),
    ("<answer>glands</answer> then <answer>D</answer>", "D", "strict"),  # text pair passed over
    ("<answer>E</answer>", None, "none"),  # not one of the item's letters, and nothing else
    ("<answer>E</answer> The answer is B.", "B", "letter_pattern"),
    ("<answer>B. solid sheet growth at 10x</answer>", "B", "letter_pattern"),
    ("<answer>(D)</answer>", "D", "letter_pattern"),
    ("The answer is (A).", "A", "letter_pattern"),
    ("Answer: C", "C", "letter_pattern"),
    ("I choose option D because the cords are slender.", "D", "letter_pattern"),
    ("B", "B", "letter_pattern"),
    ("Looking at both views.\nC) glands with lumens", "C", "letter_pattern"),
    ("The answer is A, or maybe option B.", None, "none"),  # two letters: ambiguous, no guess
    ("a lesion with a pattern", None, "none"),  # lower-case 'a' is an article, not a letter
    ("<answer>solid sheet growth at 10x</answer>", "B", "option_text"),
    ("It is Solid  sheet growth at 10X!", "B", "option_text"),
    # "glands with lumens at 10x" is inside C's text: the containing option wins
    ("<answer>glands with lumens at 10x, large nuclei</answer>", "C", "option_text"),
    ("glands with lumens at 10x or solid sheet growth at 10x", None, "none"),
    ("", None, "none"),
    ("<think>unclosed <answer>", None, "none"),
]


@pytest.mark.parametrize(("completion", "letter", "method"), TRICKY)
def test_extraction_rules(completion, letter, method):
    got = extract_choice(completion, OPTIONS)
    assert (got.letter, got.method) == (letter, method)


def test_extraction_with_letters_only():
    assert extract_choice("<answer>b</answer>", "ABCD").letter == "B"
    assert extract_choice("solid sheet growth at 10x", "ABCD").letter is None  # no texts to match


def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def _items(n=6):
    rng = np.random.default_rng(0)
    types = ["type_A", "type_B"]
    return [
        {
            "id": f"q{i}",
            "question": f"Question {i}?",
            "options": dict(OPTIONS),
            "answer": "ABCD"[i % 4],
            "question_type": types[i % 2],
            "images": [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(3)],
        }
        for i in range(n)
    ]


class FixedBackend:
    """Known completions, one per item, recording the prompts it was given."""

    def __init__(self, texts):
        self.texts, self.prompts = texts, []

    def generate(self, prompts):
        self.prompts.append(prompts)
        return [Generation(t, len(t.split())) for t in self.texts[: len(prompts)]]


def test_metrics_on_known_completions():
    items = _items(6)  # answers A B C D A B; types A B A B A B
    texts = [
        "<think>ok</think><answer>A</answer>",  # right, formatted
        "<think>ok</think><answer>C</answer>",  # wrong, formatted
        "The answer is C",  # right via fallback, not formatted
        "no idea",  # unanswered
        "<answer>A</answer>",  # right, no think block: not formatted
        "<think>ok</think><answer>B</answer> extra",  # right, text after the pair: not formatted
    ]
    rows, preds = evaluate_items(items, FixedBackend(texts), EvalConfig(option_hub=True))
    row = rows["images"]
    assert row["n"] == 6
    assert row["accuracy"]["value"] == pytest.approx(4 / 6)
    assert row["per_type"]["type_A"]["value"] == pytest.approx(3 / 3)
    assert row["per_type"]["type_B"]["value"] == pytest.approx(1 / 3)
    assert row["format_rate"]["value"] == pytest.approx(2 / 6)
    assert row["unanswered_rate"]["value"] == pytest.approx(1 / 6)
    assert row["accuracy_if_guessed"]["value"] == pytest.approx((4 + 1 / 4) / 6)
    assert row["extraction"] == {"letter_pattern": 1, "none": 1, "strict": 4}
    assert row["chance"] == pytest.approx(0.25)
    lo, hi = row["accuracy"]["ci95"]
    assert lo < 4 / 6 < hi
    assert [p["prediction"] for p in preds["images"]] == ["A", "C", "C", None, "A", "B"]
    # the option-hub row reads only the options: A and C share most words with the others
    assert rows["option_hub"]["accuracy"]["value"] == pytest.approx(
        np.mean([option_hub_hit(OPTIONS, it["answer"]) for it in items])
    )


def test_random_fallback_only_on_request():
    items = _items(40)
    texts = ["nothing"] * 40
    plain = score(items, [Generation(t, 1) for t in texts])
    assert not any(p["answered"] or p["correct"] for p in plain)
    guessed = score(items, [Generation(t, 1) for t in texts], random_fallback=True, seed=3)
    assert all(p["answered"] and p["guessed"] for p in guessed)
    hits = sum(p["correct"] for p in guessed)
    assert 2 <= hits <= 20  # about a quarter of 40, never all or none
    again = score(items, [Generation(t, 1) for t in texts], random_fallback=True, seed=3)
    assert [p["prediction"] for p in again] == [p["prediction"] for p in guessed]  # seeded


def test_ablations_change_the_inputs_as_described():
    items = _items(5)
    base = make_prompts(items, "images")
    blind = make_prompts(items, "no_images")
    shuffled = make_prompts(items, "shuffle_views", seed=1)
    text = [[c for c in p.messages[0]["content"] if c["type"] == "text"] for p in base]
    for i, item in enumerate(items):
        assert [id(x) for x in base[i].images] == [id(x) for x in item["images"]]
        assert blind[i].images == []
        assert [c for c in blind[i].messages[0]["content"] if c["type"] == "image"] == []
        assert [c for c in blind[i].messages[0]["content"] if c["type"] == "text"] == text[i]
        assert [c for c in shuffled[i].messages[0]["content"] if c["type"] == "text"] == text[i]
        order = [next(j for j, x in enumerate(item["images"]) if x is y) for y in shuffled[i].images]
        assert sorted(order) == [0, 1, 2] and order != [0, 1, 2]
    backend = FixedBackend(["<answer>A</answer>"] * 5)
    rows, _ = evaluate_items(items, backend, EvalConfig(no_images=True, shuffle_views=True))
    assert list(rows) == ["images", "no_images", "shuffle_views", "option_hub"]
    assert [len(p.images) for p in backend.prompts[1]] == [0] * 5


def test_data_spec():
    assert parse_data_spec("scale_vqa:test") == ("scale_vqa", "test")
    assert parse_data_spec("/data/scale_vqa/1.0.0:val") == ("/data/scale_vqa/1.0.0", "val")
    with pytest.raises(EvalError, match="DATASET:SPLIT"):
        parse_data_spec("scale_vqa")


@pytest.fixture(scope="module")
def synthetic_tfds(tmp_path_factory):
    from scalereasoner_jax.data.build import build_scale_vqa
    from scalereasoner_jax.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("eval_data")
    synthesize(root / "release", 40, seed=0, image_size=56)
    build_scale_vqa(root / "release", root / "tfds")
    return root / "tfds"


def test_cli_hf_and_jax_backends_agree(tiny_hf_dir, synthetic_tfds, tmp_path, capsys):
    from scalereasoner_jax.cli import main

    results = {}
    for backend in ("hf", "jax"):
        out = tmp_path / backend
        argv = ["eval", "--model", str(tiny_hf_dir), "--data", "scale_vqa:val", "--data_dir"]
        argv += [str(synthetic_tfds), "--backend", backend, "--max_new_tokens", "10", "--batch_size", "4"]
        argv += ["--no_images", "--shuffle_views", "--limit", "8", "--out", str(out)]
        assert main(argv) == 0
        results[backend] = json.loads((out / "results.json").read_text())
        assert (out / "results.md").read_text().startswith("Evaluation of")
        assert "option-hub solver" in capsys.readouterr().out
        preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        results[backend + "_completions"] = [(p["condition"], p["id"], p.get("completion")) for p in preds]
    assert results["hf"]["n"] == results["jax"]["n"] > 0
    assert results["hf_completions"] == results["jax_completions"]  # same greedy text, item by item
    assert results["hf"]["rows"]["option_hub"]["accuracy"]["value"] == pytest.approx(0.25)  # symmetric set
    assert set(results["hf"]["rows"]) == {"images", "no_images", "shuffle_views", "option_hub"}
