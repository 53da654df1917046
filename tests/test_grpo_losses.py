"""GRPO-family advantages and losses against plain numpy references on random inputs, plus gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalereasoner_jax.rl import grpo as G

SHAPES = [(2, 3, 9), (4, 5, 16), (3, 2, 1)]  # (prompts B, group size G, tokens T)
RTOL, ATOL = 2e-5, 2e-6


# ------------------------------------------------------------------------------------- numpy references


def np_advantages(r: np.ndarray, g: int, scale: str = "std", eps: float = 1e-6) -> np.ndarray:
    out = np.empty_like(r, dtype=np.float64)
    for s in range(0, len(r), g):
        grp = r[s : s + g].astype(np.float64)
        out[s : s + g] = grp - grp.mean()
        if scale == "std":
            out[s : s + g] /= grp.std(ddof=1) + eps
    return out


def np_policy_loss(logp, old, adv, mask, cl, ch, level="token"):
    if level == "token":
        ratio = np.exp(logp - old)
    else:
        n = np.maximum(mask.sum(-1), 1)
        s = np.exp(((logp - old) * mask).sum(-1) / n)
        ratio = np.broadcast_to(s[:, None], logp.shape)
    a = adv[:, None]
    unclipped = -ratio * a
    clipped = -np.clip(ratio, 1 - cl, 1 + ch) * a
    loss = np.maximum(unclipped, clipped)
    clip_frac = ((clipped > unclipped) * mask).sum() / max(mask.sum(), 1)
    return loss, clip_frac, (ratio * mask).sum() / max(mask.sum(), 1)


def np_k3(logp, ref):
    d = ref.astype(np.float64) - logp
    return np.exp(d) - d - 1


def np_aggregate(x, mask, mode, max_len=None):
    if mode == "token-mean":
        return (x * mask).sum() / max(mask.sum(), 1)
    if mode == "seq-mean-token-mean":
        seqs = [(x[i] * mask[i]).sum() / mask[i].sum() for i in range(len(x)) if mask[i].sum() > 0]
        return float(np.mean(seqs)) if seqs else 0.0
    if mode == "seq-mean-token-sum-norm":
        return float(np.mean([(x[i] * mask[i]).sum() / max_len for i in range(len(x))]))
    raise AssertionError(mode)


def np_overlong(length: float, max_len: int, buffer: int, penalty: float) -> float:
    if length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return (max_len - buffer - length) / buffer * penalty
    return -penalty


# ---------------------------------------------------------------------------------------------- inputs


def make_inputs(seed: int, b: int, g: int, t: int, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    n = b * g
    logp = -rng.exponential(1.0, (n, t)).astype(np.float32)
    old = (logp + rng.normal(0, spread, (n, t))).astype(np.float32)
    ref = (logp + rng.normal(0, spread, (n, t))).astype(np.float32)
    lengths = rng.integers(0, t + 1, n)
    lengths[0] = t  # at least one full row; others padded, some possibly empty
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    rewards = rng.choice([0.0, 0.2, 0.8, 1.0], n).astype(np.float32)
    adv = rng.normal(0, 1, n).astype(np.float32)
    return logp, old, ref, mask, rewards, adv


# ------------------------------------------------------------------------------------------- advantages


@pytest.mark.parametrize(("b", "g", "t"), SHAPES)
@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages(b: int, g: int, t: int, scale: str) -> None:
    *_, rewards, _ = make_inputs(b * 10 + g, b, g, t)
    rewards[:g] = 0.8  # one group with equal rewards -> advantage exactly 0
    got = G.group_advantages(jnp.asarray(rewards), g, scale=scale)
    np.testing.assert_allclose(got, np_advantages(rewards, g, scale), rtol=RTOL, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[:g]), 0.0)
    ref_name = {"std": "grpo", "none": "dr_grpo"}[scale]
    np.testing.assert_allclose(G.get_advantage_estimator(ref_name)(rewards, g), got, rtol=RTOL)


def test_group_advantages_errors() -> None:
    with pytest.raises(ValueError):
        G.group_advantages(jnp.zeros(7), 2)
    with pytest.raises(ValueError):
        G.group_advantages(jnp.zeros(4), 1)
    with pytest.raises(KeyError, match="dr_grpo"):
        G.get_advantage_estimator("ppo")


# ----------------------------------------------------------------------------------------- policy loss


@pytest.mark.parametrize(("b", "g", "t"), SHAPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(("cl", "ch"), [(0.2, 0.2), (0.2, 0.28)])
def test_policy_loss(b: int, g: int, t: int, level: str, cl: float, ch: float) -> None:
    logp, old, _, mask, _, adv = make_inputs(t + g, b, g, t)
    loss, stats = G.policy_loss(logp, old, adv, mask, clip_low=cl, clip_high=ch, ratio_level=level)
    ref_loss, ref_clip, ref_ratio = np_policy_loss(logp, old, adv, mask, cl, ch, level)
    np.testing.assert_allclose(np.asarray(loss) * mask, ref_loss * mask, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats["clip_fraction"], ref_clip, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats["ratio_mean"], ref_ratio, rtol=RTOL, atol=ATOL)
    assert float(stats["clip_fraction_low"]) + float(stats["clip_fraction_high"]) == pytest.approx(
        float(stats["clip_fraction"]), abs=1e-6
    )


def test_clip_higher_is_asymmetric() -> None:
    adv = jnp.array([1.0, 1.0, -1.0, -1.0])
    logp = jnp.log(jnp.array([[1.25], [1.5], [0.7], [0.9]]))  # ratios vs old_logp = 0
    loss, stats = G.policy_loss(logp, jnp.zeros((4, 1)), adv, jnp.ones((4, 1)), clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose(loss[:, 0], [-1.25, -1.28, 0.8, 0.9], rtol=1e-6)
    assert float(stats["clip_fraction"]) == 0.5
    assert float(stats["clip_fraction_high"]) == 0.25 and float(stats["clip_fraction_low"]) == 0.25


# -------------------------------------------------------------------------------------------- KL / agg


@pytest.mark.parametrize(("b", "g", "t"), SHAPES)
def test_kl_estimators(b: int, g: int, t: int) -> None:
    logp, _, ref, *_ = make_inputs(7 * t, b, g, t, spread=1.0)
    k3 = np.asarray(G.kl_k3(logp, ref))
    np.testing.assert_allclose(k3, np_k3(logp, ref), rtol=1e-5, atol=1e-6)
    assert (k3 >= 0).all()
    np.testing.assert_allclose(G.kl_k1(logp, ref), logp - ref, rtol=1e-6)
    np.testing.assert_allclose(G.kl_k2(logp, ref), 0.5 * (logp - ref) ** 2, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(G.kl_k3(logp, logp)), 0.0)


@pytest.mark.parametrize(("b", "g", "t"), SHAPES)
@pytest.mark.parametrize("mode", sorted(G.LOSS_AGGREGATIONS))
def test_aggregate(b: int, g: int, t: int, mode: str) -> None:
    logp, _, _, mask, *_ = make_inputs(b + 3 * t, b, g, t)
    mask[-1] = 0  # a fully padded row
    got = G.aggregate(logp, mask, mode, max_len=2 * t)
    np.testing.assert_allclose(got, np_aggregate(logp, mask, mode, max_len=2 * t), rtol=RTOL, atol=ATOL)
    assert float(G.aggregate(logp, np.zeros_like(mask), mode, max_len=t)) == 0.0


def test_aggregate_errors() -> None:
    with pytest.raises(ValueError, match="max_len"):
        G.aggregate(jnp.ones((2, 3)), jnp.ones((2, 3)), "seq-mean-token-sum-norm")
    with pytest.raises(KeyError, match="token-mean"):
        G.aggregate(jnp.ones((2, 3)), jnp.ones((2, 3)), "token-sum")


def test_aggregation_weights_differ_by_length() -> None:
    """token-mean weighs tokens equally; seq-mean-token-mean weighs sequences equally."""
    x = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(G.aggregate(x, mask, "token-mean")) == pytest.approx(0.8)
    assert float(G.aggregate(x, mask, "seq-mean-token-mean")) == pytest.approx(0.5)
    assert float(G.aggregate(x, mask, "seq-mean-token-sum-norm", max_len=8)) == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------ DAPO


@pytest.mark.parametrize(("b", "g", "t"), SHAPES)
def test_dynamic_group_filter(b: int, g: int, t: int) -> None:
    *_, rewards, _ = make_inputs(3 * b + g, b, g, t)
    rewards[:g] = 1.0
    keep, n_kept = G.dynamic_group_filter(rewards, g)
    groups = rewards.reshape(b, g)
    ref_keep = np.array([len(set(row.tolist())) > 1 for row in groups])
    np.testing.assert_array_equal(np.asarray(keep), np.repeat(ref_keep, g))
    assert int(n_kept) == ref_keep.sum() and keep.dtype == jnp.bool_
    assert not bool(keep[0])


@pytest.mark.parametrize(("max_len", "buffer", "penalty"), [(100, 20, 1.0), (64, 64, 0.5), (50, 0, 1.0)])
def test_overlong_penalty(max_len: int, buffer: int, penalty: float) -> None:
    lengths = np.arange(0, max_len + 10)
    got = np.asarray(G.overlong_penalty(lengths, max_len, buffer, penalty))
    ref = [np_overlong(float(x), max_len, buffer, penalty) for x in lengths]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert got[max_len - buffer] == 0.0 and got[max_len + 1] == -penalty
    if buffer:
        assert got[max_len] == pytest.approx(-penalty)


# ------------------------------------------------------------------------------------- composed loss


@pytest.mark.parametrize("preset", sorted(G.LOSS_PRESETS))
@pytest.mark.parametrize(("b", "g", "t"), SHAPES[:2])
def test_grpo_loss_matches_reference(preset: str, b: int, g: int, t: int) -> None:
    cfg = G.get_loss_preset(preset, max_len=t + 4, kl_coef=0.05, overlong_buffer=0)
    logp, old, ref, mask, _, adv = make_inputs(b * g * t, b, g, t)
    loss, stats = G.grpo_loss(logp, old, ref, adv, mask, cfg)
    pg, clip_frac, _ = np_policy_loss(logp, old, adv, mask, cfg.clip_low, cfg.clip_high, cfg.ratio_level)
    ref_pg = np_aggregate(pg, mask, cfg.loss_agg, cfg.max_len)
    ref_kl = np_aggregate(np_k3(logp, ref), mask, cfg.loss_agg, cfg.max_len)
    np.testing.assert_allclose(stats["pg_loss"], ref_pg, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats["kl"], ref_kl, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(loss, ref_pg + 0.05 * ref_kl, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats["clip_fraction"], clip_frac, rtol=RTOL, atol=ATOL)


def test_grpo_loss_sample_mask_and_no_ref() -> None:
    cfg = G.get_loss_preset("dapo")
    logp, old, _, mask, _, adv = make_inputs(5, 2, 3, 6)
    keep = np.array([True, True, True, False, False, False])
    loss, stats = G.grpo_loss(logp, old, None, adv, mask, cfg, sample_mask=keep)
    pg, *_ = np_policy_loss(logp, old, adv, mask, 0.2, 0.28)
    np.testing.assert_allclose(loss, np_aggregate(pg, mask * keep[:, None], "token-mean"), rtol=RTOL)
    assert "kl" not in stats
    with pytest.raises(ValueError, match="ref_logp"):
        G.grpo_loss(logp, old, None, adv, mask, G.get_loss_preset("grpo"))
    with pytest.raises(ValueError, match="max_len"):
        G.grpo_loss(logp, old, None, adv, mask, G.get_loss_preset("dr_grpo", kl_coef=0.0))


def test_presets_and_config() -> None:
    grpo = G.get_loss_preset("grpo")
    assert (grpo.clip_low, grpo.clip_high, grpo.kl_coef, grpo.kl_estimator, grpo.loss_agg) == (
        0.2,
        0.2,
        0.01,
        "k3",
        "token-mean",
    )
    dapo = G.get_loss_preset("dapo")
    assert dapo.clip_high == 0.28 and dapo.kl_coef == 0.0 and dapo.dynamic_filter and dapo.overlong_buffer
    dr = G.get_loss_preset("dr_grpo")
    assert dr.advantage == "dr_grpo" and dr.loss_agg == "seq-mean-token-sum-norm"
    assert G.get_loss_preset("gspo").ratio_level == "sequence"
    with pytest.raises(KeyError, match="dapo"):
        G.get_loss_preset("ppo")
    with pytest.raises(TypeError):
        G.get_loss_preset("grpo", no_such_field=1)
    with pytest.raises(KeyError, match="k3"):
        G.LossConfig(kl_estimator="k4")
    with pytest.raises(ValueError):
        G.LossConfig(clip_low=-0.1)
    assert dataclasses.replace(grpo, max_len=8).max_len == 8


def test_compute_advantages_dapo() -> None:
    g, max_len = 4, 100
    cfg = G.get_loss_preset("dapo", max_len=max_len, overlong_buffer=20)
    rewards = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.2, 0.8, 1.0, 1.0, 1.0, 1.0], np.float32)
    lengths = np.array([10, 10, 10, 10, 50, 60, 70, 80, 10, 90, 10, 10])  # third group: one overlong
    adv, keep, stats = G.compute_advantages(rewards, g, cfg, lengths=lengths)
    shaped = rewards + np.array([np_overlong(x, max_len, 20, 1.0) for x in lengths], np.float32)
    np.testing.assert_array_equal(np.asarray(keep), np.repeat([False, True, True], g))
    ref = np_advantages(shaped, g) * np.repeat([0, 1, 1], g)
    np.testing.assert_allclose(adv, ref, rtol=RTOL, atol=1e-5)
    assert float(stats["groups_kept_fraction"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="lengths"):
        G.compute_advantages(rewards, g, cfg)
    adv_plain, keep_plain, _ = G.compute_advantages(rewards, g, G.get_loss_preset("grpo"))
    assert bool(keep_plain.all())
    np.testing.assert_allclose(adv_plain, np_advantages(rewards, g), rtol=RTOL, atol=1e-5)


# ---------------------------------------------------------------------------------- gradients and jit


def test_gradient_sign_opposite_to_advantage() -> None:
    """d(token-mean GRPO loss)/d logp = -A rho / n_tokens on unclipped tokens, 0 on clipped ones."""
    cfg = G.get_loss_preset("grpo", kl_coef=0.0)
    logp, old, _, mask, _, adv = make_inputs(11, 4, 4, 12, spread=0.3)
    grad = np.asarray(jax.grad(lambda lp: G.grpo_loss(lp, old, None, adv, mask, cfg)[0])(logp))
    ratio = np.exp(logp - old)
    a = adv[:, None] * np.ones_like(logp)
    unclipped = (mask > 0) & ~(-np.clip(ratio, 0.8, 1.2) * a > -ratio * a)
    assert unclipped.sum() > 10 and ((mask > 0) & ~unclipped).sum() > 0
    np.testing.assert_array_equal(np.sign(grad[unclipped]), -np.sign(a[unclipped]))
    np.testing.assert_allclose(grad[unclipped], (-a * ratio / mask.sum())[unclipped], rtol=1e-5)
    np.testing.assert_array_equal(grad[~unclipped], 0.0)
    # One update per rollout (old_logp=None): ratio 1, nothing clipped, gradient -A / n_tokens.
    grad1 = jax.grad(lambda lp: G.grpo_loss(lp, None, None, adv, mask, cfg)[0])(logp)
    np.testing.assert_allclose(grad1, -a * mask / mask.sum(), rtol=1e-5, atol=1e-8)


def test_kl_gradient_pulls_towards_reference() -> None:
    logp, _, ref, mask, *_ = make_inputs(3, 2, 2, 5, spread=0.5)
    cfg = G.get_loss_preset("grpo")
    grad = np.asarray(jax.grad(lambda lp: G.grpo_loss(lp, None, ref, np.zeros(4), mask, cfg)[0])(logp))
    # d k3 / d logp = 1 - exp(ref - logp): positive when logp > ref, so descent lowers logp towards ref.
    valid = (mask > 0) & (np.abs(logp - ref) > 1e-3)
    np.testing.assert_array_equal(np.sign(grad[valid]), np.sign((logp - ref)[valid]))


def test_gspo_gradient_equals_sequence_ratio_objective() -> None:
    """The stop-gradient token form + seq-mean-token-mean has GSPO's value and gradient."""
    cfg = G.LossConfig(
        clip_low=0.05, clip_high=0.05, kl_coef=0.0, ratio_level="sequence", loss_agg="seq-mean-token-mean"
    )
    logp, old, _, mask, _, adv = make_inputs(21, 3, 4, 10, spread=0.3)
    mask[:, 0] = 1.0  # every sequence has a token

    def naive(lp):
        n = mask.sum(-1)
        s = jnp.exp(jnp.sum((lp - old) * mask, -1) / n)
        per_seq = jnp.maximum(-s * adv, -jnp.clip(s, 0.95, 1.05) * adv)
        return per_seq.mean()

    val, grad = jax.value_and_grad(lambda lp: G.grpo_loss(lp, old, None, adv, mask, cfg)[0])(logp)
    ref_val, ref_grad = jax.value_and_grad(naive)(jnp.asarray(logp))
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    stats = G.grpo_loss(logp, old, None, adv, mask, cfg)[1]
    assert 0.0 < float(stats["clip_fraction"]) < 1.0  # both branches exercised


