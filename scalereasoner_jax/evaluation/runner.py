"""``scalereasoner eval``: greedy answers on a Scale-VQA split, scored the way the paper reports them,
with ablation rows (no images, permuted views) and a text-only baseline row."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scalereasoner_jax.evaluation.backends import Backend, Generation, Prompt, make_backend
from scalereasoner_jax.evaluation.baselines import option_hub_hit
from scalereasoner_jax.evaluation.extraction import extract_choice
from scalereasoner_jax.evaluation.metrics import summarize
from scalereasoner_jax.evaluation.report import to_markdown
from scalereasoner_jax.models.qwen2_5_vl.processing import DEFAULT_INSTRUCTION, build_messages
from scalereasoner_jax.rl.rewards import format_reward

# Evaluation rows: the model on the real prompt, then the ablations (same prompt text in every row).
CONDITIONS = ("images", "no_images", "shuffle_views")


class EvalError(ValueError):
    """A bad ``--data`` spec or dataset; the message names it."""


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = 256
    batch_size: int = 8
    limit: int | None = None  # the first N items of the split
    no_images: bool = False
    shuffle_views: bool = False
    option_hub: bool = True
    random_fallback: bool = False
    seed: int = 0
    instruction: str = DEFAULT_INSTRUCTION
    backend_kwargs: Mapping[str, Any] = field(default_factory=dict)


def parse_data_spec(spec: str) -> tuple[str, str]:
    """``DATASET:SPLIT`` -> (dataset, split); DATASET is a registered TFDS name or a built version dir."""
    dataset, sep, split = spec.rpartition(":")
    if not sep or not dataset or not split:
        raise EvalError(f"--data must be DATASET:SPLIT (e.g. scale_vqa:test), got {spec!r}")
    return dataset, split


def load_items(spec: str, data_dir: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """The split's examples as plain values (``data.pipeline.normalize_example``), in stored order."""
    from scalereasoner_jax.data.pipeline import data_source, normalize_example

    dataset, split = parse_data_spec(spec)
    try:
        source = data_source(dataset, split, data_dir)
    except Exception as err:  # TFDS raises several types for a missing dataset or split
        raise EvalError(f"cannot read split {split!r} of dataset {dataset!r}: {err}") from err
    n = len(source) if limit is None else min(limit, len(source))
    return [normalize_example(source[i]) for i in range(n)]


def permuted_views(n: int, rng: np.random.Generator) -> list[int]:
    """A random order of n views that is never the original one (for n >= 2)."""
    if n < 2:
        return list(range(n))
    while True:
        order = [int(i) for i in rng.permutation(n)]
        if order != list(range(n)):
            return order


def make_prompts(
    items: Sequence[Mapping[str, Any]],
    condition: str,
    *,
    seed: int = 0,
    instruction: str = DEFAULT_INSTRUCTION,
) -> list[Prompt]:
    """Prompts for one row: ``images`` (as stored: low, mid, high), ``no_images`` (the same text without
    images) or ``shuffle_views`` (the views in a seeded non-identity order; the text is unchanged)."""
    if condition not in CONDITIONS:
        raise EvalError(f"unknown condition {condition!r}; choose from {CONDITIONS}")
    rng = np.random.default_rng(seed)
    prompts = []
    for item in items:
        images = list(item["images"])
        if condition == "no_images":
            images = []
        elif condition == "shuffle_views":
            images = [images[i] for i in permuted_views(len(images), rng)]
        messages = build_messages(item["question"], item["options"], len(images), instruction=instruction)
        prompts.append(Prompt(messages, images))
    return prompts


def score(
    items: Sequence[Mapping[str, Any]],
    generations: Sequence[Generation],
    *,
    random_fallback: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per-item predictions: extracted letter, correctness, format, length."""
    rng = np.random.default_rng(seed)
    preds = []
    for item, gen in zip(items, generations, strict=True):
        choice = extract_choice(gen.text, item["options"])
        letter, guessed = choice.letter, False
        if letter is None and random_fallback:
            letter, guessed = str(rng.choice(sorted(item["options"]))), True
        preds.append(
            {
                "id": item["id"],
                "question_type": item["question_type"],
                "answer": item["answer"],
                "prediction": letter,
                "method": choice.method,
                "answered": letter is not None,
                "guessed": guessed,
                "correct": letter == item["answer"],
                "formatted": format_reward(gen.text) == 1.0,
                "n_options": len(item["options"]),
                "response_tokens": gen.tokens,
                "completion": gen.text,
            }
        )
    return preds


def option_hub_predictions(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": item["id"],
            "question_type": item["question_type"],
            "correct": option_hub_hit(item["options"], item["answer"]),
            "answered": True,
            "n_options": len(item["options"]),
            "method": "option_hub",
            "response_tokens": None,
        }
        for item in items
    ]


def evaluate_items(
    items: Sequence[Mapping[str, Any]],
    backend: Backend,
    config: EvalConfig,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Rows of figures (``summarize``) and per-item predictions for every requested condition."""
    conditions = ["images"]
    conditions += ["no_images"] if config.no_images else []
    conditions += ["shuffle_views"] if config.shuffle_views else []
    rows: dict[str, Any] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    for condition in conditions:
        t0 = time.perf_counter()
        prompts = make_prompts(items, condition, seed=config.seed, instruction=config.instruction)
        generations = backend.generate(prompts)
        predictions[condition] = score(
            items, generations, random_fallback=config.random_fallback, seed=config.seed
        )
        rows[condition] = {**summarize(predictions[condition]), "seconds": time.perf_counter() - t0}
        if progress:
            progress(f"{condition}: accuracy {rows[condition]['accuracy']['value']:.3f}")
    if config.option_hub:
        predictions["option_hub"] = option_hub_predictions(items)
        rows["option_hub"] = summarize(predictions["option_hub"])
    return rows, predictions


def run_eval(
    model_dir: str | Path,
    data: str,
    *,
    backend: str = "hf",
    data_dir: str | None = None,
    config: EvalConfig = EvalConfig(),
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the HF folder ``model_dir`` on ``data`` (DATASET:SPLIT); write ``results.json``,
    ``results.md`` and ``predictions.jsonl`` to ``out_dir`` when given."""
    items = load_items(data, data_dir, config.limit)
    if not items:
        raise EvalError(f"{data} holds no examples")
    engine = make_backend(
        backend,
        model_dir,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
        **dict(config.backend_kwargs),
    )
    rows, predictions = evaluate_items(items, engine, config, progress)
    results = {
        "model": str(model_dir),
        "data": data,
        "backend": backend,
        "n": len(items),
        "chance": rows["images"]["chance"],
        "random_fallback": config.random_fallback,
        "max_new_tokens": config.max_new_tokens,
        "rows": rows,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "results.md").write_text(to_markdown(results) + "\n")
        with (out / "predictions.jsonl").open("w") as f:
            for condition, preds in predictions.items():
                for p in preds:
                    f.write(json.dumps({"condition": condition, **p}) + "\n")
    return results
