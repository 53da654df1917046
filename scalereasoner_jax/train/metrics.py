"""Per-step metrics: ``WORKDIR/metrics.jsonl`` (one JSON object per step), TensorBoard event files and a
console progress bar. Only process 0 writes. ``WORKDIR`` may be ``gs://...`` (through etils' epath, which
reaches GCS with TensorFlow's file system); TensorBoard then needs ``google-cloud-storage`` and is
skipped with a warning without it."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath

from scalereasoner_jax.train.checkpoint import checkpoint_path

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | jax.Array) or hasattr(value, "item"):
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    def __init__(
        self,
        workdir: str | Path | epath.Path,
        *,
        tensorboard: bool = True,
        total_steps: int | None = None,
        desc: str = "train",
        resume_step: int = 0,
    ):
        self.active = jax.process_index() == 0
        out = checkpoint_path(workdir)  # local (made absolute) or a URL, kept whole
        self.path = out / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step:
            self._truncate_after(resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            try:
                self._tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError as e:  # gs:// without google-cloud-storage: metrics.jsonl has everything
                log.warning("no TensorBoard events in %s (%s); metrics.jsonl has the same figures", out, e)
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=resume_step, desc=desc, dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the restored checkpoint (they will be redone)."""
        if not self.path.is_file():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._bar is not None:
            self._bar.update(1)
            shown = {k: record[k] for k in ("loss", "reward_mean", "accuracy", "kl") if k in record}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if isinstance(v, int | float)})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
