"""Supervised fine-tuning on the same infrastructure as GRPO: teacher-forced next-token loss on the
assistant turn, full fine-tuning or LoRA on the language model's attention projections.

Targets (``sft.target``):
- ``rationale``: ``<think>{rationale}</think><answer>{key}</answer>``, the paper's SFT baseline;
- ``format_only``: ``<think>{a fixed sentence}</think><answer>{a random option letter}</answer>``: teaches
  the answer format and nothing about the task (the letter is drawn independently of the key), which
  is the warm start GRPO needs before its format reward can bite.

LoRA is functional: the trainable state is only the low-rank factors, and the forward sees
``kernel + A @ B * alpha / rank`` for every targeted projection. The export merges them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scalereasoner_jax.config import SFTConfig, to_dict
from scalereasoner_jax.data.pipeline import PipelineConfig, make_dataset
from scalereasoner_jax.models.qwen2_5_vl import save_pretrained
from scalereasoner_jax.models.qwen2_5_vl.model import batch_inputs
from scalereasoner_jax.parallel import replicated
from scalereasoner_jax.rl.sampler import Rollout, Sampler, SamplingConfig
from scalereasoner_jax.rl.scoring import completion_logprobs, score_batch
from scalereasoner_jax.train.evaluate import greedy_eval
from scalereasoner_jax.train.loop import Learner, abstract_like
from scalereasoner_jax.train.optimizer import make_optimizer
from scalereasoner_jax.train.setup import dataset_source

FORMAT_ONLY_THOUGHT = "I compare the views."  # short: the tiny CPU runs generate few tokens


def target_text(example: Mapping[str, Any], mode: str, rng: np.random.Generator) -> str:
    if mode == "format_only":
        letter = str(rng.choice(list(str(example["options"]))))
        return f"<think>{FORMAT_ONLY_THOUGHT}</think><answer>{letter}</answer>"
    return f"<think>{example['rationale']}</think><answer>{example['answer']}</answer>"


def lora_paths(params: nnx.State, targets: tuple[str, ...]) -> list[tuple]:
    """Kernel paths of the language model's projections named in ``targets``."""
    return [
        path
        for path, _ in nnx.to_flat_state(params)
        if path[0] == "language_model" and path[-1] == "kernel" and path[-2] in targets
    ]


def init_lora(params: nnx.State, paths: list[tuple], rank: int, key: jax.Array) -> dict[str, dict]:
    flat = dict(nnx.to_flat_state(params))
    out = {}
    for i, path in enumerate(paths):
        d_in, d_out = flat[path].shape
        a = jax.random.normal(jax.random.fold_in(key, i), (d_in, rank), jnp.float32) / np.sqrt(d_in)
        out["/".join(map(str, path))] = {"a": a, "b": jnp.zeros((rank, d_out), jnp.float32)}
    return out


def merge_lora(params: nnx.State, lora: Mapping[str, Mapping[str, jax.Array]], scale: float) -> nnx.State:
    """``params`` with every adapted kernel replaced by ``kernel + a @ b * scale``."""
    flat = dict(nnx.to_flat_state(params))
    for name, ab in lora.items():
        path = tuple(int(p) if p.isdigit() else p for p in name.split("/"))
        var = flat[path]
        kernel = var.get_value()
        flat[path] = var.replace((kernel + (ab["a"] @ ab["b"]) * scale).astype(kernel.dtype))
    return nnx.from_flat_state(list(flat.items()))


