"""Building blocks shared by the vision tower and the language model.

Numerics follow transformers: RMSNorm normalises in float32 and casts back before the scale; softmax
runs in float32; rotary embeddings are applied in float32 in the vision tower.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from scalereasoner_jax.kernels.packed_matmul import packed_matmul

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
        # The kernel packed in panels for the CPU decoding kernel; set by the sampler inside its jit.
        self.packed: jax.Array | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.packed is not None:
            y = packed_matmul(x.astype(self.dtype), self.packed)
        else:
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
    """``(-x2, x1)`` for the halves ``x1, x2`` of the last axis: the halves reversed, then one negated.
    (XLA fuses a reverse into its consumers; a concatenate ran as a kernel of its own on CPU.)"""
    halves = x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    sign = jnp.array([[-1], [1]], x.dtype)
    return (jnp.flip(halves, axis=-2) * sign).reshape(x.shape)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads.

    q: (B, S, H, D); k, v: (B, T, K, D) with H a multiple of K; mask: (B, S, T) or (B, 1, T), True where
    attending is allowed. Scores and softmax in float32, the weighted sum in v's dtype.
    """
    return cache_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


def _masked(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """``scores`` where ``mask`` allows attending, else the mask value: a select on the boolean mask
    rather than an added float bias, which XLA would materialise at the size of the scores."""
    return jnp.where(mask, scores, _MASK_VALUE)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """Float32 q.k (..., S, T) of queries (..., S, D) and keys (..., T, D), leading axes broadcast.

    With one query per row (decoding) a fused multiply-reduce streams the keys once; XLA:CPU's batched
    dot for that shape has a large fixed cost, and for bf16 a slow path.
    """
    if q.shape[-2] == 1:
        return jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1)[..., None, :]
    return jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32)


def _weighted(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs (..., S, T) float32 times values (..., T, D), leading axes broadcast, in v's dtype."""
    if probs.shape[-2] == 1:
        out = jnp.sum(jnp.swapaxes(probs, -1, -2) * v.astype(jnp.float32), axis=-2, keepdims=True)
        return out.astype(v.dtype)
    return jnp.matmul(probs.astype(v.dtype), v)


def _by_prompt(x: jax.Array, prompts: int) -> jax.Array:
    """(B, K, g, S, N) -> (P_B, K, G*g*S, N): the G rows of a prompt as the rows of one matmul."""
    b, k, g, s, n = x.shape
    return x.reshape(prompts, b // prompts, k, g, s, n).transpose(0, 2, 1, 3, 4, 5).reshape(prompts, k, -1, n)


def _by_row(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """(P_B, K, G*g*S, N) -> ``shape`` (B, K, g, S, N): the inverse of ``_by_prompt``."""
    b, k, g, s, n = shape
    pb = x.shape[0]
    return x.reshape(pb, k, b // pb, g, s, n).transpose(0, 2, 1, 3, 4, 5).reshape(shape)


def cache_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """``attention`` with k, v in the KV cache's (B, K, T, D) layout, optionally after a shared prefix.

    The query heads sharing a KV head become a free axis of plain batched matmuls over (B, K); reading
    the cache in its own layout means no transposed copy of it per layer and step. ``prefix`` =
    (keys (P_B, K, P, D), values, valid (P_B, P)) is a prompt shared by groups of B / P_B consecutive
    rows: every query attends to its group's valid prefix slots, then to ``k``/``v`` under ``mask``,
    in one softmax. The prefix is read once per group rather than once per row.
    """
    b, s, h, d = q.shape
    kv = k.shape[1]
    g = h // kv
    qt = q.reshape(b, s, kv, g, d).transpose(0, 2, 3, 1, 4)  # (B, K, g, S, D)
    k, v = k[:, :, None], v[:, :, None]  # (B, K, 1, T, D): broadcast over the query heads
    scores = _masked(_scores(qt, k) * (d**-0.5), mask[:, None, None])  # mask (B, S|1, T)
    if prefix is None:
        out = _weighted(jax.nn.softmax(scores, axis=-1), v)
    else:
        # One matmul per (prompt, KV head) over the G*g*S queries that share the prompt's keys. The
        # prefix part stays in that layout; only per-row reductions move to the rows' layout.
        pk, pv, pvalid = prefix
        pb = pk.shape[0]
        pscores = jnp.matmul(_by_prompt(qt, pb), jnp.swapaxes(pk, -1, -2), preferred_element_type=jnp.float32)
        pscores = _masked(pscores * (d**-0.5), pvalid[:, None, None])
        rows = (b, kv, g, s, 1)
        # One softmax over both parts without concatenating them: normalised after the weighted sums.
        pmax = _by_row(jnp.max(pscores, -1, keepdims=True), rows)
        top = jnp.maximum(pmax, jnp.max(scores, -1, keepdims=True))
        pexp, exp = jnp.exp(pscores - _by_prompt(top, pb)), jnp.exp(scores - top)
        total = _by_row(jnp.sum(pexp, -1, keepdims=True), rows) + jnp.sum(exp, -1, keepdims=True)
        from_prefix = jnp.matmul(pexp.astype(pv.dtype), pv, preferred_element_type=jnp.float32)
        # The own part in v's dtype like the prefix part (bf16 matmuls when scoring long completions).
        weighted = _by_row(from_prefix, (b, kv, g, s, d)) + _weighted(exp, v).astype(jnp.float32)
        out = (weighted / total).astype(v.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


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
