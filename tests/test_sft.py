"""SFT: teacher-forced targets, LoRA on the attention projections, and the export GRPO starts from."""

from __future__ import annotations

import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from scalereasoner_jax.config import load_config
from scalereasoner_jax.train.sft import FORMAT_ONLY_THOUGHT, SFTTrainer, target_text


def test_targets():
    rng = np.random.default_rng(0)
    ex = {"answer": "C", "options": "ABCD", "rationale": "Glands at 10x; large nuclei at 200x."}
    assert target_text(ex, "rationale", rng) == f"<think>{ex['rationale']}</think><answer>C</answer>"
    letters = {target_text(ex, "format_only", rng)[-10] for _ in range(200)}
    assert letters == set("ABCD")  # the letter is drawn, not the key
    assert FORMAT_ONLY_THOUGHT in target_text(ex, "format_only", rng)


def test_lora_trains_only_adapters_and_export_merges_them(tmp_path):
    config = load_config(
        "sft_tiny_cpu",
        [
            "data.synthetic.n=60",
            "sft.batch_size=4",
            "sft.lora_rank=4",
            "sft.lora_alpha=8",
            "train.steps=3",
            "train.eval_every=0",
            "train.tensorboard=false",
            "checkpoint.every=0",
            "optim.lr=1e-2",
        ],
        kind="sft",
    )
    trainer = SFTTrainer(config, tmp_path)
    base = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(trainer.base)}
    losses = [trainer.train_step()["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]
    assert set(trainer.trainable) and all(
        name.split("/")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for name in trainer.trainable
    )
    # The frozen base is untouched; the merged weights differ exactly on the adapted kernels.
    merged = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(trainer.params())}
    still = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(trainer.base)}
    for path, value in base.items():
        assert np.array_equal(still[path], value), path
        adapted = path[0] == "language_model" and path[-1] == "kernel" and path[-2] in ("q_proj", "o_proj")
        if adapted:
            assert not np.array_equal(merged[path], value), path
        elif path[-2] not in ("k_proj", "v_proj"):
            assert np.array_equal(merged[path], value), path
    out = trainer.export()
    tensors = {}
    for f in out.glob("model-*.safetensors"):
        tensors.update(load_file(str(f)))
    np.testing.assert_array_equal(
        tensors["model.layers.0.self_attn.q_proj.weight"],
        merged[("language_model", "layers", 0, "self_attn", "q_proj", "kernel")].T,
    )
    trainer.close()
