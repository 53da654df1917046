"""Batched, jitted generation with the KV cache, G samples per prompt from one prefill.

    images of B prompts --vision tower (once)--> features --prefill B prompts (once)--> prompt cache (B)
        --lax.while_loop: decode one token for all B*G rows--> tokens

The B*G rows write their completions into their own cache, whose prefix is the prompt cache: the G
samples of a prompt read its keys and values once per step instead of G copies of them. The prompt
cache is made inside the prefill and the completions' cache lives in the loop, so neither is copied
or allocated outside the compiled code. Prompt lengths come from the pipeline's length buckets and
image features are padded to a row bucket, so one compilation serves every batch of a bucket.
On one CPU device, the decode loop's float32 projections run on a packed-panel kernel
(``kernels/packed_matmul``): their weights are packed once per call, and each step then streams them
at memory speed. Log-probs are those of the sampled tokens under the temperature-scaled distribution
(top-k / top-p only restrict what is sampled), which is what the trainer recomputes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalereasoner_jax.kernels import packed_matmul
from scalereasoner_jax.models.qwen2_5_vl.layers import Linear
from scalereasoner_jax.models.qwen2_5_vl.model import ModelInputs, Qwen25VL, batch_inputs
from scalereasoner_jax.models.qwen2_5_vl.text import KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    # Token sequences that end a completion (tokenised stop strings), matched on the generated suffix.
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    feature_bucket: int = 256  # image-feature rows are padded to a multiple of this
    # Decode with the packed-panel CPU matmul (kernels/packed_matmul) when the model is on one CPU device,
    # for weights of at least cpu_kernel_min_bytes (smaller ones stay in cache, where XLA's dot is as
    # fast and the kernel's call overhead showed: the tiny model decoded 5% slower with it).
    cpu_kernel: bool = True
    cpu_kernel_min_bytes: int = 256 << 10

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class Rollout:
    """B*G completions, rows grouped by prompt (prompt p owns rows p*G .. p*G+G-1)."""

    tokens: np.ndarray  # (B*G, T) int32, pad after the end
    logprobs: np.ndarray  # (B*G, T) float32, 0 where masked
    mask: np.ndarray  # (B*G, T) bool, the completion's tokens (stop token included)
    lengths: np.ndarray  # (B*G,) int32
    truncated: np.ndarray  # (B*G,) bool: hit max_new_tokens without EOS or a stop sequence
    group_size: int


def stop_token_sequences(tokenizer, stop_strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Tokenisations of each stop string, alone and after a space (BPE merges differ in context)."""
    seqs = set()
    for s in stop_strings:
        for variant in (s, " " + s):
            ids = tuple(tokenizer.encode(variant, add_special_tokens=False))
            if ids:
                seqs.add(ids)
    return tuple(sorted(seqs))


