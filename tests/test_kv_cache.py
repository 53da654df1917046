"""KV-cache prefill/decode against the full forward, and padded batches against single prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scalereasoner_jax.models.qwen2_5_vl import from_pretrained, prepare_inputs


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return from_pretrained(tiny_hf_dir)


def _prompt(cfg, grids, text_lens, rng) -> list[int]:
    """Text, then per image <vision_start> pads <vision_end>, then text: the chat template's shape."""
    vocab = min(cfg.image_token_id, cfg.vision_start_token_id) - 1
    ids = rng.integers(0, vocab, text_lens[0]).tolist()
    for (t, h, w), n in zip(grids, text_lens[1:], strict=True):
        ids += (
            [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]
        )
        ids += rng.integers(0, vocab, n).tolist()
    return ids


def _pixels(grids, rng):
    n = int(np.prod(grids, axis=-1).sum())
    return rng.standard_normal((n, 1176)).astype(np.float32)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    s = max(map(len, rows))
    ids = np.full((len(rows), s), pad, np.int64)
    mask = np.zeros((len(rows), s), np.int64)
    for i, r in enumerate(rows):
        ids[i, s - len(r) :] = r
        mask[i, s - len(r) :] = 1
    return ids, mask


def test_decode_steps_equal_full_forward(model):
    cfg = model.config
    rng = np.random.default_rng(0)
    grids_a, grids_b = [[1, 4, 6]], [[1, 4, 4], [1, 6, 4], [1, 4, 8]]
    rows = [_prompt(cfg, grids_a, [3, 5], rng), _prompt(cfg, grids_b, [2, 1, 2, 4], rng)]
    grids = np.array(grids_a + grids_b)
    pixels = np.concatenate([_pixels(grids_a, rng), _pixels(grids_b, rng)])
    ids, mask = _left_pad(rows, pad=0)
    steps = 5
    generated = rng.integers(0, 100, (2, steps))

    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda s, x, c: nnx.merge(graphdef, s).prefill(x, c), donate_argnums=2)
    decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c), donate_argnums=2 + 1)
    inputs = prepare_inputs(cfg, ids, mask, pixels, grids)
    logits, cache = prefill(state, inputs, model.new_cache(2, ids.shape[1] + steps + 3))
    step_logits = []
    for j in range(steps):
        lg, cache = decode(state, jnp.asarray(generated[:, j]), inputs.next_position + j, cache)
        step_logits.append(np.asarray(lg))

    # The full forward over prompt + generated tokens, one row at a time (no padding at all).
    for b in range(2):
        row_grids = np.array(grids_a if b == 0 else grids_b)
        n_a = int(np.prod(grids_a, axis=-1).sum())
        row_pixels = pixels[:n_a] if b == 0 else pixels[n_a:]
        full = prepare_inputs(cfg, np.array([rows[b] + generated[b].tolist()]), None, row_pixels, row_grids)
        ref = np.asarray(model.forward(full))[0]
        n = len(rows[b])
        got_prefill = np.asarray(logits)[b, mask[b] == 1]
        np.testing.assert_allclose(got_prefill, ref[:n], atol=2e-5, rtol=0)
        for j in range(steps):
            np.testing.assert_allclose(step_logits[j][b], ref[n + j], atol=2e-5, rtol=0)


def test_prefill_of_long_prompts_and_of_the_last_position_only(model):
    """Prompts longer than one causal query block; ``last_only`` gives the same last logits and cache."""
    cfg = model.config
    rng = np.random.default_rng(4)
    grids = [[1, 4, 4], [1, 8, 4]]
    rows = [_prompt(cfg, grids[:1], [120, 30], rng), _prompt(cfg, grids[1:], [90, 70], rng)]
    ids, mask = _left_pad(rows, pad=0)
    assert ids.shape[1] > 128  # causal_attention's query block
    inputs = prepare_inputs(cfg, ids, mask, _pixels(grids, rng), np.array(grids))
    graphdef, state = nnx.split(model)
    prefill = jax.jit(
        lambda s, x, c, last_only: nnx.merge(graphdef, s).prefill(x, c, last_only=last_only),
        static_argnums=3,
    )
    length = ids.shape[1] + 4
    logits, cache = prefill(state, inputs, model.new_cache(2, length), False)
    last, last_cache = prefill(state, inputs, model.new_cache(2, length), True)

    ref = np.asarray(model.forward(inputs))
    np.testing.assert_allclose(np.asarray(logits)[mask == 1], ref[mask == 1], atol=2e-5, rtol=0)
    assert last.shape == (2, 1, cfg.text.vocab_size)
    np.testing.assert_allclose(np.asarray(last)[:, 0], np.asarray(logits)[:, -1], atol=2e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(last_cache), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    assert int(cache.index) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.valid)[:, : ids.shape[1]], mask == 1)
    assert not np.asarray(cache.valid)[:, ids.shape[1] :].any()


def test_padded_batch_equals_single_prompts(model):
    cfg = model.config
    rng = np.random.default_rng(1)
    specs = [([[1, 4, 4]], [4, 3]), ([], [7]), ([[1, 8, 4], [1, 4, 4]], [1, 2, 9])]
    rows, grid_list, pixel_list = [], [], []
    for grids, lens in specs:
        rows.append(_prompt(cfg, grids, lens, rng))
        grid_list += grids
        pixel_list.append(_pixels(grids, rng) if grids else np.zeros((0, 1176), np.float32))
    ids, mask = _left_pad(rows, pad=cfg.vision_end_token_id + 7)
    batch = np.asarray(
        model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=np.concatenate(pixel_list),
            image_grid_thw=np.array(grid_list),
        ).logits
    )
    for b, (grids, _) in enumerate(specs):
        single = model(
            input_ids=np.array([rows[b]]),
            pixel_values=pixel_list[b] if grids else None,
            image_grid_thw=np.array(grids) if grids else None,
        ).logits
        np.testing.assert_allclose(batch[b, mask[b] == 1], np.asarray(single)[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(tiny_hf_dir, policy):
    plain, remat = from_pretrained(tiny_hf_dir), from_pretrained(tiny_hf_dir, remat=policy)
    cfg = plain.config
    rng = np.random.default_rng(3)
    grids = [[1, 4, 4]]
    ids = np.array([_prompt(cfg, grids, [3, 4], rng)])
    inputs = prepare_inputs(cfg, ids, None, _pixels(grids, rng), np.array(grids))

    def loss(model):
        return jax.numpy.mean(jax.nn.log_softmax(model.forward(inputs))[..., 7])

    results = [jax.jit(nnx.value_and_grad(loss))(m) for m in (plain, remat)]
    np.testing.assert_allclose(float(results[0][0]), float(results[1][0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
