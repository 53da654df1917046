"""The Scale-VQA reward exactly as DESIGN.md §3 defines it, its parts and the reward registry."""

from __future__ import annotations

import numpy as np
import pytest

from scalereasoner_jax.rl import rewards as R
from scalereasoner_jax.rl.rewards import (
    accuracy_reward,
    extract_answer,
    format_reward,
    get_reward,
    register_reward,
    scale_vqa_breakdown,
    scale_vqa_reward,
)

THINK = "<think>The low view shows glands; the high view shows atypia.</think>"

# (completion, key, expected reward, why)
CASES = [
    # The five numbers DESIGN.md lists.
    (f"{THINK}<answer>A</answer>", "A", 1.0, "perfect"),
    (f"{THINK}<answer>B</answer>", "A", 0.2, "well formed but wrong"),
    ("<answer>A</answer>", "A", 0.8, "right but no think block"),
    (f"{THINK}<answer>A</answer> so A it is", "A", 0.8, "right with text after </answer>"),
    (f"{THINK}<answer>A. Adenocarcinoma</answer>", "A", 0.0, "option text inside the tags"),
    # Edge cases.
    (f"{THINK}<answer>It is A</answer><answer>A</answer>", "A", 0.8, "two pairs: text then letter"),
    (f"{THINK}<answer>A</answer><answer>It is A</answer>", "A", 0.8, "two pairs: letter then text"),
    (f"{THINK}<answer>B</answer><answer>A</answer>", "A", 0.0, "two letter pairs: first one counts"),
    (f"{THINK}<answer>a</answer>", "A", 1.0, "lower-case letter is upper-cased"),
    (f"{THINK}<answer>b</answer>", "A", 0.2, "lower-case wrong letter"),
    (f"{THINK}<answer>A</answer>", "a", 1.0, "lower-case key"),
    (f"{THINK}<answer>E</answer>", "A", 0.2, "letter outside the options is valid by default"),
    (f"{THINK}<answer> A </answer>", "A", 1.0, "whitespace inside the tags"),
    (f"{THINK}<answer>\n  A\n</answer>", "A", 1.0, "answer tags across newlines"),
    ("<think>\nstep 1\nstep 2\n</think>\n<answer>\nC\n</answer>\n", "C", 1.0, "think across newlines"),
    (f"{THINK}<answer>A</answer>\n\n  \t", "A", 1.0, "only whitespace after the pair"),
    (f"{THINK}\n<answer>A</answer><|im_end|>", "A", 0.8, "special token left after </answer>"),
    ("<think>unclosed reasoning <answer>A</answer>", "A", 0.8, "unclosed think block"),
    ("reasoning</think><answer>A</answer>", "A", 0.8, "think without opening tag"),
    ("<think></think><answer>A</answer>", "A", 1.0, "empty think block still counts"),
    (f"<answer>A</answer>{THINK}", "A", 0.8, "think after the answer is text after </answer>"),
    (f"{THINK}<answer>A", "A", 0.0, "unclosed answer tag"),
    (f"{THINK}A", "A", 0.0, "no answer tags"),
    (f"{THINK}<answer></answer>", "A", 0.0, "empty answer"),
    (f"{THINK}<answer>AB</answer>", "A", 0.0, "two letters"),
    (f"{THINK}<answer>A.</answer>", "A", 0.0, "letter with punctuation"),
    (f"{THINK}<answer>(A)</answer>", "A", 0.0, "letter in parentheses"),
    (f"{THINK}<answer>1</answer>", "A", 0.0, "digit is not a letter"),
    (f"{THINK}<answer>Ä</answer>", "A", 0.0, "non-ASCII letter is not a letter"),
    (f"{THINK}<ANSWER>A</ANSWER>", "A", 0.0, "tags are case-sensitive"),
    ("<think>maybe <answer>B</answer></think><answer>A</answer>", "A", 0.0, "pair inside think counts"),
    ("<think>maybe <answer>A</answer></think><answer>C</answer>", "A", 0.8, "first letter is in think"),
    (f"{THINK}<answer>x <answer>A</answer></answer>", "A", 0.0, "nested: outer open to first close"),
    (f"{THINK}<answer>A</answer></answer>", "A", 0.8, "stray close tag is trailing text"),
    (f"{THINK}<answer><answer>A</answer>", "A", 0.0, "doubled open tag is content"),
    ("", "A", 0.0, "empty completion"),
]


