"""GRPO-family advantages and losses: small pure JAX functions, looked up by name from the config.

Shapes and conventions (all functions are jit-able; strings, group sizes and lengths are static):

- ``N = B * G`` completions in **group-major order**: rows ``[g*G, (g+1)*G)`` are the G samples of prompt g.
- ``logp``, ``old_logp``, ``ref_logp``: ``(N, T)`` log-probabilities of the sampled response tokens under
  the current policy (differentiated), the sampling policy and the frozen reference; ``mask``: ``(N, T)``
  1 on response tokens that count (0 on padding and prompt). Inputs are cast to float32.
- Rewards, advantages, lengths: ``(N,)``.

The recipe (DESIGN.md §3): ``A_i = (r_i - mean_G r) / (std_G r + 1e-6)`` with the unbiased std; the PPO
clipped surrogate ``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)``; plus ``kl_coef * k3``; token-mean
over the batch. Variants: DAPO (clip-higher, dynamic group filtering, soft overlong penalty), Dr.GRPO (no
std scaling, constant normaliser), GSPO (sequence-level ratio). Presets: :func:`get_loss_preset`.

Wiring into a trainer::

    cfg = get_loss_preset("grpo")                               # or "dapo", max_len=4096, ...
    adv, keep, adv_stats = compute_advantages(rewards, G, cfg, lengths=response_lengths)
    loss, stats = grpo_loss(logp, old_logp, ref_logp, adv, mask, cfg, sample_mask=keep)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp

Array = jax.Array
Stats = dict[str, Array]


def _f32(x: Any) -> Array:
    return jnp.asarray(x, jnp.float32)


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {what} {name!r}; choices: {sorted(table)}") from None


def _masked_mean(x: Array, mask: Array) -> Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ------------------------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: Array, group_size: int, *, scale: Literal["std", "none"] = "std", eps: float = 1e-6
) -> Array:
    """Group-relative advantages ``(r - mean_G r) / (std_G r + eps)`` (GRPO, DeepSeekMath eq. 3), std
    unbiased (ddof=1) as in the paper's code; ``scale="none"`` gives Dr.GRPO's ``r - mean_G r``, which
    drops the std term that up-weights groups that are almost all right or all wrong."""
    rewards = _f32(rewards)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be (B*G,) with G={group_size}; got shape {rewards.shape}")
    # Shift by each group's first reward first: float32 means of equal values can be off by an ulp, which
    # the std division would blow up; shifted, a group of equal rewards gets exactly zero advantage.
    r = rewards.reshape(-1, group_size)
    r = r - r[:, :1]
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "std":
        if group_size < 2:
            raise ValueError("the unbiased group std needs group_size >= 2")
        centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    return centred.reshape(-1)


def _grpo_advantages(rewards: Array, group_size: int, *, eps: float = 1e-6) -> Array:
    return group_advantages(rewards, group_size, scale="std", eps=eps)


def _dr_grpo_advantages(rewards: Array, group_size: int, *, eps: float = 1e-6) -> Array:
    del eps
    return group_advantages(rewards, group_size, scale="none")


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Array]] = {
    "grpo": _grpo_advantages,
    "dr_grpo": _dr_grpo_advantages,
}


def get_advantage_estimator(name: str) -> Callable[..., Array]:
    """``fn(rewards (N,), group_size, *, eps) -> (N,)`` registered as ``name``."""
    return _lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


# ------------------------------------------------------------------------------------------------- DAPO


def dynamic_group_filter(rewards: Array, group_size: int, *, atol: float = 0.0) -> tuple[Array, Array]:
    """DAPO's dynamic sampling (Yu et al. 2025, eq. 11): keep only groups whose rewards are not all equal
    (``max - min > atol``), since those have zero advantage and only dilute the token-mean. Returns the
    per-sample keep mask ``(N,)`` bool and the number of kept groups (int32). With static shapes the
    trainer masks dropped groups out of the loss (``sample_mask``) or over-samples and gathers kept ones."""
    r = _f32(rewards).reshape(-1, group_size)
    keep_group = (r.max(axis=1) - r.min(axis=1)) > atol
    return jnp.repeat(keep_group, group_size), keep_group.sum().astype(jnp.int32)


def overlong_penalty(lengths: Array, max_len: int, buffer: int, penalty: float = 1.0) -> Array:
    """DAPO's soft overlong punishment (eq. 13), added to the reward: 0 while ``len <= max_len - buffer``,
    then linear ``((max_len - buffer) - len) / buffer * penalty`` down to ``-penalty`` at ``max_len``, and
    ``-penalty`` beyond. ``buffer=0`` is a hard step at ``max_len``."""
    lengths = _f32(lengths)
    start = max_len - buffer
    ramp = (start - lengths) / max(buffer, 1) * penalty
    return jnp.where(lengths <= start, 0.0, jnp.where(lengths <= max_len, ramp, -penalty))


# ----------------------------------------------------------------------------------------- policy term


def policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ratio_level: Literal["token", "sequence"] = "token",
) -> tuple[Array, Stats]:
    """Per-token PPO clipped surrogate ``-min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)`` (PPO eq. 7;
    separate low/high bounds = DAPO's clip-higher). Returns ``(N, T)`` losses (not yet masked or
    aggregated) and stats: ``clip_fraction`` (tokens where the clipped branch is taken), its ``_low``
    (A < 0, rho < 1 - clip_low) and ``_high`` (A > 0, rho > 1 + clip_high) parts, ``ratio_mean``,
    ``ratio_min``, ``ratio_max`` and ``ppo_kl`` (k1 of old vs new), all over valid tokens.

    ``ratio_level="token"``: ``rho_t = exp(logp_t - old_logp_t)``.
    ``ratio_level="sequence"`` (GSPO, Zheng et al. 2025, eq. 7 and 11): ``s_i = exp(mean_t(logp - old_logp))``
    over the valid tokens, applied per token in the stop-gradient form ``s_it = sg[s_i] * exp(logp_t -
    sg[logp_t])``: its value is ``s_i`` on every token and, after a per-sequence token mean
    (``seq-mean-token-mean``), its gradient is exactly GSPO's ``s_i A_i mean_t grad logp_t``.
    """
    logp, old_logp, mask = _f32(logp), _f32(old_logp), _f32(mask)
    adv = _f32(advantages)[:, None]
    if ratio_level == "token":
        log_ratio = logp - old_logp
    elif ratio_level == "sequence":
        seq_log_ratio = jnp.sum((logp - old_logp) * mask, axis=-1) / jnp.maximum(mask.sum(-1), 1.0)
        log_ratio = jax.lax.stop_gradient(seq_log_ratio)[:, None] + logp - jax.lax.stop_gradient(logp)
    else:
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    ratio = jnp.exp(log_ratio)
    unclipped = -ratio * adv
    clipped = -jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = jnp.maximum(unclipped, clipped)

    sg_ratio = jax.lax.stop_gradient(ratio)
    is_clipped = (jax.lax.stop_gradient(clipped) > jax.lax.stop_gradient(unclipped)).astype(jnp.float32)
    low = ((adv < 0) & (sg_ratio < 1.0 - clip_low)).astype(jnp.float32)
    high = ((adv > 0) & (sg_ratio > 1.0 + clip_high)).astype(jnp.float32)
    valid = mask > 0
    stats = {
        "clip_fraction": _masked_mean(is_clipped, mask),
        "clip_fraction_low": _masked_mean(low, mask),
        "clip_fraction_high": _masked_mean(high, mask),
        "ratio_mean": _masked_mean(sg_ratio, mask),
        "ratio_min": jnp.min(jnp.where(valid, sg_ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(valid, sg_ratio, -jnp.inf)),
        "ppo_kl": _masked_mean(jax.lax.stop_gradient(old_logp - logp), mask),
    }
    return loss, stats


# ------------------------------------------------------------------------------------------------- KL


def kl_k1(logp: Array, ref_logp: Array) -> Array:
    """``logp - ref_logp``: unbiased for KL(pi || ref), but signed and high-variance per token."""
    return _f32(logp) - _f32(ref_logp)


def kl_k2(logp: Array, ref_logp: Array) -> Array:
    """``(logp - ref_logp)^2 / 2`` (Schulman's k2): low variance, biased."""
    return 0.5 * jnp.square(_f32(logp) - _f32(ref_logp))


def kl_k3(logp: Array, ref_logp: Array) -> Array:
    """``exp(d) - d - 1`` with ``d = ref_logp - logp`` (Schulman's k3, DeepSeekMath eq. 4): an unbiased,
    always non-negative per-token estimate of KL(pi || ref) on samples from pi. The loss adds
    ``kl_coef * kl``."""
    d = _f32(ref_logp) - _f32(logp)
    return jnp.exp(d) - d - 1.0


KL_ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


# ------------------------------------------------------------------------------------------ aggregation


def _token_mean(per_token: Array, mask: Array, max_len: int | None = None) -> Array:
    del max_len
    return _masked_mean(per_token, mask)


def _seq_mean_token_mean(per_token: Array, mask: Array, max_len: int | None = None) -> Array:
    del max_len
    n_tok = mask.sum(-1)
    seq = jnp.sum(per_token * mask, axis=-1) / jnp.maximum(n_tok, 1.0)
    has_tokens = (n_tok > 0).astype(jnp.float32)
    return jnp.sum(seq * has_tokens) / jnp.maximum(has_tokens.sum(), 1.0)


def _seq_mean_token_sum_norm(per_token: Array, mask: Array, max_len: int | None = None) -> Array:
    if max_len is None:
        raise ValueError("loss_agg 'seq-mean-token-sum-norm' needs max_len (the constant normaliser)")
    return jnp.mean(jnp.sum(per_token * mask, axis=-1) / max_len)


LOSS_AGGREGATIONS: dict[str, Callable[..., Array]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(
    per_token: Array, mask: Array, mode: str = "token-mean", *, max_len: int | None = None
) -> Array:
    """Reduce ``(N, T)`` per-token losses to a scalar over the tokens where ``mask`` is 1.

    - ``token-mean`` (default; DAPO, the paper): ``sum(x m) / sum(m)`` over the whole batch, so every token
      weighs the same and long answers are not down-weighted.
    - ``seq-mean-token-mean`` (original GRPO; use with GSPO): the mean over sequences that have at least
      one valid token of each sequence's token mean.
    - ``seq-mean-token-sum-norm`` (Dr.GRPO): ``mean_i sum_t(x m) / max_len`` over all N sequences, a
      constant normaliser with no length bias (``max_len`` required, e.g. the max response length).

    An all-zero mask gives 0 (never NaN).
    """
    fn = _lookup(LOSS_AGGREGATIONS, mode, "loss aggregation")
    return fn(_f32(per_token), _f32(mask), max_len=max_len)


# ---------------------------------------------------------------------------------------- config/loss


@dataclass(frozen=True)
class LossConfig:
    """Everything that distinguishes GRPO, DAPO, Dr.GRPO and GSPO; named presets in ``LOSS_PRESETS``."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.01
    kl_estimator: str = "k3"
    loss_agg: str = "token-mean"
    ratio_level: Literal["token", "sequence"] = "token"
    advantage: str = "grpo"
    advantage_eps: float = 1e-6
    max_len: int | None = None  # max response tokens: Dr.GRPO's normaliser and the overlong limit
    dynamic_filter: bool = False  # DAPO: mask out groups whose rewards are all equal
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last `buffer` tokens; 0 = off
    overlong_penalty: float = 1.0

    def __post_init__(self) -> None:
        _lookup(KL_ESTIMATORS, self.kl_estimator, "KL estimator")
        _lookup(LOSS_AGGREGATIONS, self.loss_agg, "loss aggregation")
        _lookup(ADVANTAGE_ESTIMATORS, self.advantage, "advantage estimator")
        if self.ratio_level not in ("token", "sequence"):
            raise ValueError(f"ratio_level must be 'token' or 'sequence', got {self.ratio_level!r}")
        if min(self.clip_low, self.clip_high, self.kl_coef, self.overlong_buffer) < 0:
            raise ValueError("clip_low, clip_high, kl_coef and overlong_buffer must be >= 0")
        if self.clip_low >= 1.0:
            raise ValueError(f"clip_low must be < 1, got {self.clip_low}")
        if self.max_len is not None and self.overlong_buffer > self.max_len:
            raise ValueError(f"overlong_buffer {self.overlong_buffer} exceeds max_len {self.max_len}")


LOSS_PRESETS: dict[str, LossConfig] = {
    # The paper's recipe (DESIGN.md §3).
    "grpo": LossConfig(),
    # DAPO (Yu et al. 2025): clip-higher, no KL, token-mean, dynamic sampling, soft overlong punishment
    # (DAPO used a 4,096 buffer on 20,480 tokens; 1,024 here suits the paper's 4,096-token responses).
    "dapo": LossConfig(clip_high=0.28, kl_coef=0.0, dynamic_filter=True, overlong_buffer=1024),
    # Dr.GRPO (Liu et al. 2025): no std scaling, constant normaliser (set max_len).
    "dr_grpo": LossConfig(advantage="dr_grpo", loss_agg="seq-mean-token-sum-norm"),
    # GSPO (Zheng et al. 2025): sequence-level ratio with its small clip range, per-sequence token mean.
    "gspo": LossConfig(
        clip_low=3e-4, clip_high=4e-4, kl_coef=0.0, ratio_level="sequence", loss_agg="seq-mean-token-mean"
    ),
}


def get_loss_preset(name: str, **overrides: Any) -> LossConfig:
    """The preset ``name`` with any field replaced, e.g. ``get_loss_preset("dr_grpo", max_len=4096)``."""
    preset = _lookup(LOSS_PRESETS, name, "loss preset")
    return dataclasses.replace(preset, **overrides) if overrides else preset


def compute_advantages(
    rewards: Array, group_size: int, config: LossConfig, *, lengths: Array | None = None
) -> tuple[Array, Array, Stats]:
    """Rewards ``(N,)`` -> ``(advantages (N,), keep (N,) bool, stats)`` per ``config``: adds the overlong
    penalty (needs ``lengths`` = response tokens and ``config.max_len``), filters equal-reward groups on
    the shaped rewards (they would get zero advantage), and applies the advantage estimator. Dropped
    samples get advantage 0; pass ``keep`` as ``grpo_loss(..., sample_mask=keep)``."""
    rewards = _f32(rewards)
    stats: Stats = {"reward_mean": rewards.mean(), "reward_std": rewards.std()}
    if config.overlong_buffer > 0:
        if lengths is None or config.max_len is None:
            raise ValueError("the overlong penalty needs response lengths and config.max_len")
        pen = overlong_penalty(lengths, config.max_len, config.overlong_buffer, config.overlong_penalty)
        rewards = rewards + pen
        stats["overlong_penalty_mean"] = pen.mean()
        stats["overlong_fraction"] = (pen < 0).mean()
    estimator = get_advantage_estimator(config.advantage)
    adv = estimator(rewards, group_size, eps=config.advantage_eps)
    n_groups = rewards.shape[0] // group_size
    if config.dynamic_filter:
        keep, n_kept = dynamic_group_filter(rewards, group_size)
        adv = jnp.where(keep, adv, 0.0)
    else:
        keep, n_kept = jnp.ones(rewards.shape, bool), jnp.asarray(n_groups, jnp.int32)
    stats["groups_kept_fraction"] = n_kept / n_groups
    stats["advantage_abs_mean"] = jnp.abs(adv).mean()
    return adv, keep, stats


def grpo_loss(
    logp: Array,
    old_logp: Array | None,
    ref_logp: Array | None,
    advantages: Array,
    mask: Array,
    config: LossConfig,
    *,
    sample_mask: Array | None = None,
) -> tuple[Array, Stats]:
    """Total loss ``agg(policy_loss + kl_coef * kl)`` and stats (``loss``, ``pg_loss``, ``kl``, clip and
    ratio stats), with the aggregation over ``mask * sample_mask[:, None]``.

    ``old_logp=None`` means one update per rollout (the paper): the old policy is the current one, so
    ``old_logp = stop_gradient(logp)``, the ratio is 1 and nothing clips. ``ref_logp`` may be None only
    when ``kl_coef == 0``. The reported ``kl`` is the same aggregation of the unweighted estimator.
    """
    logp = _f32(logp)
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else jax.lax.stop_gradient(_f32(old_logp))
    mask = _f32(mask)
    if sample_mask is not None:
        mask = mask * _f32(sample_mask)[:, None]
    if config.loss_agg == "seq-mean-token-sum-norm" and config.max_len is None:
        raise ValueError("loss_agg 'seq-mean-token-sum-norm' needs config.max_len")
    pg, stats = policy_loss(
        logp,
        old_logp,
        jax.lax.stop_gradient(_f32(advantages)),
        mask,
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        ratio_level=config.ratio_level,
    )
    agg = LOSS_AGGREGATIONS[config.loss_agg]
    pg_loss = agg(pg, mask, max_len=config.max_len)
    total = pg_loss
    if config.kl_coef > 0 or ref_logp is not None:
        if ref_logp is None:
            raise ValueError(f"kl_coef={config.kl_coef} needs ref_logp")
        kl = KL_ESTIMATORS[config.kl_estimator](logp, jax.lax.stop_gradient(_f32(ref_logp)))
        kl_loss = agg(kl, mask, max_len=config.max_len)
        if config.kl_coef > 0:
            total = total + config.kl_coef * kl_loss
        stats["kl"] = jax.lax.stop_gradient(kl_loss)
    stats["pg_loss"] = jax.lax.stop_gradient(pg_loss)
    stats["loss"] = jax.lax.stop_gradient(total)
    stats["response_tokens"] = mask.sum()
    return total, stats
