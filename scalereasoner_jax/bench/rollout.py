"""``scalereasoner bench rollout``: our group sampler against transformers ``generate``.

Same model weights, same B prompts with 3 images each, G samples per prompt, the same number of new
tokens for every sequence (EOS disabled on both sides so the work is identical), temperature 1.0,
both in ``dtype`` (float32 by default) on this CPU; in a float32 comparison ours is also timed with bf16
weights and compute, and, where ours decodes with the packed CPU matmul, also with XLA's dot instead.
transformers expands every prompt and its images G times (so its vision tower runs B*G times); ours
prefills each prompt once and shares the cache.

Each side is also timed with a single new token: its prompt part (vision tower, prefill, first token).
The rest is decoding. Sharing makes the prompt part at most G times cheaper; decoding streams the
weights once per step on both sides, so the total ratio stays below G unless decoding is also faster.
After a warm-up call each, the timed runs alternate between all of these; each figure is a median.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from scalereasoner_jax.bench.forward import SMALL_CONFIG

_TEXT_DIMS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rope_parameters",
)
_VISION_DIMS = (
    "depth",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "out_hidden_size",
    "fullatt_block_indexes",
)
# Overrides of the tiny test model: "small" takes the forward benchmark's dimensions (its own vocabulary).
CONFIGS = {
    "tiny": {"text_config": {}, "vision_config": {}},
    "small": {
        "text_config": {k: SMALL_CONFIG["text_config"][k] for k in _TEXT_DIMS},
        "vision_config": {k: SMALL_CONFIG["vision_config"][k] for k in _VISION_DIMS},
    },
}


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_time(fn, runs: int) -> float:
    return statistics.median(_seconds(fn) for _ in range(runs))


def run(
    config: str = "tiny",
    prompts: int = 2,
    group_size: int = 5,
    max_new_tokens: int = 32,
    image_side: int = 224,
    runs: int = 3,
    dtype: str = "float32",
    out_json: str | None = None,
) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from scalereasoner_jax.models.qwen2_5_vl import from_pretrained
    from scalereasoner_jax.models.qwen2_5_vl.model import batch_inputs
    from scalereasoner_jax.models.qwen2_5_vl.tiny import make_tiny_hf_model
    from scalereasoner_jax.rl.sampler import Sampler, SamplingConfig

    with tempfile.TemporaryDirectory() as tmp:
        overrides = CONFIGS[config]
        hf_dir = make_tiny_hf_model(
            Path(tmp) / config,
            seed=0,
            text_overrides=overrides["text_config"] or None,
            vision_overrides=overrides["vision_config"] or None,
            min_pixels=56 * 56,
            max_pixels=image_side * image_side,
        )
        processor = AutoProcessor.from_pretrained(str(hf_dir))
        hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=getattr(torch, dtype)).eval()
        # Ours in the same dtype as transformers, and also with bf16 weights and compute (the precision
        # the TPU recipe samples in) where the comparison runs in float32.
        our_dtypes = [dtype] + (["bfloat16"] if dtype == "float32" else [])
        models = {d: from_pretrained(hf_dir, dtype=getattr(jnp, d)) for d in our_dtypes}
    states = {d: nnx.state(m) for d, m in models.items()}
    # Each of ours as (dtype, packed CPU kernel for decoding); with the kernel in use, also without it,
    # so that its share of the speed-up is measured side by side.
    variants = {d: (d, True) for d in our_dtypes}
    probe = Sampler(models[dtype], SamplingConfig(max_new_tokens=1, eos_token_ids=(), pad_token_id=0))
    if probe.uses_cpu_kernel(states[dtype]):
        variants = {dtype: (dtype, True), f"{dtype}, XLA dot": (dtype, False), **variants}
    n_params = sum(p.numel() for p in hf.parameters())
    rng = np.random.default_rng(0)
    content = [{"type": "image"}] * 3 + [
        {"type": "text", "text": "Which option fits the low, mid and high views?"}
    ]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [
        Image.fromarray(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8))
        for _ in range(3 * prompts)
    ]
    inputs = processor(
        text=[text] * prompts, images=images, padding=True, padding_side="left", return_tensors="pt"
    )
    batch = {k: v.numpy() for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))
    pad = processor.tokenizer.pad_token_id

    def hf_generate(new_tokens: int = max_new_tokens):
        with torch.no_grad():
            out = hf.generate(
                **inputs,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                num_return_sequences=group_size,
                pad_token_id=pad,
            )
        assert out.shape == (prompts * group_size, inputs["input_ids"].shape[1] + new_tokens)

    keys = iter(jax.random.split(jax.random.key(0), 10_000))

    def our_generator(variant: str, count: int):
        our_dtype, cpu_kernel = variants[variant]
        config = SamplingConfig(
            max_new_tokens=count, eos_token_ids=(), pad_token_id=pad, cpu_kernel=cpu_kernel
        )
        sampler = Sampler(models[our_dtype], config)

        def our_generate():
            rollout = sampler.generate(states[our_dtype], batch, group_size, next(keys))
            assert int(rollout.lengths.min()) == count

        return our_generate, sampler

    # Every contestant is warmed up (compiled) first; then the runs alternate between them, so that
    # the machine's slow and fast spells fall on all of them alike.
    contestants = {("transformers", max_new_tokens): hf_generate, ("transformers", 1): lambda: hf_generate(1)}
    samplers = {}
    for variant in variants:
        for count in (max_new_tokens, 1):
            contestants[(variant, count)], samplers[(variant, count)] = our_generator(variant, count)
    compile_s = {name: _seconds(fn) for name, fn in contestants.items()}
    times = {name: [] for name in contestants}
    for _ in range(runs):
        for name, fn in contestants.items():
            # torch's and XLA's worker threads spin for a while after a call; let them settle so that
            # they do not slow whichever contestant comes next (a third of a tiny call otherwise).
            time.sleep(0.1)
            times[name].append(_seconds(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    hf_s, hf_prompt_s = median[("transformers", max_new_tokens)], median[("transformers", 1)]
    new_tokens = prompts * group_size * max_new_tokens
    result = {
        "config": config,
        "dtype": dtype,
        "parameters": int(n_params),
        "prompts": prompts,
        "group_size": group_size,
        "images_per_prompt": 3,
        "image_side": image_side,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "max_new_tokens": max_new_tokens,
        "runs": runs,
        "transformers_s": hf_s,
        "transformers_prompt_s": hf_prompt_s,
        "transformers_tokens_per_s": new_tokens / hf_s,
    }

    def measure(variant: str) -> dict:
        our_dtype = variants[variant][0]
        our_s, prompt_s = median[(variant, max_new_tokens)], median[(variant, 1)]
        # Vision encoder: once per prompt (ours) versus once per sample (transformers' expanded inputs).
        model, sampler = models[our_dtype], samplers[(variant, 1)]
        prepared = batch_inputs(model.config, batch)
        vision_once = _median_time(
            lambda: jax.block_until_ready(sampler.image_features(states[our_dtype], prepared)), runs
        )
        return {
            "seconds": our_s,
            "tokens_per_s": new_tokens / our_s,
            "speedup": hf_s / our_s,
            "prompt_s": prompt_s,
            "prompt_speedup": hf_prompt_s / prompt_s,
            "decode_speedup": (hf_s - hf_prompt_s) / (our_s - prompt_s),
            "compile_s": compile_s[(variant, max_new_tokens)],
            "dtype": our_dtype,
            "cpu_kernel": sampler.uses_cpu_kernel(states[our_dtype]),
            "vision_encoder_once_s": vision_once,
            "vision_encoder_saved_s": vision_once * (group_size - 1),
        }

    result["ours"] = {variant: measure(variant) for variant in variants}
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_result(r: dict) -> str:
    lines = [
        f"{r['config']} Qwen2.5-VL ({r['parameters'] / 1e6:.1f}M params): {r['prompts']} prompts x "
        f"G={r['group_size']}, 3 images of {r['image_side']} px, {r['prompt_tokens']} prompt tokens, "
        f"{r['max_new_tokens']} new tokens each, median of {r['runs']}",
        f"transformers generate ({r['dtype']}) {r['transformers_tokens_per_s']:>9.1f} tokens/s "
        f"({r['transformers_s']:.2f} s, of which prompt part {r['transformers_prompt_s']:.2f} s)",
    ]
    for variant, o in r["ours"].items():
        kernel = ", packed CPU matmul" if o.get("cpu_kernel") else ""
        lines.append(
            f"ours, jitted sampler ({variant}{kernel}) {o['tokens_per_s']:>9.1f} tokens/s "
            f"({o['seconds']:.2f} s, of which prompt part {o['prompt_s']:.2f} s)   "
            f"speedup {o['speedup']:.2f}x (prompt part {o['prompt_speedup']:.2f}x, "
            f"decoding {o['decode_speedup']:.2f}x)\n"
            f"    compile {o['compile_s']:.1f} s   vision encoder {o['vision_encoder_once_s'] * 1e3:.1f} ms "
            f"once per prompt ({o['vision_encoder_saved_s'] * 1e3:.1f} ms more if per sample)"
        )
    return "\n".join(lines)