def test_jit_compatible() -> None:
    cfg = G.get_loss_preset("dapo", max_len=16, overlong_buffer=4)
    logp, old, ref, mask, rewards, _ = make_inputs(0, 4, 5, 16)
    lengths = mask.sum(-1)

    @jax.jit
    def step(logp, old, ref, mask, rewards, lengths):
        adv, keep, adv_stats = G.compute_advantages(rewards, 5, cfg, lengths=lengths)
        (loss, stats), grad = jax.value_and_grad(
            lambda lp: G.grpo_loss(lp, old, ref, adv, mask, cfg, sample_mask=keep), has_aux=True
        )(logp)
        return loss, grad, {**stats, **adv_stats}

    loss, grad, stats = step(logp, old, ref, mask, rewards, lengths)
    adv, keep, _ = G.compute_advantages(rewards, 5, cfg, lengths=lengths)
    eager, _ = G.grpo_loss(logp, old, ref, adv, mask, cfg, sample_mask=keep)
    np.testing.assert_allclose(loss, eager, rtol=1e-5, atol=1e-7)
    assert grad.shape == logp.shape and np.isfinite(np.asarray(grad)).all()
    assert {"pg_loss", "kl", "clip_fraction", "groups_kept_fraction"} <= set(stats)
    jitted = jax.jit(G.policy_loss, static_argnames=("ratio_level",))
    out, _ = jitted(logp, old, rewards, mask, clip_low=0.2, clip_high=0.28, ratio_level="sequence")
    assert out.shape == logp.shape
    for mode in G.LOSS_AGGREGATIONS:
        jax.jit(G.aggregate, static_argnames=("mode", "max_len"))(logp, mask, mode, max_len=16)
