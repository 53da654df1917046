"""The Qwen2.5-VL vision tower: patch embedding, windowed / full attention blocks, 2x2 patch merger.

Transformers permutes the patches so that each attention window is contiguous, runs variable-length
attention over the windows, and undoes the permutation after the merger. Attention inside a window is
permutation-equivariant, so we keep the processor's patch order and instead *gather* each window (or
each whole image, for the full-attention blocks) into a padded (groups, length) block computed on the
host from ``image_grid_thw``. The result is the same function, with static shapes for XLA.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scalereasoner_jax.models.qwen2_5_vl.config import VisionConfig
from scalereasoner_jax.models.qwen2_5_vl.layers import Linear, RMSNorm, SwiGLU, attention, param, rotate_half
from scalereasoner_jax.parallel import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionGroups:
    """Tokens gathered into padded groups: ``index`` (G, L) into the patch axis, ``valid`` (G, L),
    and ``inverse`` (N,) giving each patch's slot in the flattened (G * L) layout."""

    index: jax.Array
    valid: jax.Array
    inverse: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Everything the tower needs besides pixels, derived on the host from ``image_grid_thw``."""

    positions: jax.Array  # (N, 2) row / column of each patch, for the 2-D rotary embedding
    windows: AttentionGroups
    images: AttentionGroups


def _groups(members: list[np.ndarray], n: int) -> AttentionGroups:
    length = max(len(m) for m in members)
    index = np.zeros((len(members), length), np.int32)
    valid = np.zeros((len(members), length), bool)
    inverse = np.empty(n, np.int32)
    for g, m in enumerate(members):
        index[g, : len(m)] = m
        valid[g, : len(m)] = True
        inverse[m] = g * length + np.arange(len(m))
    return AttentionGroups(index=index, valid=valid, inverse=inverse)


def _merge_block_order(a: np.ndarray, m: int) -> np.ndarray:
    """Flatten an (h, w) grid merge-block by merge-block, the order the processor emits patches in."""
    h, w = a.shape
    return a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)


def vision_layout(grid_thw: np.ndarray, cfg: VisionConfig) -> VisionLayout:
    """Rotary positions, window groups and per-image groups for patches in the processor's order.

    The processor emits patches merge-block by merge-block (m x m patches each), blocks row-major.
    A window is ``merger_window`` x ``merger_window`` merge blocks; edge windows are smaller.
    """
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, win = cfg.spatial_merge_size, cfg.merger_window
    positions, windows, images = [], [], []
    offset = 0
    for t, h, w in grid_thw.tolist():
        if h % m or w % m:
            raise ValueError(f"image_grid_thw entry {(t, h, w)} is not a multiple of spatial_merge_size {m}")
        bh, bw = h // m, w // m
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        frame_pos = np.stack([_merge_block_order(rows, m), _merge_block_order(cols, m)], axis=-1)
        block = np.arange(bh * bw).reshape(bh, bw)
        for _ in range(t):
            positions.append(frame_pos)
            images.append(offset + np.arange(h * w))
            for r0 in range(0, bh, win):
                for c0 in range(0, bw, win):
                    blocks = block[r0 : r0 + win, c0 : c0 + win].reshape(-1)
                    windows.append(offset + (blocks[:, None] * m * m + np.arange(m * m)).reshape(-1))
            offset += h * w
    n = offset
    return VisionLayout(
        positions=np.concatenate(positions).astype(np.int32),
        windows=_groups(windows, n),
        images=_groups(images, n),
    )


def _rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (N, 2, D/4)
    freqs = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)  # (N, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    # Materialised once: otherwise XLA fuses the cos / sin into every block's consumers and recomputes them.
    return jax.lax.optimization_barrier((jnp.cos(emb), jnp.sin(emb)))


def _rotate(t: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """The vision tower applies its rotary embedding in float32, as transformers does."""
    t32 = t.astype(jnp.float32)
    return (t32 * cos + rotate_half(t32) * sin).astype(t.dtype)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = Linear(
            d, 3 * d, ("vis_embed", "vis_heads"), bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.proj = Linear(
            d, d, ("vis_heads", "vis_embed"), bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, groups: AttentionGroups) -> jax.Array:
        n, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.num_heads, -1), 1, 0)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (t[groups.index] for t in (q, k, v))  # (G, L, H, D)
        out = attention(q, k, v, groups.valid[:, None, :])
        out = out.reshape(-1, d)[groups.inverse]
        return self.proj(out)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, **kw)
        self.attn = VisionAttention(cfg, **kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, ("vis_embed", "vis_mlp"), bias=True, **kw)

    def __call__(self, x, cos, sin, groups: AttentionGroups):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 block of patches (already adjacent) -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        merged = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, **kw)
        self.fc1 = Linear(merged, merged, ("vis_merge", "vis_mlp"), bias=True, **kw)
        self.fc2 = Linear(merged, cfg.out_hidden_size, ("vis_mlp", "embed"), bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.fc1.kernel.shape[0])
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Conv3d with stride == kernel is a matmul over flattened (C, T, P, P) patches.
        self.patch_embed = param(
            rngs, (cfg.patch_dim, cfg.hidden_size), ("vis_patch", "vis_embed"), param_dtype
        )
        self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)

    def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        """(N, C*T*P*P) patches -> (N / merge_unit, out_hidden_size) LLM-ready image features."""
        x = jnp.dot(pixel_values.astype(self.dtype), self.patch_embed[...].astype(self.dtype))
        x = constrain(x, ("patches", "act_embed"))
        cos, sin = _rotary(layout.positions, self.cfg.head_dim, self.cfg.rope_theta)
        full = set(self.cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout.images if i in full else layout.windows)
        return self.merger(x)
