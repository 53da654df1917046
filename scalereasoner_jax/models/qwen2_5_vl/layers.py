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

    q: (..., S, H, D); k, v: (..., T, K, D) with H a multiple of K; mask: broadcastable to (..., S, T),
    True where attending is allowed. Scores and softmax in float32, the weighted sum in q's dtype.
    """
    *lead, s, h, d = q.shape
    kv_heads = k.shape[-2]
    qg = q.reshape(*lead, s, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("...skgd,...tkd->...kgst", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[..., None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("...kgst,...tkd->...skgd", probs, v)
    return out.reshape(*lead, s, h, d)
