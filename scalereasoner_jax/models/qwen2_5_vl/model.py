"""Qwen2.5-VL for conditional generation: vision tower + language model + LM head.

Two layers of API:
- ``prepare_inputs`` turns a Hugging Face processor's output (``input_ids``, ``attention_mask``,
  ``pixel_values``, ``image_grid_thw``) into a :class:`ModelInputs` pytree on the host: it validates
  the image tokens against the grids and computes the mRoPE positions exactly as transformers'
  ``get_rope_index`` and the vision attention layout. Everything inside is an array, so
  ``Qwen25VL.forward`` / ``prefill`` / ``decode`` trace cleanly under ``jax.jit``.
- ``model(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...)`` does both
  steps and returns an object with ``.logits``, so processor output feeds it directly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalereasoner_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from scalereasoner_jax.models.qwen2_5_vl.layers import Linear
from scalereasoner_jax.models.qwen2_5_vl.text import KVCache, TextModel
from scalereasoner_jax.models.qwen2_5_vl.vision import VisionLayout, VisionTower, vision_layout
from scalereasoner_jax.parallel import constrain


class InputError(ValueError):
    """Model inputs that are inconsistent with each other or with the config."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelInputs:
    input_ids: jax.Array  # (B, S) int32
    attention_mask: jax.Array  # (B, S) int32, 1 = real token
    position_ids: jax.Array  # (3, B, S) int32 mRoPE positions (t, h, w)
    next_position: jax.Array  # (B,) int32 position of the first generated token
    pixel_values: jax.Array | None = None  # (N, C*T*P*P)
    vision: VisionLayout | None = None


@dataclasses.dataclass(frozen=True)
class CausalLMOutput:
    logits: jax.Array


