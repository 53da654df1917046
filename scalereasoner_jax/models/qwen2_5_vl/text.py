"""The Qwen2 language model with multimodal RoPE and a static-shape KV cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalereasoner_jax.models.qwen2_5_vl.config import TextConfig
from scalereasoner_jax.models.qwen2_5_vl.layers import (
    Linear,
    RMSNorm,
    SwiGLU,
    attention,
    cache_attention,
    causal_attention,
    param,
    rotate_half,
)
from scalereasoner_jax.parallel import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values (B, K, T, D), which slots hold real tokens, and the next write slot.

    Prompts are left-padded to one length, so every row writes at the same ``index``. With a ``prefix``
    (a filled cache of B / G rows, read-only), rows r*G .. r*G+G-1 continue prefix row r: the G samples
    or completions of one prompt share its keys and values instead of G copies.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array  # (B, T) bool
    index: jax.Array  # () int32
    prefix: KVCache | None = None

    @classmethod
    def create(
        cls, cfg: TextConfig, batch: int, length: int, dtype=jnp.float32, prefix: KVCache | None = None
    ) -> KVCache:
        if prefix is not None and (prefix.prefix is not None or batch % prefix.valid.shape[0]):
            raise ValueError(
                f"a prefix must be a plain cache whose rows divide the batch ({batch} rows after "
                f"{prefix.valid.shape[0]})"
            )
        shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
        zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
        layers = range(cfg.num_hidden_layers)
        return cls(
            k=tuple(zeros() for _ in layers),
            v=tuple(zeros() for _ in layers),
            valid=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
            prefix=prefix,
        )

    @property
    def length(self) -> int:
        return self.valid.shape[1]


def mrope_axis_of_dim(cfg: TextConfig) -> np.ndarray:
    """For each of the head_dim/2 rotary frequencies, which position axis (t, h, w) drives it."""
    return np.repeat(np.arange(len(cfg.mrope_section)) % 3, cfg.mrope_section)


def mrope(positions: jax.Array, cfg: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin (B, S, head_dim) from (3, B, S) positions, as transformers' multimodal rotary."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    pos = positions[mrope_axis_of_dim(cfg)].astype(jnp.float32)  # (D/2, B, S)
    freqs = jnp.moveaxis(pos, 0, -1) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    # Materialised once: otherwise XLA fuses the cos / sin into every layer's consumers and recomputes them.
    return jax.lax.optimization_barrier((jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)))


def _write(cached: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """New keys or values (B, S, K, D) into the cache's (B, K, T, D) at slot ``index``."""
    updated = jax.lax.dynamic_update_slice_in_dim(
        cached, new.transpose(0, 2, 1, 3).astype(cached.dtype), index, axis=2
    )
    return constrain(updated, ("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim"))


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.q_proj = Linear(d, self.num_heads * hd, ("embed", "heads"), bias=True, **kw)
        self.k_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = Linear(self.num_heads * hd, d, ("heads", "embed"), bias=False, **kw)

    def __call__(
        self,
        x,
        cos,
        sin,
        mask,
        kv: tuple[jax.Array, jax.Array] | None,
        index,
        prefix=None,
        *,
        fill=False,
        last_only=False,
    ):
        """Without ``kv``, or with ``fill`` (an empty cache to fill from slot 0), attention is causal over
        the chunk itself; otherwise the chunk goes into ``kv`` at ``index`` and attends to the cache.
        ``last_only`` computes only the last position's output (keys and values still cover the chunk)."""
        b, s, _ = x.shape
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        k = k * cos + rotate_half(k) * sin
        if last_only:
            x, cos, sin, mask = x[:, -1:], cos[:, -1:], sin[:, -1:], mask[:, -1:]
        q = self.q_proj(x).reshape(b, x.shape[1], self.num_heads, self.head_dim)
        q = constrain(q * cos + rotate_half(q) * sin, ("batch", "length", "act_heads", None))
        if kv is None or fill:
            out = (attention if last_only else causal_attention)(q, k, v, mask)
            if fill:
                k, v = _write(kv[0], k, index), _write(kv[1], v, index)
            return self.o_proj(out.reshape(b, q.shape[1], -1)), (k, v)
        k, v = _write(kv[0], k, index), _write(kv[1], v, index)
        if prefix is not None:
            prefix = (prefix[0].astype(q.dtype), prefix[1].astype(q.dtype), prefix[2])
        out = cache_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, prefix)
        return self.o_proj(out.reshape(b, s, -1)), (k, v)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), bias=False, **kw)

    def __call__(self, x, cos, sin, mask, kv, index, prefix=None, *, fill=False, last_only=False):
        h, kv = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, kv, index, prefix, fill=fill, last_only=last_only
        )
        x = (x[:, -1:] if last_only else x) + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "act_embed")), kv


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def _checkpointed(layer: DecoderLayer, policy, *args, **flags):
    """``jax.checkpoint`` over a pure function of the layer's state: the backward pass recomputes what
    ``policy`` does not save. (Works under any outer transform, unlike binding the module itself.)"""
    graphdef, state = nnx.split(layer)

    def run(state, *args):
        return nnx.merge(graphdef, state)(*args, **flags)

    return jax.checkpoint(run, policy=policy)(state, *args)


class TextModel(nnx.Module):
    def __init__(
        self,
        cfg: TextConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = nnx.List([DecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens[...].astype(self.dtype)[input_ids]

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        token_mask: jax.Array,
        cache: KVCache | None = None,
        *,
        fill: bool = False,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Run the decoder over ``embeds`` (B, S, D) at mRoPE ``positions`` (3, B, S).

        ``token_mask`` (B, S) marks real tokens (0 = padding). Without a cache, attention is causal over
        this chunk. With one, the chunk is written at ``cache.index`` and attends to every valid slot
        before it (and to the cache's shared prefix, if it has one): one decode step when S = 1.
        ``fill`` declares the cache empty (a prefill): the chunk goes in from slot 0 and attention stays
        causal over the chunk alone, in query blocks, instead of over the whole cache. ``last_only``
        returns only the last position's hidden state (B, 1, D); the last layer then computes queries,
        attention output and MLP for that position alone.
        """
        if fill and (cache is None or cache.prefix is not None):
            raise ValueError("fill needs an empty cache without a prefix")
        s = embeds.shape[1]
        x = constrain(embeds.astype(self.dtype), ("batch", "length", "act_embed"))
        cos, sin = mrope(positions, self.cfg, self.dtype)
        token_mask = token_mask.astype(bool)
        index = jnp.zeros((), jnp.int32) if cache is None or fill else cache.index
        q_pos = index + jnp.arange(s)
        if cache is None or fill:
            key_valid = token_mask
        else:
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_mask, index, axis=1)
        k_pos = jnp.arange(key_valid.shape[1])
        mask = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]  # (B, S, S or T)

        shared = None if cache is None else cache.prefix
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            prefix = None if shared is None else (shared.k[i], shared.v[i], shared.valid)
            flags = dict(fill=fill, last_only=last_only and i == len(self.layers) - 1)
            if self.remat == "none":
                x, (k, v) = layer(x, cos, sin, mask, kv, index, prefix, **flags)
            else:
                policy = REMAT_POLICIES[self.remat]
                x, (k, v) = _checkpointed(layer, policy, x, cos, sin, mask, kv, index, prefix, **flags)
            new_k.append(k)
            new_v.append(v)
        x = self.norm(x)
        if cache is None:
            return x, None
        if fill:
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_mask, 0, axis=1)
        return x, KVCache(k=tuple(new_k), v=tuple(new_v), valid=key_valid, index=index + s, prefix=shared)
