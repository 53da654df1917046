"""The GRPO learner: rollouts -> rewards -> group advantages -> clipped policy updates with KL.

One step, as in the paper's recipe (DESIGN.md §3)::

    B prompts --sampler (prefill once per prompt, G samples)--> B*G completions
      -> rewards (registry) -> group-normalised advantages (+ DAPO filtering / overlong penalty)
      -> log-probs of the policy before the update (and of the frozen reference, for the KL term)
      -> ppo_epochs x num_minibatches AdamW updates, each accumulating grad_accum micro-batches

With one update per step (the paper's recipe: ppo_epochs = num_minibatches = 1) the policy before the
update is the one being differentiated, so its log-probs come from the update's own forward pass
(``old_logp = stop_gradient(logp)``) instead of a separate scoring pass.

The policy's parameters and optimizer state live sharded on the mesh by the model's logical rules
(FSDP); the reference has the same shardings, or waits in host memory between uses. Every hot function
is a ``jax.jit`` over (graphdef-closed) parameter pytrees, with the train state donated.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scalereasoner_jax.config import GRPOConfig, to_dict
from scalereasoner_jax.data.pipeline import PipelineConfig, make_dataset
from scalereasoner_jax.models.qwen2_5_vl.model import ModelInputs, batch_inputs
from scalereasoner_jax.parallel import replicated
from scalereasoner_jax.rl import grpo, rewards
from scalereasoner_jax.rl.sampler import Rollout, Sampler, SamplingConfig, stop_token_sequences
from scalereasoner_jax.rl.scoring import ScoreBatch, completion_logprobs, score_batch
from scalereasoner_jax.train.evaluate import greedy_eval
from scalereasoner_jax.train.loop import Learner, abstract_like
from scalereasoner_jax.train.optimizer import make_optimizer
from scalereasoner_jax.train.setup import dataset_source


def slice_prompts(batch: Mapping[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """The pipeline batch restricted to prompts ``rows`` (their images included), in order."""
    n_images = np.asarray(batch["n_images"])
    image_start = np.concatenate([[0], np.cumsum(n_images)])
    out = {k: np.asarray(v)[rows] for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
    if "image_grid_thw" in batch:
        grids = np.asarray(batch["image_grid_thw"])
        patches = grids.prod(-1)
        patch_start = np.concatenate([[0], np.cumsum(patches)])
        images = np.concatenate([np.arange(image_start[r], image_start[r + 1]) for r in rows]).astype(int)
        if len(images):
            out["image_grid_thw"] = grids[images]
            out["pixel_values"] = np.concatenate(
                [batch["pixel_values"][patch_start[i] : patch_start[i + 1]] for i in images]
            )
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UpdateBatch:
    """Everything one micro-batch of the update needs, as device arrays."""

    prompts: ModelInputs  # the micro-batch's prompts with their pixels
    scored: ScoreBatch  # prompt + completion rows
    old_logp: jax.Array | None  # (N, T); None: on-policy, the update's own log-probs
    ref_logp: jax.Array | None  # (N, T)
    advantages: jax.Array  # (N,)
    sample_mask: jax.Array  # (N,) rows kept by dynamic filtering


class GRPOTrainer(Learner):
    def __init__(self, config: GRPOConfig, workdir: str | Path, *, resume: bool = False):
        c = config
        self.params = self.prepare(config, workdir)
        tok = self.encoder.tokenizer

        self.loss = c.grpo.resolved_loss()
        self.loss_config = grpo.get_loss_preset(
            self.loss.preset,
            clip_low=self.loss.clip_low,
            clip_high=self.loss.clip_high,
            kl_coef=self.loss.kl_coef,
            kl_estimator=self.loss.kl_estimator,
            loss_agg=self.loss.loss_agg,
            ratio_level=self.loss.ratio_level,
            advantage=self.loss.advantage,
            advantage_eps=c.grpo.advantage_eps,
            max_len=c.rollout.max_new_tokens,
            dynamic_filter=self.loss.dynamic_filtering,
            overlong_buffer=self.loss.overlong_buffer,
            overlong_penalty=self.loss.overlong_penalty,
        )
        self.use_reference = self.loss_config.kl_coef > 0
        self.on_policy = c.grpo.ppo_epochs == 1 and c.grpo.num_minibatches == 1
        self.ref_params = None
        if self.use_reference:
            copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p))
            self.ref_params = copy(self.params)
            if c.reference.offload_to_host:
                self._ref_shardings = jax.tree.map(lambda x: x.sharding, self.ref_params)
                self.ref_params = jax.device_get(self.ref_params)
        self.reward_fn = rewards.get_reward(c.grpo.reward, **dict(c.grpo.reward_kwargs))

        eos = tuple(
            t for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if t is not None and t >= 0
        )
        self.sampling = SamplingConfig(
            max_new_tokens=c.rollout.max_new_tokens,
            eos_token_ids=tuple(sorted(set(eos))),
            pad_token_id=tok.pad_token_id,
            temperature=c.rollout.temperature,
            top_p=c.rollout.top_p,
            top_k=c.rollout.top_k,
            stop_sequences=stop_token_sequences(tok, c.rollout.stop_strings),
        )
        self.sampler = Sampler(nnx.merge(self.graphdef, self.params), self.sampling)
        eval_sampling = dataclasses.replace(
            self.sampling,
            greedy=c.rollout.eval_greedy,
            max_new_tokens=c.rollout.eval_max_new_tokens or c.rollout.max_new_tokens,
        )
        self.eval_sampler = Sampler(nnx.merge(self.graphdef, self.params), eval_sampling)

        n_proc = jax.process_count()
        if c.rollout.prompts_per_step % n_proc:
            raise ValueError(
                f"rollout.prompts_per_step={c.rollout.prompts_per_step} must divide by {n_proc} processes"
            )
        # Each process reads prompts_per_step / n_proc prompts; the pipeline gathers them, so every
        # process holds (and steps on) the same global batch of prompts_per_step prompts.
        self.batch_prompts = c.rollout.prompts_per_step
        micro = c.grpo.num_minibatches * c.grpo.grad_accum
        if self.batch_prompts % micro:
            raise ValueError(
                f"rollout.prompts_per_step ({self.batch_prompts}) must divide by "
                f"num_minibatches x grad_accum ({micro})"
            )
        self.pipeline_config = PipelineConfig(
            batch_size=self.batch_prompts // n_proc,
            seed=c.data.seed,
            num_epochs=None,
            length_buckets=tuple(c.data.length_buckets),
            shuffle_options=c.data.shuffle_options,
            worker_count=c.data.worker_count,
        )
        self.train_source = dataset_source(c.data, self.workdir, c.data.train_split)
        self.data_iter = iter(make_dataset(self.train_source, self.encoder, self.pipeline_config))

        self.tx = make_optimizer(c.optim, c.train.steps)
        # jit leaves the state's scalars (AdamW's step count) on one local device; multi-host checkpoints
        # and the update's fixed output shardings need every leaf on the mesh.
        self.opt_state = jax.tree.map(self._on_mesh, jax.jit(self.tx.init)(self.params))
        # Global (mesh-replicated) arrays, not single-device ones: saved collectively from every host.
        self.rng = replicated(jax.random.key(c.train.seed), self.mesh)
        self.step = 0
        self._jit()

        self.start(self.workdir, resume=resume, desc="grpo")

    # -- jitted pieces -------------------------------------------------------------------------------
    def _jit(self) -> None:
        graphdef, temperature, loss_config = self.graphdef, self.sampling.temperature, self.loss_config

        def logprobs(params, prompts: ModelInputs, scored: ScoreBatch):
            model = nnx.merge(graphdef, params)
            return completion_logprobs(model, scored, model.image_features(prompts), temperature)

        def loss_fn(params, mb: UpdateBatch):
            logp, entropy = logprobs(params, mb.prompts, mb.scored)
            loss, stats = grpo.grpo_loss(
                logp,
                mb.old_logp,
                mb.ref_logp,
                mb.advantages,
                mb.scored.mask,
                loss_config,
                sample_mask=mb.sample_mask,
            )
            mask = mb.scored.mask
            stats = {**stats, "entropy": jnp.sum(entropy) / jnp.maximum(jnp.sum(mask), 1.0)}
            return loss, (stats, logp)

        def grads(params, mb: UpdateBatch):
            (_, (stats, logp)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
            return g, stats, logp

        def apply(params, opt_state, g):
            norm = optax.global_norm(g)
            updates, opt_state = self.tx.update(g, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, norm

        self._logprobs = jax.jit(logprobs)
        self._grads = jax.jit(grads)
        self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
        self._scale = jax.jit(lambda a, s: jax.tree.map(lambda x: x * s, a), donate_argnums=0)
        # Outputs keep the inputs' shardings (the model's logical rules): left to XLA, parameters drift to
        # other layouts after the first update, and every jitted function taking them compiles again.
        shardings = jax.tree.map(lambda x: x.sharding, (self.params, self.opt_state))
        scalar = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._apply = jax.jit(apply, donate_argnums=(0, 1), out_shardings=(*shardings, scalar))

    def _reference(self):
        if self.config.reference.offload_to_host:
            return jax.device_put(self.ref_params, self._ref_shardings)
        return self.ref_params

    # -- one step --------------------------------------------------------------------------------------
    def _rewards(self, batch: Mapping[str, Any], rollout: Rollout) -> tuple[np.ndarray, dict[str, float]]:
        tok = self.encoder.tokenizer
        texts = tok.batch_decode(
            [row[:n] for row, n in zip(rollout.tokens, rollout.lengths, strict=True)],
            skip_special_tokens=True,
        )
        g = rollout.group_size
        examples = [
            {"answer": str(batch["answer"][i // g]), "options": str(batch["options"][i // g])}
            for i in range(len(texts))
        ]
        r = np.array([self.reward_fn(t, ex) for t, ex in zip(texts, examples, strict=True)], np.float32)
        acc = np.array(
            [rewards.accuracy_reward(t, ex["answer"]) for t, ex in zip(texts, examples, strict=True)]
        )
        fmt = np.array([rewards.format_reward(t) for t in texts])
        return r, {"accuracy": float(acc.mean()), "format_rate": float(fmt.mean())}

    def train_step(self) -> dict[str, Any]:
        c = self.config
        t0 = time.perf_counter()
        batch = next(self.data_iter)
        self.rng, key = jax.random.split(self.rng)
        rollout = self.sampler.generate(self.params, batch, c.rollout.group_size, key)
        t_sample = time.perf_counter()

        reward, reward_stats = self._rewards(batch, rollout)
        adv, keep, adv_stats = grpo.compute_advantages(
            jnp.asarray(reward), rollout.group_size, self.loss_config, lengths=jnp.asarray(rollout.lengths)
        )
        adv, keep = np.asarray(adv), np.asarray(keep)
        prompts = batch_inputs(self.model_config, batch)
        scored = score_batch(prompts, rollout)
        old_logp = None if self.on_policy else np.asarray(self._logprobs(self.params, prompts, scored)[0])
        ref_logp = self._logprobs(self._reference(), prompts, scored)[0] if self.use_reference else None
        ref_logp = None if ref_logp is None else np.asarray(ref_logp)
        t_score = time.perf_counter()

        g = rollout.group_size
        n_micro = c.grpo.num_minibatches * c.grpo.grad_accum
        prompt_chunks = np.array_split(np.arange(self.batch_prompts), n_micro)
        stats_list, norms, update_logp = [], [], []
        for _ in range(c.grpo.ppo_epochs):
            for m in range(c.grpo.num_minibatches):
                acc = None
                for a in range(c.grpo.grad_accum):
                    rows = prompt_chunks[m * c.grpo.grad_accum + a]
                    mb = self._micro_batch(batch, rollout, rows, old_logp, ref_logp, adv, keep, g)
                    grads, stats, logp = self._grads(self.params, mb)
                    update_logp.append((rows, logp))
                    stats_list.append(stats)
                    acc = grads if acc is None else self._add(acc, grads)
                if c.grpo.grad_accum > 1:
                    acc = self._scale(acc, 1.0 / c.grpo.grad_accum)
                self.params, self.opt_state, norm = self._apply(self.params, self.opt_state, acc)
                norms.append(norm)
        stats = jax.device_get(jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *stats_list))
        if old_logp is None:  # on-policy: the update's one pass scored the policy before the update
            old_logp = np.zeros_like(rollout.logprobs)
            for rows, logp in jax.device_get(update_logp):
                old_logp[self._sample_rows(rows, g)] = logp
        t_update = time.perf_counter()
        self.step += 1

        mask = rollout.mask
        generated = int(mask.sum())
        metrics = {
            "loss": float(stats["loss"]),
            "pg_loss": float(stats.get("pg_loss", np.nan)),
            "reward_mean": float(reward.mean()),
            "reward_std": float(reward.std()),
            **reward_stats,
            "response_length_mean": float(rollout.lengths.mean()),
            "response_length_max": int(rollout.lengths.max()),
            "truncated_fraction": float(rollout.truncated.mean()),
            "kl": float(stats.get("kl", 0.0)),
            "clip_fraction": float(stats.get("clip_fraction", 0.0)),
            "entropy": float(stats["entropy"]),
            "grad_norm": float(np.mean(jax.device_get(norms))),
            "sampler_logprob_diff": float(np.abs(old_logp - rollout.logprobs)[mask].mean())
            if generated
            else 0.0,
            "groups_kept": float(keep.reshape(-1, g).any(-1).mean()),
            "advantage_abs_mean": float(np.abs(adv).mean()),
            "tokens_per_s": generated / (t_sample - t0),
            "time_sample_s": t_sample - t0,
            "time_score_s": t_score - t_sample,
            "time_update_s": t_update - t_score,
            "time_step_s": t_update - t0,
        }
        metrics.update({k: float(v) for k, v in adv_stats.items() if np.ndim(v) == 0} if adv_stats else {})
        return metrics

    def _micro_batch(self, batch, rollout: Rollout, rows, old_logp, ref_logp, adv, keep, g) -> UpdateBatch:
        sub = slice_prompts(batch, rows)
        prompts = batch_inputs(self.model_config, sub)
        sample_rows = self._sample_rows(rows, g)
        sub_rollout = dataclasses.replace(
            rollout,
            tokens=rollout.tokens[sample_rows],
            logprobs=rollout.logprobs[sample_rows],
            mask=rollout.mask[sample_rows],
            lengths=rollout.lengths[sample_rows],
            truncated=rollout.truncated[sample_rows],
        )
        scored = score_batch(prompts, sub_rollout)
        return UpdateBatch(
            prompts=prompts,
            scored=scored,
            old_logp=None if old_logp is None else old_logp[sample_rows],
            ref_logp=None if ref_logp is None else ref_logp[sample_rows],
            advantages=adv[sample_rows].astype(np.float32),
            sample_mask=keep[sample_rows],
        )

    @staticmethod
    def _sample_rows(prompt_rows: np.ndarray, g: int) -> np.ndarray:
        return (prompt_rows[:, None] * g + np.arange(g)[None, :]).reshape(-1)

    # -- evaluation ------------------------------------------------------------------------------------
    def periodic_metrics(self) -> dict[str, float]:
        """``blind_eval.every``: greedy answers on a fixed validation slice with and without its images.
        ``blind_accuracy`` near ``blind_slice_accuracy`` means the policy answers from the text alone
        (a shortcut); on a set without shortcuts it stays at chance while the other rises."""
        b = self.config.blind_eval
        if not b.every or self.step % b.every:
            return {}
        seen = self.evaluate(b.examples)
        blind = self.evaluate(b.examples, drop_images=True)
        return {
            "blind_accuracy": blind["accuracy"],
            "blind_format_rate": blind["format_rate"],
            "blind_slice_accuracy": seen["accuracy"],
        }

    def evaluate(self, n: int | None = None, *, split: str | None = None, drop_images: bool = False) -> dict:
        """Greedy accuracy / format rate on the first ``n`` examples of the validation split (gathered over
        processes: the same figures on every process)."""
        source = dataset_source(self.config.data, self.workdir, split or self.config.data.val_split)
        return greedy_eval(
            self.eval_sampler,
            self.params,
            source,
            self.encoder,
            self.pipeline_config,
            n,
            drop_images=drop_images,
        )

    # -- checkpoints -------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "opt_state": self.opt_state,
            "step": replicated(np.asarray(self.step, np.int32), self.mesh),
            "rng": self.rng,
        }

    def save(self, *, force: bool = False, metrics: Mapping[str, Any] | None = None) -> bool:
        meta = {"config": to_dict(self.config), "metrics": dict(metrics or {})}
        return self.checkpointer.save(self.step, self._state(), self.data_iter.get_state(), meta, force=force)

    def _restore(self) -> None:
        restored = self.checkpointer.restore_latest(abstract_like(self._state()))
        if restored is None:
            return
        state = restored.state
        self.params, self.opt_state, self.rng = state["params"], state["opt_state"], state["rng"]
        self.step = int(state["step"])
        self.data_iter.set_state(restored.data_state)


def run_grpo(config: GRPOConfig, workdir: str | Path, *, resume: bool = False) -> int:
    return GRPOTrainer(config, workdir, resume=resume).train()


__all__ = ["GRPOTrainer", "run_grpo", "slice_prompts"]
