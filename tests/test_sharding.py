"""Sharded over a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices equals the single-device model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from scalereasoner_jax.models.qwen2_5_vl import from_pretrained, prepare_inputs
from scalereasoner_jax.parallel import DEFAULT_RULES, logical_to_spec, make_mesh

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest sets XLA_FLAGS)")


def test_make_mesh_shapes():
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh({"data": 4, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="unknown axes"):
        make_mesh({"model": 8})


def test_logical_rules_use_each_mesh_axis_once():
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "length", "act_embed"), DEFAULT_RULES) == P(("data", "fsdp"), None, None)
    # 'batch' already took fsdp, so a second fsdp-mapped axis stays replicated.
    assert logical_to_spec(("batch", "embed"), DEFAULT_RULES) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonexistent",), DEFAULT_RULES)


def test_sharded_forward_equals_unsharded(tiny_hf_dir):
    single = from_pretrained(tiny_hf_dir)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = from_pretrained(tiny_hf_dir, mesh=mesh)

    # Parameters are really split as declared, not just numerically equal.
    layer = sharded.language_model.layers[0]
    expect = {
        "q_proj": (layer.self_attn.q_proj.kernel, P("fsdp", "tensor")),
        "o_proj": (layer.self_attn.o_proj.kernel, P("tensor", "fsdp")),
        "gate_proj": (layer.mlp.gate_proj.kernel, P("fsdp", "tensor")),
        "down_proj": (layer.mlp.down_proj.kernel, P("tensor", "fsdp")),
        "embed": (sharded.language_model.embed_tokens, P("tensor", "fsdp")),
        "lm_head": (sharded.lm_head.kernel, P("fsdp", "tensor")),
        "vision qkv": (sharded.visual.blocks[0].attn.qkv.kernel, P("fsdp", "tensor")),
        "norm": (layer.input_layernorm.scale, P(None)),
    }
    for name, (var, spec) in expect.items():
        value = var.get_value()
        assert value.sharding.mesh.shape == mesh.shape, name
        assert value.sharding.spec == spec, f"{name}: {value.sharding.spec} != {spec}"
        shard_shape = value.addressable_shards[0].data.shape
        want = tuple(
            d // (int(np.prod([mesh.shape[a] for a in ((s,) if isinstance(s, str) else s)])) if s else 1)
            for d, s in zip(value.shape, tuple(spec) + (None,) * value.ndim, strict=False)
        )
        assert shard_shape == want, f"{name}: shard {shard_shape} != {want}"
    assert len({s.device for s in layer.mlp.gate_proj.kernel.get_value().addressable_shards}) == 8

    cfg = single.config
    rng = np.random.default_rng(0)
    grids = np.array([[1, 4, 8], [1, 8, 8], [1, 4, 4], [1, 4, 4]])
    rows = []
    for g in grids.reshape(4, 1, 3):
        n = int(g[0].prod()) // 4
        rows.append(
            rng.integers(0, 100, 5).tolist()
            + [cfg.vision_start_token_id]
            + [cfg.image_token_id] * n
            + [cfg.vision_end_token_id]
            + rng.integers(0, 100, 3).tolist()
        )
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = rng.standard_normal((int(grids.prod(-1).sum()), 1176)).astype(np.float32)
    inputs = prepare_inputs(cfg, ids, mask, pixels, grids)

    ref = np.asarray(single.forward(inputs))
    graphdef, state = nnx.split(sharded)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))(state, inputs)
    assert logits.sharding.spec[0] == ("data", "fsdp")  # batch split over data x fsdp
    valid = mask == 1
    np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], atol=1e-5, rtol=0)
