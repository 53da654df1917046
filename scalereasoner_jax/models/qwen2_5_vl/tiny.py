"""Tiny, fully local Hugging Face Qwen2.5-VL folders for tests and the demo.

Everything here is built from scratch on the local machine (no hub downloads): a byte-level BPE
tokenizer trained on a small pathology-style corpus with the real Qwen special tokens and chat
template, a tiny `Qwen2_5_VLForConditionalGeneration` with non-trivial random weights, and a
`Qwen2_5_VLProcessor` with small pixel bounds so tests stay fast. The folders load with
`AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained` offline.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "PRETOKENIZE_REGEX",
    "QWEN_SPECIAL_TOKENS",
    "builtin_corpus",
    "make_tiny_hf_model",
    "special_token_ids",
    "tiny_config",
    "train_tokenizer",
]

# The Qwen2.5-VL special tokens, in the order (and so with the relative ids) of the real tokenizer.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template shipped with Qwen/Qwen2.5-VL-*-Instruct (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small pixel bounds so a 256 px patch becomes a 16x16 patch grid (64 merged tokens) at most.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 64
DEFAULT_VOCAB_SIZE = 512

_TISSUES = ("colon", "breast", "lung", "liver", "prostate", "kidney", "skin", "stomach", "lymph node")
_FINDINGS = (
    "adenocarcinoma",
    "normal mucosa",
    "necrosis",
    "lymphocytes",
    "stroma",
    "adipose tissue",
    "debris",
    "smooth muscle",
    "squamous cell carcinoma",
    "ductal carcinoma in situ",
    "inflammation",
    "fibrosis",
)
_SCALES = (("low", "5x", "1.996"), ("mid", "10x", "0.998"), ("high", "20x", "0.499"))
_BASE_TEXT = (
    "You are a helpful assistant.",
    "You are a pathology expert. Look at the hematoxylin and eosin (H&E) stained images.",
    "The first image is the low magnification view, the second the mid magnification view and the "
    "third the high magnification view of the same region.",
    "Think step by step inside <think> </think> tags, then give only the letter of the single best "
    "option inside <answer> </answer> tags.",
    "Never write the option text inside the answer tags.",
    "<think>The glands are irregular and crowded with nuclear atypia.</think><answer>B</answer>",
    "<think>Sheets of small round lymphocytes fill the field.</think><answer>C</answer>",
    "<think>The nuclei are enlarged, hyperchromatic and pleomorphic, with frequent mitoses.</think>"
    "<answer>A</answer>",
    "<think>Pink fibrous stroma with few spindle cells; no tumour is seen.</think><answer>D</answer>",
    "Which tissue type is shown in the images?",
    "What is the most likely diagnosis?",
    "Options:\nA. Tumour epithelium\nB. Normal colonic mucosa\nC. Lymphocytes\nD. Stroma",
    "Answer with the option's letter from the given choices directly.",
    "Cells per field: 0 1 2 3 4 5 6 7 8 9 10 12 25 50 100 256 512 1024 2048.",
    "Magnification 5x 10x 20x 40x; resolution 0.25 0.5 1.0 2.0 microns per pixel (um/px, mpp).",
    "Mitotic count 3/10 HPF; Ki-67 index 15%; tumour grade 2 of 3; margin 1.5 mm.",
    "The whole slide image (WSI) is tiled into 256 px patches at three scales.",
    "Nuclear pleomorphism, mitoses, gland formation, necrosis, invasion, and the tumour microenvironment "
    "are the key features.",
)


def builtin_corpus() -> list[str]:
    """Return the deterministic built-in training text (pathology VQA style, options A-D, tags)."""
    texts = list(_BASE_TEXT)
    letters = "ABCD"
    n = len(_FINDINGS)
    for i, tissue in enumerate(_TISSUES):
        for j in range(4):
            opts = [_FINDINGS[(i + j + k * 3) % n] for k in range(4)]
            answer = letters[(i + 2 * j) % 4]
            scale, mag, mpp = _SCALES[(i + j) % 3]
            options = "\n".join(f"{letters[k]}. {opt.capitalize()}" for k, opt in enumerate(opts))
            texts.append(
                f"Question: This {tissue} biopsy is shown at {mag} ({mpp} um/px, {scale} scale). "
                f"Which finding best describes the region?\nOptions:\n{options}\n"
                f"<think>At {scale} magnification the {tissue} shows {opts[0]} and {opts[1]}; "
                f"at higher power the cells favour {opts[letters.index(answer)]}.</think>"
                f"<answer>{answer}</answer>"
            )
    return texts


def _backend_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a Qwen2-style byte-level BPE (NFC, Qwen2 regex split, byte-level) and add the specials."""
    n_special = len(QWEN_SPECIAL_TOKENS)
    n_bpe = vocab_size - n_special
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_bpe < len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need >= {len(alphabet) + n_special} "
            f"({len(alphabet)} byte tokens + {n_special} special tokens)"
        )
    tok = Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=sorted(alphabet),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    got = tok.get_vocab_size()
    if got != n_bpe:
        raise ValueError(
            f"the corpus only supports {got + n_special} tokens, fewer than vocab_size={vocab_size}; "
            "pass a larger corpus or a smaller vocab_size"
        )
    # Appended after the BPE vocabulary, in Qwen's order, exactly like the real tokenizer.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tok


