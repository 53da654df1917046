"""Log-probs of sampled completions under a model (the policy before/after an update, the reference).

A completion is scored by one teacher-forced forward over prompt + completion. The images are encoded
once per prompt and their features reused by the prompt's G rows; only the completion positions are
projected to the vocabulary, which keeps the (rows x length x vocab) logits small.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scalereasoner_jax.models.qwen2_5_vl.model import ModelInputs, Qwen25VL
from scalereasoner_jax.rl.sampler import Rollout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreBatch:
    """Prompt + completion rows, ready for a jitted teacher-forced forward."""

    inputs: ModelInputs  # (N, L + T) text inputs, no pixels
    feature_index: jax.Array | None  # (image tokens of all N rows,) rows of the prompts' features
    completion: jax.Array  # (N, T) int32 completion tokens
    mask: jax.Array  # (N, T) float32, 1 on the completion's tokens
    prompt_length: int = dataclasses.field(metadata={"static": True})


def score_batch(prompts: ModelInputs, rollout: Rollout, features_per_prompt: np.ndarray | None) -> ScoreBatch:
    """Rows of ``rollout`` appended to their (left-padded) prompts; host-side numpy.

    ``features_per_prompt`` (B,) is the number of image-feature rows of each prompt, in order.
    """
    g = rollout.group_size
    ids = np.repeat(np.asarray(prompts.input_ids), g, axis=0)
    attn = np.repeat(np.asarray(prompts.attention_mask), g, axis=0)
    pos = np.repeat(np.asarray(prompts.position_ids), g, axis=1)
    nxt = np.repeat(np.asarray(prompts.next_position), g)
    t = rollout.tokens.shape[1]
    comp_pos = nxt[:, None] + np.arange(t)[None, :]
    inputs = ModelInputs(
        input_ids=np.concatenate([ids, rollout.tokens], axis=1).astype(np.int32),
        attention_mask=np.concatenate([attn, rollout.mask], axis=1).astype(np.int32),
        position_ids=np.concatenate([pos, np.broadcast_to(comp_pos, (3, *comp_pos.shape))], axis=2).astype(
            np.int32
        ),
        next_position=(nxt + rollout.lengths).astype(np.int32),
    )
    feature_index = None
    if features_per_prompt is not None and int(np.sum(features_per_prompt)):
        starts = np.concatenate([[0], np.cumsum(features_per_prompt)[:-1]])
        feature_index = np.concatenate(
            [np.arange(s, s + c) for s, c in zip(starts, features_per_prompt, strict=True) for _ in range(g)]
        ).astype(np.int32)
    return ScoreBatch(
        inputs=inputs,
        feature_index=feature_index,
        completion=rollout.tokens.astype(np.int32),
        mask=rollout.mask.astype(np.float32),
        prompt_length=ids.shape[1],
    )


def completion_logprobs(
    model: Qwen25VL, batch: ScoreBatch, features: jax.Array | None, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs (N, T) of the completion tokens under ``logits / temperature``, and the
    per-token entropy of that distribution. Traceable; differentiate through it for the policy loss."""
    row_features = None if batch.feature_index is None else features[batch.feature_index]
    length = batch.prompt_length
    hidden = model.hidden_states(batch.inputs, row_features, image_span=length)
    t = batch.completion.shape[1]
    # The token at completion position j is predicted from the hidden state just before it.
    logits = model.logits(hidden[:, length - 1 : length - 1 + t]).astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, batch.completion[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp * batch.mask, entropy * batch.mask
