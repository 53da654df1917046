"""Greedy validation with the JAX sampler: accuracy and format rate of the paper's reward parts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from scalereasoner_jax.data.pipeline import PipelineConfig, make_dataset
from scalereasoner_jax.models.qwen2_5_vl.processing import PromptEncoder
from scalereasoner_jax.rl import rewards
from scalereasoner_jax.rl.sampler import Sampler


def greedy_eval(
    sampler: Sampler,
    params: Any,
    source: Sequence,
    encoder: PromptEncoder,
    pipeline: PipelineConfig,
    n: int | None = None,
    *,
    drop_images: bool = False,
) -> dict[str, float]:
    """Greedy answers to the first ``n`` examples of ``source`` (in order; this process's shard)."""
    cfg = dataclasses.replace(
        pipeline,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        shuffle_options=False,
        drop_images=drop_images,
        worker_count=0,
    )
    total = n or len(source)
    acc = fmt = 0.0
    seen = 0
    tok = encoder.tokenizer
    for batch in make_dataset(source, encoder, cfg):
        if seen >= total:
            break
        rollout = sampler.generate(params, batch, 1, jax.random.key(0))
        texts = tok.batch_decode(
            [r[:k] for r, k in zip(rollout.tokens, rollout.lengths, strict=True)], skip_special_tokens=True
        )
        for text, answer in list(zip(texts, batch["answer"], strict=True))[: total - seen]:
            acc += rewards.accuracy_reward(text, str(answer))
            fmt += rewards.format_reward(text)
            seen += 1
    return {"accuracy": acc / max(seen, 1), "format_rate": fmt / max(seen, 1), "n": seen}
