"""AdamW with global-norm clipping and a learning-rate schedule, from the ``optim`` config section."""

from __future__ import annotations

from typing import Any

import optax


def make_optimizer(optim: Any, total_steps: int) -> optax.GradientTransformation:
    """``optim`` has lr, weight_decay, clip_norm, b1, b2, eps, warmup_steps, schedule."""
    if optim.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, optim.lr, max(optim.warmup_steps, 1), max(total_steps, optim.warmup_steps + 1)
        )
    elif optim.warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, optim.lr, optim.warmup_steps), optax.constant_schedule(optim.lr)],
            [optim.warmup_steps],
        )
    else:
        schedule = optax.constant_schedule(optim.lr)
    return optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
    )
