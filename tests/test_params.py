"""Weights in and out of Hugging Face format, and clear errors for bad weights, configs and inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from scalereasoner_jax.models.qwen2_5_vl import (
    ConfigError,
    InputError,
    Qwen25VLConfig,
    WeightsError,
    from_pretrained,
    prepare_inputs,
    save_pretrained,
)
from scalereasoner_jax.models.qwen2_5_vl.params import hf_to_path, path_to_hf


def _hf_tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():  # noqa: SIM118
                out[k] = st.get_tensor(k)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact_and_loads_in_transformers(tiny_hf_dir, tiny_hf_dir_tied, tmp_path, tied):
    src = tiny_hf_dir_tied if tied else tiny_hf_dir
    model = from_pretrained(src)
    out = save_pretrained(model, tmp_path / "export", reference_dir=src, max_shard_bytes=200_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1, "the small shard limit should split the export"
    assert set(index["weight_map"].values()) == {s.name for s in shards}

    original, exported = _hf_tensors(src), _hf_tensors(out)
    assert set(exported) == set(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype, name
        assert np.array_equal(exported[name], value), f"{name} changed in the round trip"

    reloaded = AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    reference = AutoModelForImageTextToText.from_pretrained(str(src)).eval()
    a, b = reloaded.state_dict(), reference.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert bool((a[k] == b[k]).all()), k
    processor = AutoProcessor.from_pretrained(str(out))
    assert processor.tokenizer.chat_template


def test_name_table_round_trips_every_path(tiny_hf_dir):
    model = from_pretrained(tiny_hf_dir)
    cfg = model.config
    from flax import nnx

    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, _ = path_to_hf(cfg, path)
        assert hf_to_path(cfg, name)[0] == path
    # transformers 4.5x names map to the same parameters
    assert hf_to_path(cfg, "model.language_model.layers.0.mlp.up_proj.weight")[0] == (
        "language_model",
        "layers",
        0,
        "mlp",
        "up_proj",
        "kernel",
    )
    assert hf_to_path(cfg, "model.visual.merger.mlp.0.bias")[0] == ("visual", "merger", "fc1", "bias")


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dst


def test_missing_unexpected_and_misshaped_tensors_are_named(tiny_hf_dir, tmp_path):
    assert (tiny_hf_dir / "model.safetensors").is_file()

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        del t["visual.blocks.0.attn.qkv.bias"]
        t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
        t["model.norm.weight"] = np.ones(7, np.float32)

    broken = _broken_copy(tiny_hf_dir, tmp_path / "broken", edit)
    with pytest.raises(WeightsError) as err:
        from_pretrained(broken)
    msg = str(err.value)
    for needle in (
        "missing tensors",
        "model.layers.1.mlp.up_proj.weight",
        "visual.blocks.0.attn.qkv.bias",
        "unexpected tensors",
        "model.layers.0.extra.weight",
        "wrongly shaped",
        "model.norm.weight",
    ):
        assert needle in msg, needle


def test_pickle_only_folder_is_refused(tiny_hf_dir, tmp_path):
    folder = tmp_path / "pickle"
    folder.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match="pickle"):
        from_pretrained(folder)


def test_config_errors_name_the_key(tiny_hf_dir):
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    bad = json.loads(json.dumps(cfg))
    del bad["text_config"]["num_hidden_layers"]
    with pytest.raises(ConfigError, match=r"text_config\.num_hidden_layers"):
        Qwen25VLConfig.from_dict(bad)
    bad = json.loads(json.dumps(cfg))
    del bad["vision_config"]["fullatt_block_indexes"]
    with pytest.raises(ConfigError, match=r"vision_config\.fullatt_block_indexes"):
        Qwen25VLConfig.from_dict(bad)
    bad = dict(cfg, architectures=["LlavaForConditionalGeneration"])
    with pytest.raises(ConfigError, match="architectures"):
        Qwen25VLConfig.from_dict(bad)
    # v4 layout: text keys at the top level, rope in rope_scaling
    flat = {k: v for k, v in cfg.items() if k != "text_config"}
    text = dict(cfg["text_config"])
    rope = text.pop("rope_parameters")
    text.pop("model_type")  # v5 writes qwen2_5_vl_text here; v4 had only the top-level one
    flat.update(
        text,
        rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
        rope_theta=rope["rope_theta"],
    )
    assert Qwen25VLConfig.from_dict(flat).text == Qwen25VLConfig.from_dict(cfg).text


def test_bad_inputs_are_clear_errors(tiny_hf_dir):
    cfg = Qwen25VLConfig.from_pretrained(tiny_hf_dir)
    grid = np.array([[1, 4, 4]])
    pixels = np.zeros((16, 1176), np.float32)
    good = [1, cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id, 2]
    prepare_inputs(cfg, np.array([good]), None, pixels, grid)  # sanity: this one is fine

    too_few = [1, cfg.vision_start_token_id] + [cfg.image_token_id] * 3 + [cfg.vision_end_token_id]
    with pytest.raises(InputError, match=r"3 <\|image_pad\|> tokens .* 4 image features"):
        prepare_inputs(cfg, np.array([too_few]), None, pixels, grid)
    with pytest.raises(InputError, match="pixel_values shape"):
        prepare_inputs(cfg, np.array([good]), None, pixels[:12], grid)
    with pytest.raises(InputError, match="pixel_values shape"):
        prepare_inputs(cfg, np.array([good]), None, np.zeros((16, 1000), np.float32), grid)
    with pytest.raises(InputError, match="no pixel_values"):
        prepare_inputs(cfg, np.array([good]))
    with pytest.raises(InputError, match="together"):
        prepare_inputs(cfg, np.array([good]), None, pixels, None)
    with pytest.raises(InputError, match="attention_mask shape"):
        prepare_inputs(cfg, np.array([good]), np.ones((1, 3)), pixels, grid)
    # Token count right in total, but split into two spans for a single 8-token image.
    two_spans = good[:-1] + [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
    with pytest.raises(InputError, match=r"span has 4 image tokens but image_grid_thw \[1, 4, 8\] needs 8"):
        prepare_inputs(
            cfg, np.array([two_spans]), None, np.zeros((32, 1176), np.float32), np.array([[1, 4, 8]])
        )
