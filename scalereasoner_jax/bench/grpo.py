"""``scalereasoner bench grpo``: time per GRPO step, split into sample / score / update, and tokens/s,
for the tiny CPU preset and the "small" (about 100M) configuration on the same synthetic data."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from scalereasoner_jax.bench.rollout import CONFIGS


def run(configs: tuple[str, ...] = ("tiny", "small"), steps: int = 5, out_json: str | None = None) -> dict:
    from scalereasoner_jax.config import load_config
    from scalereasoner_jax.rl.trainer import GRPOTrainer

    results = {}
    for name in configs:
        overrides = [
            f"train.steps={steps}",
            "train.eval_every=0",
            "train.tensorboard=false",
            "checkpoint.every=0",
            "data.synthetic.n=100",
            "rollout.max_new_tokens=32",
            "rollout.prompts_per_step=8",
            "rollout.group_size=4",
        ]
        tiny = CONFIGS[name]
        if tiny["text_config"]:
            # ~70M parameters: the backward of 32 rows x 800 tokens needs remat and micro-batches in 24 GiB.
            overrides += ["model.tiny=" + json.dumps(tiny), "model.remat=full", "grpo.grad_accum=4"]
        config = load_config("grpo_tiny_cpu", overrides, kind="grpo")
        with tempfile.TemporaryDirectory() as tmp:
            trainer = GRPOTrainer(config, tmp)
            n_params = sum(x.size for x in __import__("jax").tree.leaves(trainer.params))
            rows = [trainer.train_step() for _ in range(steps)]
            trainer.close()
        timed = rows[1:]  # the first step compiles

        def med(key: str, timed=timed) -> float:
            return statistics.median(r[key] for r in timed)

        results[name] = {
            "parameters": int(n_params),
            "prompts_x_group": "8 x 4",
            "max_new_tokens": 32,
            "first_step_s": rows[0]["time_step_s"],
            "step_s": med("time_step_s"),
            "sample_s": med("time_sample_s"),
            "score_s": med("time_score_s"),
            "update_s": med("time_update_s"),
            "sample_tokens_per_s": med("tokens_per_s"),
            "steps_timed": len(timed),
        }
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_result(results: dict) -> str:
    head = ("config", "params", "step", "sample", "score", "update", "gen tok/s", "1st step")
    lines = ["".join(f"{h:>11}" for h in head)]
    for name, r in results.items():
        cells = (
            name,
            f"{r['parameters'] / 1e6:.1f}M",
            *(f"{r[k]:.2f}s" for k in ("step_s", "sample_s", "score_s", "update_s")),
            f"{r['sample_tokens_per_s']:.0f}",
            f"{r['first_step_s']:.1f}s",
        )
        lines.append("".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)
