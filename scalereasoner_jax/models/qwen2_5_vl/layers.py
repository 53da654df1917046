"""Building blocks shared by the vision tower and the language model.

Numerics follow transformers: RMSNorm normalises in float32 and casts back before the scale; softmax
runs in float32; rotary embeddings are applied in float32 in the vision tower.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows stay NaN-free


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Axes, dtype, *, init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names; values are placeholders until weights are loaded."""
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with kernel stored (in, out), i.e. the transpose of torch's."""

    def __init__(self, d_in: int, d_out: int, axes: Axes, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = param(rngs, (d_in, d_out), axes, param_dtype)
        self.bias = param(rngs, (d_out,), axes[-1:], param_dtype, init="zeros") if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), param_dtype, init="ones")
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int, axes: tuple[str, str], *, bias: bool, dtype, param_dtype, rngs):
        embed, mlp = axes
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(dim, hidden, (embed, mlp), **kw)
        self.up_proj = Linear(dim, hidden, (embed, mlp), **kw)
        self.down_proj = Linear(hidden, dim, (mlp, embed), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads.

    q: (B, S, H, D); k, v: (B, T, K, D) with H a multiple of K; mask: (B, S, T) or (B, 1, T), True where
    attending is allowed. Scores and softmax in float32, the weighted sum in v's dtype.

    The query heads sharing a KV head are folded into the query axis, so both contractions are plain
    batched matmuls over (B, K); the mask enters as an additive bias that XLA fuses into the softmax.
    """
    b, s, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qt = q.reshape(b, s, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * s, d)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, T, D)
    scores = jnp.einsum("bkqd,bktd->bkqt", qt, kt, preferred_element_type=jnp.float32)
    bias = jnp.where(mask, 0.0, _MASK_VALUE).astype(jnp.float32)[:, None, None]  # (B, 1, 1, S|1, T)
    scores = scores.reshape(b, kv, g, s, -1) * (d**-0.5) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * s, -1)
    out = jnp.einsum("bkqt,bktd->bkqd", probs, vt)
    return out.reshape(b, kv, g, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int = 128
) -> jax.Array:
    """Self-attention over one causal sequence (mask (B, S, S)), one query block at a time.

    Query block i only needs keys up to its own end, so about half of the score matrix is never
    computed, and each block's scores stay small enough for the cache. Same result as ``attention``.
    """
    s = q.shape[1]
    if s <= block:
        return attention(q, k, v, mask)
    outs = []
    for start in range(0, s, block):
        end = min(start + block, s)
        outs.append(attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end]))
    return jnp.concatenate(outs, axis=1)
