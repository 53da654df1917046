"""The tiny local Qwen2.5-VL folders: they load in transformers offline, run, and are reproducible."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Qwen2_5_VLConfig
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as HF_PRETOKENIZE_REGEX

from scalereasoner_jax.models.qwen2_5_vl.tiny import (
    CHAT_TEMPLATE,
    PRETOKENIZE_REGEX,
    QWEN_SPECIAL_TOKENS,
    make_tiny_hf_model,
    special_token_ids,
    tiny_config,
    train_tokenizer,
)


def _tensors(path) -> dict[str, np.ndarray]:
    with safe_open(str(path / "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def test_folder_loads_offline_and_forward_runs(tiny_hf_dir):
    files = (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
    )
    for name in files:
        assert (tiny_hf_dir / name).is_file(), name
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_hf_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(tiny_hf_dir))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 168, 3), dtype=np.uint8))
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.05, "random weights should give non-trivial logits"


def test_config_matches_tokenizer_and_tiny_defaults(tiny_hf_dir):
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(tiny_hf_dir))
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["model_type"] == "qwen2_5_vl"
    assert text["vocab_size"] == len(tok)
    for key, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert cfg[key] == tok.convert_tokens_to_ids(token), key
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (64, 2, 4)
    assert (text["num_key_value_heads"], text["intermediate_size"], text["rms_norm_eps"]) == (2, 128, 1e-6)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    assert text["rope_parameters"]["rope_theta"] == 1e6
    assert (vision["depth"], vision["hidden_size"], vision["num_heads"]) == (4, 32, 2)
    assert (vision["intermediate_size"], vision["out_hidden_size"], vision["patch_size"]) == (64, 64, 14)
    assert vision["fullatt_block_indexes"] == [1, 3] and vision["window_size"] == 112
    assert cfg["tie_word_embeddings"] is False


def test_weights_are_nontrivial_and_seeded(tiny_hf_dir, tmp_path):
    weights = _tensors(tiny_hf_dir)
    norms = [v for k, v in weights.items() if "norm" in k.split(".")[-2] or k.endswith("ln_q.weight")]
    assert len(norms) == 2 * 2 + 1 + 4 * 2 + 1  # text layers x2, final norm, vision blocks x2, merger
    for v in norms:
        assert abs(v.mean() - 1.0) < 0.1 and 0.03 < v.std() < 0.3
    lm_head = weights["lm_head.weight"]
    assert 0.015 < lm_head.std() < 0.025
    assert not np.array_equal(lm_head, weights["model.embed_tokens.weight"])
    # Same seed -> byte-identical checkpoint.
    again = make_tiny_hf_model(tmp_path / "again", seed=0, tokenizer_from=tiny_hf_dir)
    assert (again / "model.safetensors").read_bytes() == (tiny_hf_dir / "model.safetensors").read_bytes()


def test_tied_variant(tiny_hf_dir_tied):
    cfg = json.loads((tiny_hf_dir_tied / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _tensors(tiny_hf_dir_tied)
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_hf_dir_tied))
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_tokenizer_training_is_deterministic(tmp_path):
    first = train_tokenizer(tmp_path / "a")
    train_tokenizer(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # An extra corpus changes the merges but stays deterministic.
    extra = ["Perineural invasion by poorly differentiated carcinoma. " * 3] * 5
    train_tokenizer(tmp_path / "c", corpus=extra)
    train_tokenizer(tmp_path / "d", corpus=extra)
    trained = {name: (tmp_path / name / "tokenizer.json").read_bytes() for name in "acd"}
    assert trained["c"] == trained["d"] and trained["c"] != trained["a"]
    assert len(first) == 512


def test_tokenizer_specials_and_chat_template(tmp_path):
    train_tokenizer(tmp_path, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 400
    ids = special_token_ids(400)
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS} == ids
    assert list(ids.values()) == list(range(400 - len(QWEN_SPECIAL_TOKENS), 400))
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.chat_template == CHAT_TEMPLATE
    assert PRETOKENIZE_REGEX == HF_PRETOKENIZE_REGEX  # same pre-tokenizer split as the real Qwen2 tokenizer
    text = "Answer: <think>Crowded glands.</think><answer>B</answer> 0.499 mpp"
    assert tok.decode(tok(text)["input_ids"]) == text
    # A special token is one id, never split by BPE.
    assert tok("<|image_pad|>")["input_ids"] == [ids["<|image_pad|>"]]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which?"}]},
        {"role": "assistant", "content": "<answer>A</answer>"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which?<|im_end|>\n"
        "<|im_start|>assistant\n<answer>A</answer><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(tmp_path / "tiny", vocab_size=200)


def test_tiny_config_overrides_merge():
    cfg = tiny_config(
        vocab_size=400,
        tie_word_embeddings=True,
        text_config={"num_hidden_layers": 3, "rope_parameters": {"rope_theta": 1e4}},
        vision_config={"depth": 2, "fullatt_block_indexes": [1]},
    )
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert text["hidden_size"] == 64 and text["num_hidden_layers"] == 3 and len(text["layer_types"]) == 3
    assert text["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    assert vision["depth"] == 2 and vision["hidden_size"] == 32 and vision["fullatt_block_indexes"] == [1]
    assert cfg["tie_word_embeddings"] is True
    assert cfg["image_token_id"] == special_token_ids(400)["<|image_pad|>"] == 398
    assert tiny_config()["text_config"]["num_hidden_layers"] == 2  # defaults are not mutated
    hf = Qwen2_5_VLConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    assert hf.text_config.num_hidden_layers == 3 and hf.vision_config.depth == 2
