"""The attention kernels against a plain numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from scalereasoner_jax.models.qwen2_5_vl.layers import attention, cache_attention, causal_attention


def _reference(q, k, v, mask):
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    return np.einsum("bhst,bthd->bshd", probs, v)


def test_grouped_query_attention_matches_reference():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 7, 6, 8)).astype(np.float32)
    k = rng.standard_normal((2, 9, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 9, 2, 8)).astype(np.float32)
    mask = rng.random((2, 7, 9)) < 0.7
    mask[..., 0] = True
    np.testing.assert_allclose(np.asarray(attention(q, k, v, mask)), _reference(q, k, v, mask), atol=1e-5)


def test_blocked_causal_attention_equals_full():
    rng = np.random.default_rng(1)
    s = 301  # not a multiple of the block
    q = rng.standard_normal((2, s, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, s, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, s, 2, 16)).astype(np.float32)
    valid = np.ones((2, s), bool)
    valid[1, :37] = False  # left padding in the second row
    mask = np.tril(np.ones((s, s), bool))[None] & valid[:, None, :]
    got = np.asarray(causal_attention(q, k, v, mask, block=64))
    want = np.asarray(attention(q, k, v, mask))
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5)
    np.testing.assert_allclose(got[0], _reference(q, k, v, mask)[0], atol=1e-5)


@pytest.mark.parametrize("queries", [1, 5])  # one decode step (multiply-reduce) and a scored chunk (matmuls)
def test_shared_prefix_attention_equals_attention_over_copied_prefix(queries):
    """G rows continuing one prompt's cache give what each row would with its own copy of the prompt."""
    rng = np.random.default_rng(2)
    prompts, group, p, t, heads, kv, d = 2, 3, 11, 6, 6, 2, 8
    n = prompts * group
    q = rng.standard_normal((n, queries, heads, d)).astype(np.float32)
    pk, pv = (rng.standard_normal((prompts, kv, p, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((n, kv, t, d)).astype(np.float32) for _ in range(2))
    prefix_valid = np.ones((prompts, p), bool)
    prefix_valid[1, :4] = False  # the second prompt is left-padded
    own = rng.random((n, queries, t)) < 0.7
    got = np.asarray(cache_attention(q, k, v, own, (pk, pv, prefix_valid)))

    full_k = np.concatenate([np.repeat(pk, group, axis=0), k], axis=2).transpose(0, 2, 1, 3)
    full_v = np.concatenate([np.repeat(pv, group, axis=0), v], axis=2).transpose(0, 2, 1, 3)
    mask = np.concatenate([np.repeat(prefix_valid, group, axis=0)[:, None].repeat(queries, 1), own], axis=2)
    np.testing.assert_allclose(got, _reference(q, full_k, full_v, mask), atol=1e-5)
    # The same keys in the cache's layout without a prefix, and in attention's (B, T, K, D) layout.
    np.testing.assert_allclose(
        np.asarray(cache_attention(q, full_k.transpose(0, 2, 1, 3), full_v.transpose(0, 2, 1, 3), mask)),
        np.asarray(attention(q, full_k, full_v, mask)),
        atol=1e-5,
    )