def train_tokenizer(
    out_dir: str | Path,
    corpus: Iterable[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> PreTrainedTokenizerFast:
    """Train a tiny Qwen2-style tokenizer, save it to `out_dir` and return it.

    Deterministic: the same inputs produce byte-identical files. The special tokens take the last
    14 ids (as in the real Qwen vocabulary), pad is `<|endoftext|>`, eos is `<|im_end|>`, and the
    Qwen2.5-VL chat template is attached. Returns a `transformers.Qwen2Tokenizer`, which is a
    `PreTrainedTokenizerFast` (alias of `TokenizersBackend`) in transformers 5.
    """
    from transformers import Qwen2Tokenizer

    texts = builtin_corpus() + ([] if corpus is None else [str(t) for t in corpus])
    backend = _backend_tokenizer(texts, vocab_size)
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return tokenizer


def special_token_ids(vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict[str, int]:
    """Ids of the Qwen special tokens for a `train_tokenizer` vocabulary of `vocab_size` entries."""
    base = vocab_size - len(QWEN_SPECIAL_TOKENS)
    return {tok: base + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}


def _merge(base: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Recursively merge `overrides` into a copy of `base` (nested dicts are merged, not replaced)."""
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A `config.json`-style dict for a tiny Qwen2.5-VL, laid out as transformers 5 writes it.

    Top-level keys may be overridden directly; `text_config={...}` / `vision_config={...}` dicts
    are merged into the nested configs (so `text_config={"num_hidden_layers": 3}` keeps the rest).
    `vocab_size=N` (top level) sets the text vocab and the special-token ids for a tokenizer of N
    entries from `train_tokenizer`.
    """
    vocab_size = int(overrides.pop("vocab_size", DEFAULT_VOCAB_SIZE))
    ids = special_token_ids(vocab_size)
    num_layers = 2
    text = {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": num_layers,
        "layer_types": ["full_attention"] * num_layers,
        "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "model_type": "qwen2_5_vl_vision",
        "depth": 4,
        "hidden_size": 32,
        "hidden_act": "silu",
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [1, 3],
        "initializer_range": 0.02,
    }
    cfg: dict[str, Any] = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }
    cfg = _merge(cfg, overrides)
    # Keep derived per-layer fields consistent when the layer count is overridden.
    text = cfg["text_config"]
    n = int(text["num_hidden_layers"])
    if len(text.get("layer_types") or []) != n and "layer_types" not in (overrides.get("text_config") or {}):
        text["layer_types"] = ["full_attention"] * n
    if "max_window_layers" not in (overrides.get("text_config") or {}):
        text["max_window_layers"] = n
    return cfg


def _randomize_(model: Any, seed: int) -> None:
    """Re-initialise every parameter from `seed`, independent of module construction order.

    Weights and biases ~ N(0, 0.02); RMSNorm/LayerNorm weights ~ 1 + N(0, 0.1) so that a parity
    test would notice a missing or misplaced norm scale.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    norm_markers = ("norm", "ln_q")
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            parts = name.split(".")
            is_norm = param.ndim == 1 and parts[-1] == "weight" and any(m in parts[-2] for m in norm_markers)
            value = 1.0 + 0.1 * noise if is_norm else 0.02 * noise
            param.copy_(value.to(param.dtype))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of an existing tiny folder (saves retraining for variants)."""
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def make_tiny_hf_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    vision_overrides: Mapping[str, Any] | None = None,
    text_overrides: Mapping[str, Any] | None = None,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    dtype: str = "float32",
    tokenizer_from: str | Path | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Build a tiny Qwen2.5-VL Hugging Face folder (model, tokenizer, processor) and return its path.

    `tokenizer_from` copies the tokenizer of an existing folder instead of training one; `corpus`
    adds domain texts (e.g. a training set's prompts) to the tokenizer's training texts. The
    weights are seeded (same seed -> same safetensors) and non-trivial; see `_randomize_`.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        _copy_tokenizer(Path(tokenizer_from), out)
        tokenizer = AutoTokenizer.from_pretrained(out)
    else:
        tokenizer = train_tokenizer(out, corpus, vocab_size=vocab_size)

    n_vocab = len(tokenizer)
    cfg = tiny_config(
        vocab_size=n_vocab,
        tie_word_embeddings=tie_word_embeddings,
        text_config=dict(text_overrides or {}),
        vision_config=dict(vision_overrides or {}),
    )
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _ID_TOKENS.items()}
    if any(cfg[name] != ids[name] for name in ids):
        raise ValueError(f"tokenizer special-token ids {ids} do not match the config layout")

    torch_dtype = getattr(torch, dtype)
    hf_cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    config = Qwen2_5_VLConfig(**hf_cfg)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _randomize_(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    model = model.to(torch_dtype).eval()
    model.config.dtype = torch_dtype
    model.save_pretrained(out)

    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


_ID_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