class SFTTrainer(Learner):
    def __init__(self, config: SFTConfig, workdir: str | Path, *, resume: bool = False):
        c = config
        self.base = self.prepare(config, workdir)
        tok = self.encoder.tokenizer
        self.end_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tok.pad_token_id

        self.lora_scale = c.sft.lora_alpha / max(c.sft.lora_rank, 1)
        # Global (mesh-replicated) arrays: checkpoints are saved collectively from every host.
        self.rng = replicated(jax.random.key(c.train.seed), self.mesh)
        if c.sft.lora_rank:
            paths = lora_paths(self.base, tuple(c.sft.lora_targets))
            if not paths:
                raise ValueError(f"sft.lora_targets {list(c.sft.lora_targets)} match no projection")
            self.rng, key = jax.random.split(self.rng)
            lora = init_lora(self.base, paths, c.sft.lora_rank, key)
            self.trainable = jax.tree.map(self._on_mesh, lora)
        else:
            self.trainable = self.base
        self.tx = make_optimizer(c.optim, c.train.steps)
        self.opt_state = jax.tree.map(self._on_mesh, jax.jit(self.tx.init)(self.trainable))

        n_proc = jax.process_count()
        if c.sft.batch_size % n_proc:
            raise ValueError(f"sft.batch_size={c.sft.batch_size} must divide by {n_proc} processes")
        self.pipeline_config = PipelineConfig(
            batch_size=c.sft.batch_size // n_proc,
            seed=c.data.seed,
            num_epochs=c.sft.epochs,
            length_buckets=tuple(c.data.length_buckets),
            shuffle_options=c.data.shuffle_options,
            worker_count=c.data.worker_count,
        )
        source = dataset_source(c.data, self.workdir, c.data.train_split)
        self.data_iter = iter(make_dataset(source, self.encoder, self.pipeline_config))
        self.target_rng = np.random.default_rng(c.train.seed + 17)
        self.step = 0
        self._jit()
        self.start(self.workdir, resume=resume, desc="sft")

    def params(self) -> nnx.State:
        """The model's parameters as trained so far (LoRA merged)."""
        if self.config.sft.lora_rank:
            return merge_lora(self.base, self.trainable, self.lora_scale)
        return self.trainable

    def _jit(self) -> None:
        graphdef, lora, scale = self.graphdef, bool(self.config.sft.lora_rank), self.lora_scale

        def loss_fn(trainable, base, prompts, scored):
            params = merge_lora(base, trainable, scale) if lora else trainable
            model = nnx.merge(graphdef, params)
            logp, _ = completion_logprobs(model, scored, model.image_features(prompts))
            n = jnp.maximum(jnp.sum(scored.mask), 1.0)
            return -jnp.sum(logp) / n, {"target_logprob": jnp.sum(logp) / n}

        def step(trainable, opt_state, base, prompts, scored):
            # ``base`` is an argument, not a closure: closed-over arrays would be baked into the program.
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, base, prompts, scored)
            norm = optax.global_norm(grads)
            updates, opt_state = self.tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss, norm

        # Outputs keep the inputs' shardings: left to XLA they drift, and everything taking them recompiles.
        shardings = jax.tree.map(lambda x: x.sharding, (self.trainable, self.opt_state))
        scalar = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._step = jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, scalar, scalar))

    def _targets(self, batch: Mapping[str, Any]) -> Rollout:
        """Tokenised targets, right-padded, with ``<|im_end|>`` closing each; shaped like a rollout."""
        tok, c = self.encoder.tokenizer, self.config.sft
        rows = []
        for i in range(len(batch["answer"])):
            example = {k: str(batch[k][i]) for k in ("answer", "options", "rationale")}
            ids = tok.encode(target_text(example, c.target, self.target_rng), add_special_tokens=False)
            rows.append([*ids, self.end_id][: c.max_target_tokens])
        length = c.max_target_tokens
        tokens = np.full((len(rows), length), self.pad_id, np.int32)
        for r, ids in enumerate(rows):
            tokens[r, : len(ids)] = ids
        lengths = np.array([len(ids) for ids in rows], np.int32)
        mask = np.arange(length)[None, :] < lengths[:, None]
        return Rollout(
            tokens=tokens,
            logprobs=np.zeros(tokens.shape, np.float32),
            mask=mask,
            lengths=lengths,
            truncated=np.zeros(len(rows), bool),
            group_size=1,
        )

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = next(self.data_iter)
        target = self._targets(batch)
        prompts = batch_inputs(self.model_config, batch)
        scored = score_batch(prompts, target)
        base = self.base if self.config.sft.lora_rank else None  # full fine-tuning: trainable is the base
        self.trainable, self.opt_state, loss, norm = self._step(
            self.trainable, self.opt_state, base, prompts, scored
        )
        loss, norm = float(loss), float(norm)
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = int(target.mask.sum())
        return {
            "loss": loss,
            "grad_norm": norm,
            "target_tokens": tokens,
            "tokens_per_s": tokens / dt,
            "time_step_s": dt,
        }

    def _state(self) -> dict[str, Any]:
        return {
            "trainable": self.trainable,
            "opt_state": self.opt_state,
            "step": replicated(np.asarray(self.step, np.int32), self.mesh),
            "rng": self.rng,
        }

    def _restore(self) -> None:
        restored = self.checkpointer.restore_latest(abstract_like(self._state()))
        if restored is None:
            return
        s = restored.state
        self.trainable, self.opt_state, self.rng, self.step = (
            s["trainable"],
            s["opt_state"],
            s["rng"],
            int(s["step"]),
        )
        self.data_iter.set_state(restored.data_state["iterator"])
        self.target_rng.bit_generator.state = restored.data_state["target_rng"]

    def save(self, *, force: bool = False, metrics: Mapping[str, Any] | None = None) -> bool:
        data = {"iterator": self.data_iter.get_state(), "target_rng": self.target_rng.bit_generator.state}
        meta = {"config": to_dict(self.config), "metrics": dict(metrics or {})}
        return self.checkpointer.save(self.step, self._state(), data, meta, force=force)

    def evaluate(self, n: int | None = None) -> dict[str, float]:
        tok = self.encoder.tokenizer
        sampler = Sampler(
            nnx.merge(self.graphdef, self.base),
            SamplingConfig(
                max_new_tokens=self.config.sft.max_target_tokens,
                eos_token_ids=(self.end_id,),
                pad_token_id=tok.pad_token_id,
                greedy=True,
            ),
        )
        source = dataset_source(self.config.data, self.workdir, self.config.data.val_split)
        return greedy_eval(sampler, self.params(), source, self.encoder, self.pipeline_config, n)

    def export(self) -> Path:
        """An HF folder of the current weights (LoRA merged), e.g. for GRPO's ``model.hf_dir``."""
        model = nnx.merge(self.graphdef, self.params())
        return save_pretrained(model, self.workdir / "hf", reference_dir=self.hf_dir)

    def on_finish(self) -> None:
        self.export()


def run_sft(config: SFTConfig, workdir: str | Path, *, resume: bool = False) -> int:
    return SFTTrainer(config, workdir, resume=resume).train()
