"""``scalereasoner bench forward``: our jitted forward and decode step against transformers.

Both sides run the same randomly initialised "small" Qwen2.5-VL (about 100M parameters) on the same
inputs (3 images of 448x448 and 512 text tokens), in float32 on this machine's CPU, side by side in
one process, so the ratio is meaningful even on a noisy machine.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SMALL_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "image_token_id": 31990,
    "video_token_id": 31991,
    "vision_start_token_id": 31992,
    "vision_end_token_id": 31993,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "bos_token_id": 31994,
        "eos_token_id": 31995,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
    },
    "vision_config": {
        "model_type": "qwen2_5_vl_vision",
        "depth": 8,
        "hidden_size": 384,
        "intermediate_size": 1024,
        "num_heads": 6,
        "out_hidden_size": 768,
        "fullatt_block_indexes": [3, 7],
        "window_size": 112,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "tokens_per_second": 2,
    },
}


def _timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _inputs(cfg: dict, n_images: int, image_side: int, text_tokens: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    v = cfg["vision_config"]
    grid = image_side // v["patch_size"]
    per_image = grid * grid // v["spatial_merge_size"] ** 2
    ids: list[int] = []
    text_per_gap = text_tokens // (n_images + 1)
    vocab = cfg["text_config"]["vocab_size"] - 100
    for _ in range(n_images):
        ids += rng.integers(0, vocab, text_per_gap).tolist()
        ids += (
            [cfg["vision_start_token_id"]]
            + [cfg["image_token_id"]] * per_image
            + [cfg["vision_end_token_id"]]
        )
    ids += rng.integers(0, vocab, text_tokens - len(ids) + n_images * (per_image + 2)).tolist()
    input_ids = np.array([ids], np.int64)
    patch_dim = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    return {
        "input_ids": input_ids,
        "attention_mask": np.ones_like(input_ids),
        "pixel_values": rng.standard_normal((n_images * grid * grid, patch_dim)).astype(np.float32),
        "image_grid_thw": np.array([[1, grid, grid]] * n_images, np.int64),
    }


def run(
    runs: int = 5,
    n_images: int = 3,
    image_side: int = 448,
    text_tokens: int = 512,
    threads: int | None = None,
    out_json: str | None = None,
) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from scalereasoner_jax.models.qwen2_5_vl import from_pretrained, prepare_inputs

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = {k: v for k, v in SMALL_CONFIG.items() if k not in ("architectures", "model_type")}
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_cfg)).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = from_pretrained(tmp)
    raw = _inputs(SMALL_CONFIG, n_images, image_side, text_tokens)
    seq = raw["input_ids"].shape[1]
    pt = {k: torch.from_numpy(v) for k, v in raw.items()}
    pt["mm_token_type_ids"] = (pt["input_ids"] == SMALL_CONFIG["image_token_id"]).int()

    # transformers: full forward, then one decode step on top of the prompt's cache
    def hf_forward():
        with torch.no_grad():
            return hf(**pt, use_cache=True)

    hf_forward()  # warm-up
    hf_fwd = _timed(hf_forward, runs)
    with torch.no_grad():
        prefill = hf(**pt, use_cache=True)
    cache = prefill.cache if hasattr(prefill, "cache") else prefill.past_key_values
    next_tok = prefill.logits[:, -1].argmax(-1, keepdim=True)
    dec_mask = torch.ones(1, seq + 1, dtype=torch.long)
    # mRoPE position of the new token: its text position plus the prompt's rope delta (as generate does).
    dec_pos = (hf.model.rope_deltas + seq).view(1, 1, 1).expand(3, 1, 1)

    def hf_decode():
        extra = cache.get_seq_length() - seq
        if extra:
            cache.crop(-extra)  # every timed step decodes the same position
        with torch.no_grad():
            return hf(
                input_ids=next_tok, attention_mask=dec_mask, position_ids=dec_pos, cache=cache, use_cache=True
            )

    hf_decode()
    hf_dec = _timed(hf_decode, runs)

    # ours: jitted forward, jitted prefill, jitted decode step with a donated cache
    inputs = prepare_inputs(ours.config, **raw)
    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(state, inputs))
    fwd_compile = time.perf_counter() - t0
    our_fwd = _timed(lambda: jax.block_until_ready(fwd(state, inputs)), runs)

    max_len = seq + 16
    prefill_fn = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).prefill(x, c), donate_argnums=2)
    decode_fn = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c), donate_argnums=3)
    logits, our_cache = prefill_fn(state, inputs, ours.new_cache(1, max_len))
    tok = jnp.argmax(logits[:, -1], -1)
    t0 = time.perf_counter()
    _, c2 = decode_fn(state, tok, inputs.next_position, our_cache)
    jax.block_until_ready(c2)
    dec_compile = time.perf_counter() - t0
    holder = {"cache": c2}

    def our_decode():
        c = holder["cache"]
        c = type(c)(k=c.k, v=c.v, valid=c.valid, index=jnp.asarray(seq, jnp.int32))  # same position
        lg, holder["cache"] = decode_fn(state, tok, inputs.next_position, c)
        jax.block_until_ready(lg)

    our_decode()
    our_dec = _timed(our_decode, runs)

    med = statistics.median
    result = {
        "config": "small",
        "parameters": int(n_params),
        "images": n_images,
        "image_side": image_side,
        "sequence_tokens": int(seq),
        "runs": runs,
        "torch_threads": torch.get_num_threads(),
        "jax_backend": jax.default_backend(),
        "forward": {
            "transformers_s": med(hf_fwd),
            "ours_s": med(our_fwd),
            "transformers_tokens_per_s": seq / med(hf_fwd),
            "ours_tokens_per_s": seq / med(our_fwd),
            "speedup": med(hf_fwd) / med(our_fwd),
            "ours_compile_s": fwd_compile,
        },
        "decode_step": {
            "transformers_s": med(hf_dec),
            "ours_s": med(our_dec),
            "transformers_tokens_per_s": 1 / med(hf_dec),
            "ours_tokens_per_s": 1 / med(our_dec),
            "speedup": med(hf_dec) / med(our_dec),
            "ours_compile_s": dec_compile,
        },
    }
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_result(r: dict) -> str:
    lines = [
        f"small Qwen2.5-VL ({r['parameters'] / 1e6:.0f}M params), {r['images']} images {r['image_side']}px, "
        f"{r['sequence_tokens']} tokens, median of {r['runs']} runs, torch threads {r['torch_threads']}, "
        f"JAX on {r['jax_backend']}",
        f"{'':14}{'transformers':>16}{'ours':>16}{'speedup':>10}{'compile':>10}",
    ]
    for key, label in (("forward", "forward"), ("decode_step", "decode step")):
        x = r[key]
        lines.append(
            f"{label:14}{x['transformers_tokens_per_s']:>12.1f} t/s{x['ours_tokens_per_s']:>12.1f} t/s"
            f"{x['speedup']:>9.2f}x{x['ours_compile_s']:>9.1f}s"
        )
    return "\n".join(lines)