def sample_token(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Sample (or argmax) one token per row; returns (tokens, log-probs under logits / temperature)."""
    logits = logits.astype(jnp.float32)
    if config.greedy:
        token = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    scaled = logits / config.temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    masked = scaled
    if config.top_k > 0:
        kth = jax.lax.top_k(scaled, config.top_k)[0][:, -1:]
        masked = jnp.where(scaled < kth, -jnp.inf, masked)
    if config.top_p < 1.0:
        sorted_logits = jnp.sort(masked, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        cutoff = jnp.min(jnp.where(before < config.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        masked = jnp.where(masked < cutoff, -jnp.inf, masked)
    token = jax.random.categorical(key, masked, axis=-1)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _ends(window: jax.Array, token: jax.Array, config: SamplingConfig) -> jax.Array:
    """Whether each row just produced EOS or completed one of the stop sequences."""
    done = jnp.isin(token, jnp.asarray(config.eos_token_ids, jnp.int32))
    for seq in config.stop_sequences:
        tail = window[:, window.shape[1] - len(seq) :]
        done |= jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=-1)
    return done


def _pad_features(features: jax.Array, bucket: int) -> jax.Array:
    rows = -(-features.shape[0] // bucket) * bucket
    return jnp.pad(features, ((0, rows - features.shape[0]), (0, 0)))


def _projections(model: Qwen25VL, min_bytes: int) -> dict[str, Linear]:
    """The language model's projections that the CPU kernel takes (float32, width a multiple of the
    panel, at least ``min_bytes``), by path."""
    found = {}
    for name, part in (("language_model", model.language_model), ("lm_head", model.lm_head)):
        for path, m in nnx.iter_modules(part) if part is not None else ():
            if (
                isinstance(m, Linear)
                and jnp.dtype(m.dtype) == jnp.float32
                and packed_matmul.packable(m.kernel[...])
                and m.kernel[...].nbytes >= min_bytes
            ):
                found["/".join(map(str, (name, *path)))] = m
    return found


def _pack(
    graphdef: nnx.GraphDef, min_bytes: int, state: nnx.State, into: dict[str, jax.Array] | None
) -> dict[str, jax.Array]:
    """The projections' kernels in panels, once per generation: a jit of its own, so the decode loop
    takes them as arguments like the weights, without copies; written into the previous call's
    panels (``into``, donated) when there are any."""
    model: Qwen25VL = nnx.merge(graphdef, state)
    return {
        path: packed_matmul.pack(m.kernel[...], None if into is None else into[path])
        for path, m in _projections(model, min_bytes).items()
    }


def _prefill(
    graphdef: nnx.GraphDef, state: nnx.State, inputs: ModelInputs, features: jax.Array | None
) -> tuple[jax.Array, KVCache]:
    """The B prompts' cache, exactly their length, and the logits of each prompt's last position."""
    model: Qwen25VL = nnx.merge(graphdef, state)
    cache = KVCache.create(model.config.text, *inputs.input_ids.shape, model.dtype)
    logits, cache = model.prefill(inputs, cache, image_features=features, last_only=True)
    return logits[:, -1], cache


def _decode_loop(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    packed: dict[str, jax.Array] | None,
    prompt_cache: KVCache,
    last_logits: jax.Array,
    next_pos: jax.Array,
    key: jax.Array,
    *,
    group_size: int,
    config: SamplingConfig,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Sample up to ``max_new_tokens`` for G rows per prompt of ``prompt_cache`` in one
    ``lax.while_loop``, which stops early once every row has ended. With ``packed`` (from ``_pack``)
    the language model's projections run on the CPU kernel."""
    model: Qwen25VL = nnx.merge(graphdef, state)
    for path, linear in _projections(model, config.cpu_kernel_min_bytes).items() if packed else ():
        linear.packed = packed[path]
    steps = config.max_new_tokens
    last_logits, next_pos = (jnp.repeat(x, group_size, axis=0) for x in (last_logits, next_pos))
    n = last_logits.shape[0]
    cache = KVCache.create(model.config.text, n, steps, prompt_cache.k[0].dtype, prefix=prompt_cache)
    window_len = max([len(s) for s in config.stop_sequences] + [1])

    key, sub = jax.random.split(key)
    token, logp = sample_token(last_logits, sub, config)
    window = jnp.full((n, window_len), -1, jnp.int32).at[:, -1].set(token)
    tokens = jnp.full((n, steps), config.pad_token_id, jnp.int32).at[:, 0].set(token)
    logps = jnp.zeros((n, steps), jnp.float32).at[:, 0].set(logp)
    done = _ends(window, token, config)
    lengths = jnp.ones((n,), jnp.int32)

    def cond(carry):
        step, done = carry[0], carry[5]
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, cache, token, window, key, done, tokens, logps, lengths = carry
        logits, cache = model.decode(token, next_pos + step - 1, cache)
        key, sub = jax.random.split(key)
        new, logp = sample_token(logits, sub, config)
        new = jnp.where(done, config.pad_token_id, new)
        window = jnp.concatenate([window[:, 1:], new[:, None]], axis=1)
        tokens = tokens.at[:, step].set(new)
        logps = logps.at[:, step].set(jnp.where(done, 0.0, logp))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | _ends(window, new, config)
        return step + 1, cache, new, window, key, done, tokens, logps, lengths

    carry = (jnp.ones((), jnp.int32), cache, token, window, key, done, tokens, logps, lengths)
    _, _, _, _, _, done, tokens, logps, lengths = jax.lax.while_loop(cond, body, carry)
    return tokens, logps, lengths, done