def get_rope_index(
    cfg: Qwen25VLConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """mRoPE positions (3, B, S) and each row's next position (B,), as transformers computes them.

    Text tokens advance all three axes together; an image's tokens get (t, row, column) offsets from
    the current position, after which text resumes at ``current + max(h, w) / merge``. Padding is
    skipped (its positions stay 0). Images are taken from ``image_grid_thw`` in order across the batch.
    """
    m = cfg.vision.spatial_merge_size
    grids = iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist() if image_grid_thw is not None else [])
    b, s = input_ids.shape
    positions = np.zeros((3, b, s), np.int64)
    next_position = np.zeros((b,), np.int64)
    for row in range(b):
        keep = attention_mask[row].astype(bool)
        ids = input_ids[row][keep]
        is_image = ids == cfg.image_token_id
        edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
        starts, ends = np.r_[0, edges], np.r_[edges, len(ids)]
        parts, cur = [], 0
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            if not is_image[start]:
                parts.append(np.broadcast_to(np.arange(end - start) + cur, (3, end - start)))
                cur += end - start
                continue
            grid = next(grids, None)
            if grid is None:
                raise InputError(f"row {row}: more runs of image tokens than entries in image_grid_thw")
            t, h, w = grid
            expected = t * (h // m) * (w // m)
            if end - start != expected:
                raise InputError(
                    f"row {row}: an image span has {end - start} image tokens but image_grid_thw {grid} "
                    f"needs {expected}"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            parts.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
            cur += max(h, w) // m
        pos = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        positions[:, row, keep] = pos
        next_position[row] = pos.max() + 1 if pos.size else 0
    if next(grids, None) is not None:
        raise InputError("image_grid_thw has more images than the prompts have image spans")
    return positions, next_position


def batch_inputs(cfg: Qwen25VLConfig, batch: Mapping[str, Any]) -> ModelInputs:
    """``prepare_inputs`` from a pipeline batch or a HF processor's output (its keys, images optional)."""
    return prepare_inputs(
        cfg,
        batch["input_ids"],
        batch.get("attention_mask"),
        batch.get("pixel_values"),
        batch.get("image_grid_thw"),
    )


def prepare_inputs(
    cfg: Qwen25VLConfig,
    input_ids: Any,
    attention_mask: Any | None = None,
    pixel_values: Any | None = None,
    image_grid_thw: Any | None = None,
) -> ModelInputs:
    """Validate processor outputs and derive positions and the vision layout (host-side numpy)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise InputError(f"input_ids must be (batch, length), got shape {ids.shape}")
    mask = (
        np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape[0], -1)
    )
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if (pixel_values is None) != (image_grid_thw is None):
        raise InputError("pixel_values and image_grid_thw must be given together")
    n_image_tokens = int(((ids == cfg.image_token_id) & (mask == 1)).sum())
    vision = pixels = None
    grid = None
    if pixel_values is not None:
        pixels = np.asarray(pixel_values)
        grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
        n_patches = int(grid.prod(-1).sum())
        if pixels.ndim != 2 or pixels.shape != (n_patches, cfg.vision.patch_dim):
            raise InputError(
                f"pixel_values shape {pixels.shape} does not match image_grid_thw {grid.tolist()}: expected "
                f"({n_patches}, {cfg.vision.patch_dim})"
            )
        n_features = n_patches // cfg.vision.merge_unit
        if n_image_tokens != n_features:
            raise InputError(
                f"the prompts hold {n_image_tokens} <|image_pad|> tokens but image_grid_thw "
                f"{grid.tolist()} yields {n_features} image features"
            )
        vision = vision_layout(grid, cfg.vision)
    elif n_image_tokens:
        raise InputError(
            f"the prompts hold {n_image_tokens} <|image_pad|> tokens but no pixel_values were given"
        )
    positions, next_position = get_rope_index(cfg, ids, mask, grid)
    return ModelInputs(
        input_ids=ids.astype(np.int32),
        attention_mask=mask.astype(np.int32),
        position_ids=positions.astype(np.int32),
        next_position=next_position.astype(np.int32),
        pixel_values=None if pixels is None else pixels.astype(np.float32),
        vision=vision,
    )


class Qwen25VL(nnx.Module):
    """Qwen2_5_VLForConditionalGeneration in Flax NNX."""

    def __init__(
        self,
        config: Qwen25VLConfig,
        *,
        dtype=jnp.float32,
        param_dtype=None,
        remat: str = "none",
        rngs: nnx.Rngs | None = None,
    ):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = param_dtype or dtype
        self.config = config
        self.dtype = dtype
        self.visual = VisionTower(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.language_model = TextModel(
            config.text, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs
        )
        t = config.text
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                t.hidden_size,
                t.vocab_size,
                ("embed", "vocab"),
                bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )

    # -- traced pieces -------------------------------------------------------------------------
    def image_features(self, inputs: ModelInputs) -> jax.Array | None:
        if inputs.pixel_values is None:
            return None
        return self.visual(inputs.pixel_values, inputs.vision)

    def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
        """Token embeddings with the ``<|image_pad|>`` slots replaced by image features, in order."""
        embeds = self.language_model.embed(input_ids)
        if image_features is None:
            return embeds
        is_image = input_ids == self.config.image_token_id
        rank = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
        feats = image_features.astype(embeds.dtype)[jnp.clip(rank, 0, image_features.shape[0] - 1)]
        return jnp.where(is_image[..., None], feats, embeds)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is not None:
            out = self.lm_head(hidden)
        else:
            out = jnp.dot(hidden, self.language_model.embed_tokens[...].astype(self.dtype).T)
        return constrain(out, ("batch", "length", "act_vocab"))

    def hidden_states(self, inputs: ModelInputs, image_features: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states (B, S, D); project only the positions you need with ``logits``."""
        if image_features is None:
            image_features = self.image_features(inputs)
        embeds = self.embed(inputs.input_ids, image_features)
        hidden, _ = self.language_model(embeds, inputs.position_ids, inputs.attention_mask)
        return hidden

    def forward(self, inputs: ModelInputs, image_features: jax.Array | None = None) -> jax.Array:
        """Full-sequence logits (B, S, V)."""
        return self.logits(self.hidden_states(inputs, image_features))

    def prefill(
        self,
        inputs: ModelInputs,
        cache: KVCache,
        image_features: jax.Array | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Write the (left-padded) prompts into an empty cache; returns logits (B, S, V) and the cache.

        ``last_only`` returns only the last position's logits (B, 1, V), all that sampling needs: the
        last layer then skips the other positions' queries and MLP, and with a 150k vocabulary the full
        projection alone would cost more than the rest of the prefill.
        """
        if image_features is None:
            image_features = self.image_features(inputs)
        embeds = self.embed(inputs.input_ids, image_features)
        hidden, cache = self.language_model(
            embeds, inputs.position_ids, inputs.attention_mask, cache, fill=True, last_only=last_only
        )
        return self.logits(hidden), cache

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One step: ``tokens`` (B,) at mRoPE text positions (B,) -> logits (B, V) and the cache."""
        embeds = self.language_model.embed(tokens[:, None])
        pos = jnp.broadcast_to(positions[None, :, None], (3, tokens.shape[0], 1))
        hidden, cache = self.language_model(embeds, pos, jnp.ones_like(tokens)[:, None], cache)
        return self.logits(hidden)[:, 0], cache

    def new_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        return KVCache.create(self.config.text, batch, length, dtype or self.dtype)

    # -- convenience: Hugging Face-style call ---------------------------------------------------
    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any | None = None,
        pixel_values: Any | None = None,
        image_grid_thw: Any | None = None,
        **unused: Any,
    ) -> CausalLMOutput:
        """Accepts a HF processor's output directly (``mm_token_type_ids`` and the like are ignored)."""
        if unused.get("pixel_values_videos") is not None:
            raise InputError("video inputs are not supported")
        inputs = prepare_inputs(
            self.config, _np(input_ids), _np(attention_mask), _np(pixel_values), _np(image_grid_thw)
        )
        graphdef, state = nnx.split(self)
        return CausalLMOutput(logits=_jit_forward(graphdef, state, inputs))


def _np(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch tensors from a HF processor
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef: nnx.GraphDef, state: nnx.State, inputs: ModelInputs) -> jax.Array:
    return nnx.merge(graphdef, state).forward(inputs)
