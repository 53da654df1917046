"""The packed-panel CPU matmul (kernels/packed_matmul) against numpy and XLA's dot."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalereasoner_jax.kernels import packed_matmul as pm


def test_builds_where_the_cpu_and_a_compiler_allow_it():
    # A machine that can build the kernel must not silently fall back to XLA's dot.
    can_build = "avx512f" in pm._cpu_flags() and (shutil.which("g++") or shutil.which("c++"))
    assert pm.available() == bool(can_build), pm.unavailable_reason()
    if not can_build:
        assert "AVX-512" in pm.unavailable_reason() or "compiler" in pm.unavailable_reason()


needs_kernel = pytest.mark.skipif(not pm.available(), reason="no AVX-512 CPU or C++ compiler here")


@needs_kernel
@pytest.mark.parametrize(
    "m, k, n",
    [(1, 64, 32), (5, 768, 256), (10, 768, 2048), (12, 100, 64), (13, 64, 96), (30, 7, 32), (40, 256, 512)],
)
def test_packed_matmul_equals_a_float64_product(m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    packed = jax.jit(pm.pack)(jnp.asarray(w))
    # Panel p holds columns 32p .. 32p + 31, row after row: exactly this reshape, bit for bit.
    np.testing.assert_array_equal(np.asarray(packed), w.reshape(k, n // 32, 32).transpose(1, 0, 2))
    got = np.asarray(jax.jit(pm.packed_matmul)(jnp.asarray(x), packed))
    want = x.astype(np.float64) @ w.astype(np.float64)
    # float32 sums of k products of standard normals: results of size ~sqrt(k), rounding ~1e-6 of that.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.sqrt(k))
    assert got.shape == (m, n)


@needs_kernel
def test_leading_axes_and_packing_into_donated_panels():
    rng = np.random.default_rng(0)
    w1, w2 = (jnp.asarray(rng.standard_normal((64, 96), dtype=np.float32)) for _ in range(2))
    x = jnp.asarray(rng.standard_normal((2, 3, 64), dtype=np.float32))
    pack_into = jax.jit(pm.pack, donate_argnums=1)
    first = jax.jit(pm.pack)(w1)
    second = pack_into(w2, first)  # reuses the first panels' memory
    assert first.is_deleted()
    np.testing.assert_array_equal(np.asarray(second), np.asarray(jax.jit(pm.pack)(w2)))
    y = jax.jit(pm.packed_matmul)(x, second)
    assert y.shape == (2, 3, 96)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w2), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_bad_shapes_and_dtypes_are_refused():
    w = jnp.ones((64, 48), jnp.float32)
    assert not pm.packable(w) and not pm.packable(w.astype(jnp.bfloat16)) and pm.packable(jnp.ones((8, 64)))
    with pytest.raises(ValueError, match=r"shape \(64, 48\).*multiple of 32"):
        pm.pack(w)
    packed = pm.pack(jnp.ones((64, 64), jnp.float32))
    with pytest.raises(ValueError, match="does not match packed"):
        pm.packed_matmul(jnp.ones((2, 32), jnp.float32), packed)
    with pytest.raises(ValueError, match="into is"):
        pm.pack(jnp.ones((64, 64), jnp.float32), jnp.ones((1, 64, 32), jnp.float32))