def _on_one_cpu(state: nnx.State) -> bool:
    """Whether every array of ``state`` lives on one and the same CPU device."""
    devices = {
        d for leaf in jax.tree.leaves(state) if hasattr(leaf, "sharding") for d in leaf.sharding.device_set
    }
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


class Sampler:
    """Generation for one model structure; pass the current parameters to every call.

    ``sampler.generate(state, batch, group_size, key)`` with ``batch`` a pipeline batch (or a HF
    processor's output): ``input_ids``, ``attention_mask`` and, with images, ``pixel_values`` and
    ``image_grid_thw``. Prompts must be left-padded (the pipeline and the HF processor do this).
    """

    def __init__(self, model: Qwen25VL, config: SamplingConfig):
        self.config = config
        self.model_config = model.config
        self.graphdef, _ = nnx.split(model)
        self._vision = jax.jit(self._vision_fn)
        self._prefill = jax.jit(functools.partial(_prefill, self.graphdef))
        self._packable = bool(_projections(model, config.cpu_kernel_min_bytes))  # any for the CPU kernel?
        self._pack = jax.jit(
            functools.partial(_pack, self.graphdef, config.cpu_kernel_min_bytes), donate_argnums=1
        )
        self._panels: dict[str, jax.Array] | None = None  # the last packing, reused by the next
        self._decode = jax.jit(
            functools.partial(_decode_loop, self.graphdef, config=config),
            static_argnames=("group_size",),
        )

    def _vision_fn(self, state: nnx.State, inputs: ModelInputs) -> jax.Array:
        return nnx.merge(self.graphdef, state).image_features(inputs)

    def uses_cpu_kernel(self, state: nnx.State) -> bool:
        """Whether decoding ``state`` takes the packed CPU kernel: enabled, float32 projections, built,
        and the model on one CPU device (the kernel has no sharding rule: a sharded model keeps XLA's
        dot). It holds a packed copy of those weights between calls, which the next call reuses."""
        return self.config.cpu_kernel and self._packable and _on_one_cpu(state) and packed_matmul.available()

    def image_features(self, state: nnx.State, inputs: ModelInputs) -> jax.Array | None:
        """The vision tower over every image of the batch's prompts, once; padded to the row bucket."""
        if inputs.pixel_values is None:
            return None
        return _pad_features(self._vision(state, inputs), self.config.feature_bucket)

    def generate(
        self, state: nnx.State, batch: Mapping[str, Any], group_size: int, key: jax.Array
    ) -> Rollout:
        inputs = batch_inputs(self.model_config, batch)
        features = self.image_features(state, inputs)
        text_only = dataclasses.replace(inputs, pixel_values=None, vision=None)
        last, cache = self._prefill(state, text_only, features)
        # Each prompt's prefilled cache and last logits serve its G samples.
        packed = None
        if self.config.max_new_tokens > 1 and self.uses_cpu_kernel(state):  # the first token needs no step
            packed = self._panels = self._pack(state, self._panels)
        tokens, logps, lengths, done = self._decode(
            state, packed, cache, last, inputs.next_position, key, group_size=group_size
        )
        tokens, logps, lengths, done = jax.device_get((tokens, logps, lengths, done))
        mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        return Rollout(
            tokens=tokens,
            logprobs=np.where(mask, logps, 0.0).astype(np.float32),
            mask=mask,
            lengths=lengths,
            truncated=~done,
            group_size=group_size,
        )
