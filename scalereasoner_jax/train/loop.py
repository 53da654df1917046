"""The outer loop GRPO and SFT share: steps, periodic evaluation, metrics, checkpoints, preemption."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from scalereasoner_jax.parallel import initialize, replicated
from scalereasoner_jax.train.checkpoint import (
    PREEMPTED_EXIT_CODE,
    Checkpointer,
    PreemptionGuard,
    checkpoint_path,
)
from scalereasoner_jax.train.metrics import MetricsWriter
from scalereasoner_jax.train.setup import load_model, model_dir, prompt_encoder


def abstract_like(tree: Any) -> Any:
    """Restore targets (shape, dtype and sharding) for the arrays of ``tree``."""
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if hasattr(x, "sharding") else x
        ),
        tree,
    )


class Learner:
    """Subclasses provide ``train_step() -> metrics``, ``evaluate(n) -> {"accuracy", "format_rate"}``,
    ``save(force=, metrics=)``, and set ``config``, ``step``, ``metrics`` (a MetricsWriter) and
    ``checkpointer`` (a Checkpointer)."""

    config: Any
    step: int
    metrics: MetricsWriter
    checkpointer: Checkpointer

    def train_step(self) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self, n: int | None = None) -> dict[str, float]:
        raise NotImplementedError

    def save(self, *, force: bool = False, metrics: Mapping[str, Any] | None = None) -> bool:
        raise NotImplementedError

    def prepare(self, config: Any, workdir: str | Path) -> nnx.State:
        """What every learner sets up first: processes joined, the workdir, the starting HF folder, the
        sharded model (split into ``graphdef`` and the returned parameters) and the prompt encoder."""
        initialize()
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hf_dir = model_dir(config.model, self.workdir, seed=config.train.seed)
        model, self.mesh = load_model(config.model, self.hf_dir, config.mesh)
        self.model_config = model.config
        self.graphdef, params = nnx.split(model)
        self.encoder = prompt_encoder(config.model, self.hf_dir)
        return params

    def _on_mesh(self, x: jax.Array) -> jax.Array:
        """``x`` itself if it lives on the mesh, else replicated over it: single-device arrays (what jit
        leaves for scalars such as AdamW's step count) cannot be saved collectively from several hosts."""
        sharding = x.sharding
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == self.mesh:
            return x
        return replicated(x, self.mesh)

    def _restore(self) -> None:
        """Load the newest usable checkpoint into the learner's state (nothing if there is none)."""
        raise NotImplementedError

    def start(self, workdir: Path, *, resume: bool, desc: str) -> None:
        """Checkpoints (restored from when ``resume``), then the metrics writer from the restored step."""
        c = self.config
        out = checkpoint_path(workdir)  # a gs:// workdir stays one (pathlib would collapse it to gs:/)
        self.checkpointer = Checkpointer(
            out / "checkpoints",
            every=c.checkpoint.every,
            keep=c.checkpoint.keep,
            async_save=c.checkpoint.async_save,
        )
        if resume:
            self._restore()
        self.metrics = MetricsWriter(
            out,
            tensorboard=c.train.tensorboard,
            total_steps=c.train.steps,
            desc=desc,
            resume_step=self.step,
        )

    def periodic_metrics(self) -> dict[str, float]:
        """Extra figures a learner adds at some steps (GRPO: the blind evaluation)."""
        return {}

    def on_finish(self) -> None:
        """Called once after the last step (e.g. SFT exports its weights)."""

    def train(self) -> int:
        """Run to ``train.steps``; returns the exit code (PREEMPTED_EXIT_CODE after a SIGTERM)."""
        c = self.config
        with PreemptionGuard() as guard:
            while self.step < c.train.steps:
                try:
                    metrics = self.train_step()
                except StopIteration:  # a finite data pipeline (e.g. sft.epochs) ran out
                    break
                if c.train.eval_every and self.step % c.train.eval_every == 0:
                    ev = self.evaluate(c.train.eval_examples)
                    metrics.update({"val_accuracy": ev["accuracy"], "val_format_rate": ev["format_rate"]})
                metrics.update(self.periodic_metrics())
                self.metrics.write(self.step, metrics)
                self.save(metrics=metrics, force=self.step == c.train.steps)
                if guard.should_stop():
                    self.save(force=True, metrics=metrics)
                    self.checkpointer.wait()
                    self.close()
                    return PREEMPTED_EXIT_CODE
        self.checkpointer.wait()
        self.on_finish()
        self.close()
        return 0

    def close(self) -> None:
        self.metrics.close()
        self.checkpointer.close()
