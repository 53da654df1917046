"""One GRPO update moves the policy the right way: up on positive advantages, down on negative ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from scalereasoner_jax.config import load_config
from scalereasoner_jax.models.qwen2_5_vl.model import prepare_inputs
from scalereasoner_jax.rl.scoring import score_batch
from scalereasoner_jax.rl.trainer import GRPOTrainer, slice_prompts


def test_one_update_raises_rewarded_completions_and_lowers_the_rest(tmp_path, monkeypatch):
    config = load_config(
        "grpo_tiny_cpu",
        [
            "data.synthetic.n=60",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=8",
            "train.eval_every=0",
            "train.tensorboard=false",
            "checkpoint.every=0",
            "optim.lr=1e-3",
            "grpo.kl_coef=0.0",
        ],
        kind="grpo",
    )
    trainer = GRPOTrainer(config, tmp_path)
    captured = {}

    def designed_rewards(batch, rollout):
        # The first sample of every group is "right", the others wrong: advantages +, -, -, -.
        captured["batch"], captured["rollout"] = batch, rollout
        r = (np.arange(len(rollout.tokens)) % rollout.group_size == 0).astype(np.float32)
        return r, {"accuracy": float(r.mean()), "format_rate": 0.0}

    monkeypatch.setattr(trainer, "_rewards", designed_rewards)
    before = jax.tree.map(jnp.copy, trainer.params)  # the update donates the old parameters
    metrics = trainer.train_step()
    assert metrics["advantage_abs_mean"] > 0 and metrics["grad_norm"] > 0

    batch, rollout = captured["batch"], captured["rollout"]
    prompts = prepare_inputs(
        trainer.model_config,
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("pixel_values"),
        batch.get("image_grid_thw"),
    )
    scored = score_batch(prompts, rollout)
    old = np.asarray(trainer._logprobs(before, prompts, scored)[0]).sum(-1)
    new = np.asarray(trainer._logprobs(trainer.params, prompts, scored)[0]).sum(-1)
    delta = new - old
    rewarded = np.arange(len(delta)) % rollout.group_size == 0
    assert (delta[rewarded] > 0).all(), delta
    assert delta[~rewarded].mean() < 0, delta
    assert slice_prompts(batch, np.arange(len(batch["id"])))["input_ids"].shape == batch["input_ids"].shape


def test_blind_eval_logs_accuracy_without_images(tmp_path, monkeypatch):
    """``blind_eval.every``: the same validation slice answered with and without its images, logged to the
    metrics JSONL (and TensorBoard) at those steps only."""
    import json

    from scalereasoner_jax.rl.sampler import Sampler

    config = load_config(
        "grpo_tiny_cpu",
        [
            "data.synthetic.n=60",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=4",
            "train.steps=2",
            "train.eval_every=0",
            "checkpoint.every=0",
            "blind_eval.every=2",
            "blind_eval.examples=3",
        ],
        kind="grpo",
    )
    calls = []
    generate = Sampler.generate

    def spy(self, state, batch, group_size, key):
        calls.append((group_size, "pixel_values" in batch, len(batch["input_ids"])))
        return generate(self, state, batch, group_size, key)

    monkeypatch.setattr(Sampler, "generate", spy)
    trainer = GRPOTrainer(config, tmp_path)
    assert trainer.train() == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "blind_accuracy" not in rows[0]
    assert {"blind_accuracy", "blind_format_rate", "blind_slice_accuracy"} <= set(rows[1])
    evals = [c for c in calls if c[0] == 1]  # greedy evaluation calls (group size 1); rollouts use G=2
    half = len(evals) // 2  # the slice with its images, then the same slice without
    assert half >= 1 and [has for _, has, _ in evals] == [True] * half + [False] * half
    assert sum(rows for _, _, rows in evals[:half]) >= 3  # the whole slice of 3 examples
    assert list((tmp_path / "tensorboard").iterdir())


def test_on_policy_update_reuses_its_forward_pass_for_the_old_log_probs(tmp_path, monkeypatch):
    """With one update per step the old policy's log-probs come from the update's own forward pass: the
    same update, loss and sampler/trainer log-prob gap as with the separate scoring pass."""
    overrides = [
        "data.synthetic.n=40",
        "rollout.prompts_per_step=4",
        "rollout.group_size=3",
        "rollout.max_new_tokens=6",
        "train.eval_every=0",
        "train.tensorboard=false",
        "checkpoint.every=0",
        "optim.lr=1e-3",
        "grpo.grad_accum=2",
    ]
    results = []
    for on_policy in (True, False):
        trainer = GRPOTrainer(load_config("grpo_tiny_cpu", overrides, kind="grpo"), tmp_path / str(on_policy))
        assert trainer.on_policy
        trainer.on_policy = on_policy
        calls = []
        monkeypatch.setattr(trainer, "_logprobs", _counting(trainer._logprobs, calls))
        monkeypatch.setattr(trainer, "_rewards", _alternating_rewards)
        metrics = trainer.train_step()
        # The reference (kl_coef > 0) is always scored; the policy only without the shortcut.
        assert len(calls) == (1 if on_policy else 2)
        results.append((metrics, jax.device_get(trainer.params)))
    (fast, fast_params), (slow, slow_params) = results
    assert fast["advantage_abs_mean"] > 0 and fast["sampler_logprob_diff"] < 1e-4
    for key in ("loss", "kl", "entropy", "grad_norm", "sampler_logprob_diff", "reward_mean"):
        np.testing.assert_allclose(fast[key], slow[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # AdamW's first step is about lr * sign(gradient): gradients within float noise of 0 may differ by
    # up to lr there, so compare the parameters at 1% of lr (1e-3).
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # noqa: E731
    jax.tree.map(close, fast_params, slow_params)


def _counting(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def _alternating_rewards(batch, rollout):
    r = (np.arange(len(rollout.tokens)) % 2).astype(np.float32)
    return r, {"accuracy": float(r.mean()), "format_rate": 0.0}