@pytest.mark.parametrize(("completion", "key", "expected", "why"), CASES, ids=[c[3] for c in CASES])
def test_scale_vqa_reward_cases(completion: str, key: str, expected: float, why: str) -> None:
    assert scale_vqa_reward(completion, key) == pytest.approx(expected), why


def test_parts_and_weights() -> None:
    text = f"{THINK}<answer>A</answer> trailing"
    assert accuracy_reward(text, "A") == 1.0
    assert format_reward(text) == 0.0
    assert scale_vqa_breakdown(text, "A") == pytest.approx({"accuracy": 1.0, "format": 0.0, "reward": 0.8})
    assert scale_vqa_reward(text, "A", accuracy_weight=1.0, format_weight=1.0) == 1.0
    assert scale_vqa_reward(f"{THINK}<answer>B</answer>", "A", accuracy_weight=0.5, format_weight=0.5) == 0.5


def test_extract_answer() -> None:
    assert extract_answer(f"{THINK}<answer>\n c \n</answer>") == "C"
    assert extract_answer("<answer>Option D</answer><answer>d</answer>") == "D"
    assert extract_answer("<answer>Option D</answer>") is None
    assert extract_answer("no tags") is None


def test_valid_letters_restrict() -> None:
    text = f"{THINK}<answer>E</answer>"
    assert format_reward(text) == 1.0  # the paper's code: any letter A-Z
    assert format_reward(text, valid_letters="ABCD") == 0.0
    assert format_reward(text, valid_letters={"A": "x", "E": "y"}) == 1.0
    assert format_reward(f"{THINK}<answer>d</answer>", valid_letters=["a", "b", "c", "d"]) == 1.0
    assert scale_vqa_reward(text, "A", valid_letters="ABCD") == 0.0
    assert scale_vqa_reward(f"{THINK}<answer>D</answer>", "D", valid_letters="ABCD") == 1.0


def test_registry_scale_vqa() -> None:
    assert "scale_vqa" in R.REWARDS
    reward = get_reward("scale_vqa")
    example = {"answer": "A", "options": "ABCD"}
    assert reward(f"{THINK}<answer>A</answer>", example) == 1.0
    assert reward(f"{THINK}<answer>E</answer>", example) == pytest.approx(0.2)
    strict = get_reward("scale_vqa", restrict_letters=True)
    assert strict(f"{THINK}<answer>E</answer>", example) == 0.0
    assert strict(f"{THINK}<answer>B</answer>", example) == pytest.approx(0.2)
    # Fields as the pipeline's collated numpy arrays or TFDS bytes, and options as a letter -> text mapping.
    batch = {"answer": np.array(["B"]), "options": np.array(["AB"])}
    assert strict(f"{THINK}<answer>B</answer>", {k: v[0] for k, v in batch.items()}) == 1.0
    assert strict(f"{THINK}<answer>C</answer>", {"answer": b"B", "options": b"AB"}) == 0.0
    assert strict(f"{THINK}<answer>B</answer>", {"answer": "B", "options": {"A": "x", "B": "y"}}) == 1.0


def test_registry_errors_and_custom() -> None:
    with pytest.raises(KeyError, match="scale_vqa"):
        get_reward("no_such_reward")
    with pytest.raises(TypeError, match="bad options"):
        get_reward("scale_vqa", no_such_option=1)

    name = "_test_length_reward"
    try:

        @register_reward(name)
        def short(completion: str, example: dict, *, limit: int = 10) -> float:
            return float(len(completion) <= limit)

        assert get_reward(name)("abc", {}) == 1.0
        assert get_reward(name, limit=2)("abc", {}) == 0.0
        with pytest.raises(ValueError, match="already registered"):
            register_reward(name)(lambda completion, example: 0.0)
    finally:
        R.REWARDS.pop(name, None)


def test_score_completions() -> None:
    reward = get_reward("scale_vqa")
    completions = [f"{THINK}<answer>A</answer>", "<answer>A</answer>", f"{THINK}<answer>B</answer>"]
    examples = [{"answer": "A", "options": "ABCD"}] * 3
    out = R.score_completions(reward, completions, examples)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [1.0, 0.8, 0.2], rtol=1e-6)
    with pytest.raises(ValueError):
        R.score_completions(reward, completions, examples[:2])
