"""Log-probs of sampled completions under a model (the policy before/after an update, the reference).

Scoring reuses the sampler's structure: each prompt (with its images, encoded once) is run through the
model once into a KV cache, and its G completions are teacher-forced as one chunk in a cache whose
shared prefix is the prompt's. The prompt is therefore neither recomputed nor copied G times, and only
completion positions are projected to the vocabulary. Everything is differentiable: gradients reach
the prompt's computation through the shared prefix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scalereasoner_jax.models.qwen2_5_vl.model import ModelInputs, Qwen25VL
from scalereasoner_jax.models.qwen2_5_vl.text import KVCache
from scalereasoner_jax.rl.sampler import Rollout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreBatch:
    """B prompts (text inputs; their pixels travel separately) and their B*G completions."""

    prompts: ModelInputs  # (B, L), no pixels
    completion: jax.Array  # (N, T) int32 completion tokens, N = B * G, grouped by prompt
    mask: jax.Array  # (N, T) float32, 1 on the completion's tokens
    group_size: int = dataclasses.field(metadata={"static": True})


def score_batch(prompts: ModelInputs, rollout: Rollout) -> ScoreBatch:
    """The rows of ``rollout`` with their prompts, ready for ``completion_logprobs`` (host-side)."""
    return ScoreBatch(
        prompts=dataclasses.replace(prompts, pixel_values=None, vision=None),
        completion=np.asarray(rollout.tokens, np.int32),
        mask=np.asarray(rollout.mask, np.float32),
        group_size=rollout.group_size,
    )


def completion_logprobs(
    model: Qwen25VL, batch: ScoreBatch, features: jax.Array | None, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs (N, T) of the completion tokens under ``logits / temperature``, and the
    per-token entropy of that distribution. Traceable; differentiate through it for the policy loss."""
    prompts, g = batch.prompts, batch.group_size
    b, length = prompts.input_ids.shape
    n, t = batch.completion.shape
    prompt_cache = KVCache.create(model.config.text, b, length, model.dtype)
    last, prompt_cache = model.prefill(prompts, prompt_cache, image_features=features, last_only=True)
    cache = KVCache.create(model.config.text, n, t, model.dtype, prefix=prompt_cache)
    # Completion tokens are text (a generated <|image_pad|> is an ordinary token, as when decoding).
    embeds = model.language_model.embed(batch.completion)
    pos = jnp.repeat(prompts.next_position, g)[:, None] + jnp.arange(t)[None, :]
    hidden, _ = model.language_model(embeds, jnp.broadcast_to(pos, (3, n, t)), batch.mask, cache)
    # Token 0 is predicted by the prompt's last position; token j > 0 by completion position j - 1.
    logits = jnp.concatenate([jnp.repeat(last, g, axis=0), model.logits(hidden[:, :-1])], axis=1)
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, batch.completion[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp * batch.mask, entropy * batch.mask
