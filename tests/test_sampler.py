"""The jitted sampler against transformers `generate`, and its log-probs against the trainer's."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from scalereasoner_jax.kernels import packed_matmul
from scalereasoner_jax.models.qwen2_5_vl import from_pretrained, prepare_inputs
from scalereasoner_jax.models.qwen2_5_vl.vision import VisionTower
from scalereasoner_jax.rl.sampler import Sampler, SamplingConfig, stop_token_sequences
from scalereasoner_jax.rl.scoring import completion_logprobs, score_batch


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def setup(tiny_hf_dir):
    processor = AutoProcessor.from_pretrained(str(tiny_hf_dir))
    conversations = [
        (
            [{"type": "image"}, {"type": "text", "text": "Describe the low power view."}],
            _images([(84, 112)], 1),
        ),
        (
            [{"type": "image"}] * 3 + [{"type": "text", "text": "Which option fits all three scales?"}],
            _images([(56, 56), (112, 84), (140, 140)], 2),
        ),
    ]
    texts = [
        processor.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
        for c, _ in conversations
    ]
    images = [img for _, imgs in conversations for img in imgs]
    inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch should be left-padded"
    return processor, inputs, from_pretrained(tiny_hf_dir)


def _config(processor, **kw):
    tok = processor.tokenizer
    return SamplingConfig(
        eos_token_ids=(tok.convert_tokens_to_ids("<|im_end|>"),), pad_token_id=tok.pad_token_id, **kw
    )


def test_greedy_equals_transformers_generate(tiny_hf_dir, setup):
    processor, inputs, model = setup
    config = _config(processor, max_new_tokens=16, greedy=True)
    hf = AutoModelForImageTextToText.from_pretrained(str(tiny_hf_dir)).eval()
    with torch.no_grad():
        out = hf.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=16,
            eos_token_id=list(config.eos_token_ids),
            pad_token_id=config.pad_token_id,
        )
    ref = out[:, inputs["input_ids"].shape[1] :].numpy()

    batch = {k: v.numpy() for k, v in inputs.items()}
    rollout = Sampler(model, config).generate(nnx.state(model), batch, group_size=1, key=jax.random.key(0))
    for row in range(ref.shape[0]):
        n = rollout.lengths[row]
        np.testing.assert_array_equal(rollout.tokens[row, :n], ref[row, :n])
        # transformers pads after EOS; so do we
        assert (rollout.tokens[row, n:] == config.pad_token_id).all()
        assert (ref[row, n:] == config.pad_token_id).all() or n == ref.shape[1]


def test_sampled_logprobs_equal_recomputed_logprobs(setup):
    processor, inputs, model = setup
    config = _config(processor, max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.95)
    batch = {k: v.numpy() for k, v in inputs.items()}
    sampler = Sampler(model, config)
    state = nnx.state(model)
    rollout = sampler.generate(state, batch, group_size=3, key=jax.random.key(1))
    assert rollout.tokens.shape == (6, 10)
    # The three samples of a prompt differ (the cache is shared, the draws are not).
    assert len({tuple(r) for r in rollout.tokens[:3]}) > 1

    prompts = prepare_inputs(
        model.config,
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["image_grid_thw"],
    )
    features = model.image_features(prompts)
    scored = score_batch(prompts, rollout)
    logp, entropy = completion_logprobs(model, scored, features, temperature=0.7)
    np.testing.assert_allclose(np.asarray(logp)[rollout.mask], rollout.logprobs[rollout.mask], atol=1e-5)
    assert (np.asarray(entropy)[rollout.mask] > 0).all()


def test_vision_tower_runs_once_per_prompt(setup, monkeypatch):
    processor, inputs, model = setup
    calls = []
    original = VisionTower.__call__

    def counted(self, pixel_values, layout):
        jax.debug.callback(lambda n: calls.append(int(n)), pixel_values.shape[0])
        return original(self, pixel_values, layout)

    monkeypatch.setattr(VisionTower, "__call__", counted)
    config = _config(processor, max_new_tokens=4)
    sampler = Sampler(model, config)
    batch = {k: v.numpy() for k, v in inputs.items()}
    for seed in range(2):
        sampler.generate(nnx.state(model), batch, group_size=5, key=jax.random.key(seed))
    n_patches = batch["pixel_values"].shape[0]
    assert calls == [n_patches, n_patches]  # one encoder pass over the 4 images per generate, not 5x


def test_stop_strings_end_a_completion(setup):
    processor, inputs, model = setup
    tok = processor.tokenizer
    stops = stop_token_sequences(tok, ["</answer>"])
    assert stops and all(len(s) >= 1 for s in stops)
    # Use the model's own greedy continuation as the stop sequence: the completion must end right there.
    batch = {k: v.numpy() for k, v in inputs.items()}
    greedy = Sampler(model, _config(processor, max_new_tokens=6, greedy=True))
    first = greedy.generate(nnx.state(model), batch, group_size=1, key=jax.random.key(0))
    seq = tuple(int(t) for t in first.tokens[0, 1:3])
    stopped = Sampler(model, _config(processor, max_new_tokens=6, greedy=True, stop_sequences=(seq,)))
    out = stopped.generate(nnx.state(model), batch, group_size=1, key=jax.random.key(0))
    assert out.lengths[0] == 3 and not out.truncated[0]
    assert (out.tokens[0, 3:] == tok.pad_token_id).all()


def test_cpu_kernel_decoding_matches_xla_dot(setup):
    processor, inputs, model = setup
    batch = {k: v.numpy() for k, v in inputs.items()}
    state = nnx.state(model)
    # The tiny model's weights are below the default size for the kernel; take every one here.
    config = _config(processor, max_new_tokens=8, temperature=0.9, cpu_kernel_min_bytes=0)
    packed = Sampler(model, config)
    assert not Sampler(model, _config(processor, max_new_tokens=8)).uses_cpu_kernel(nnx.state(model))
    plain = Sampler(model, dataclasses.replace(config, cpu_kernel=False))
    assert packed.uses_cpu_kernel(state) == packed_matmul.available() and not plain.uses_cpu_kernel(state)
    a = packed.generate(state, batch, group_size=3, key=jax.random.key(5))
    b = plain.generate(state, batch, group_size=3, key=jax.random.key(5))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    # The second call packs into the first call's panels: same draws, bit for bit.
    again = packed.generate(state, batch, group_size=3, key=jax.random.key(5))
    np.testing.assert_array_equal(again.tokens, a.tokens)
    np.testing.assert_array_equal(again.logprobs, a.logprobs)


def test_a_model_on_several_devices_keeps_xla_dot(setup):
    processor, _, model = setup
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    state = jax.device_put(nnx.state(model), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert jax.device_count() > 1 and not Sampler(
        model, _config(processor, max_new_tokens=2)
    ).uses_cpu_kernel(state)
