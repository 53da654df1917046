"""Qwen2.5-VL configuration read from a Hugging Face ``config.json``.

Both layouts transformers writes are accepted: v5 nests the language model under ``text_config``;
v4 checkpoints (and the original Qwen releases) keep its keys at the top level. RoPE settings come
from ``rope_parameters`` (v5) or ``rope_scaling`` + ``rope_theta`` (v4).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


class ConfigError(ValueError):
    """A config.json that this implementation cannot represent faithfully."""


def _require(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json: missing key '{where}{key}'")
    return d[key]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def merger_window(self) -> int:
        """Window side in merged tokens (HF's ``vit_merger_window_size``)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, ...]
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 128_000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool = False
    eos_token_id: tuple[int, ...] = ()
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> Qwen25VLConfig:
        archs = cfg.get("architectures") or []
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"config.json: unsupported 'architectures' {archs}; "
                f"supported: {list(SUPPORTED_ARCHITECTURES)}"
            )
        model_type = _require(cfg, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"config.json: unsupported 'model_type' {model_type!r}")

        vis = _require(cfg, "vision_config", "")
        vision = VisionConfig(
            depth=_require(vis, "depth", "vision_config."),
            hidden_size=_require(vis, "hidden_size", "vision_config."),
            intermediate_size=_require(vis, "intermediate_size", "vision_config."),
            num_heads=_require(vis, "num_heads", "vision_config."),
            out_hidden_size=_require(vis, "out_hidden_size", "vision_config."),
            fullatt_block_indexes=tuple(_require(vis, "fullatt_block_indexes", "vision_config.")),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", 14),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            window_size=_require(vis, "window_size", "vision_config."),
            hidden_act=vis.get("hidden_act", "silu"),
            rope_theta=float((vis.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            tokens_per_second=vis.get("tokens_per_second", 4),
        )
        if vision.hidden_act != "silu":
            raise ConfigError(f"config.json: unsupported 'vision_config.hidden_act' {vision.hidden_act!r}")

        # v5 nests the text model; v4 keeps it at the top level.
        txt, prefix = (cfg["text_config"], "text_config.") if cfg.get("text_config") else (cfg, "")
        rope = txt.get("rope_parameters") or txt.get("rope_scaling") or cfg.get("rope_scaling") or {}
        mrope = rope.get("mrope_section")
        if mrope is None:
            raise ConfigError(f"config.json: missing key '{prefix}rope_parameters.mrope_section'")
        theta = rope.get("rope_theta", txt.get("rope_theta", cfg.get("rope_theta")))
        if theta is None:
            raise ConfigError(f"config.json: missing key '{prefix}rope_parameters.rope_theta'")
        if txt.get("use_sliding_window"):
            raise ConfigError(f"config.json: '{prefix}use_sliding_window' = true is not supported")
        heads = _require(txt, "num_attention_heads", prefix)
        text = TextConfig(
            vocab_size=_require(txt, "vocab_size", prefix),
            hidden_size=_require(txt, "hidden_size", prefix),
            intermediate_size=_require(txt, "intermediate_size", prefix),
            num_hidden_layers=_require(txt, "num_hidden_layers", prefix),
            num_attention_heads=heads,
            num_key_value_heads=txt.get("num_key_value_heads") or heads,
            mrope_section=tuple(mrope),
            rope_theta=float(theta),
            rms_norm_eps=_require(txt, "rms_norm_eps", prefix),
            hidden_act=txt.get("hidden_act", "silu"),
            max_position_embeddings=txt.get("max_position_embeddings", 128_000),
        )
        if text.hidden_act != "silu":
            raise ConfigError(f"config.json: unsupported '{prefix}hidden_act' {text.hidden_act!r}")
        if 2 * sum(text.mrope_section) != text.head_dim:
            raise ConfigError(
                f"config.json: '{prefix}rope_parameters.mrope_section' {list(text.mrope_section)} "
                "must sum to "
                f"head_dim/2 = {text.head_dim // 2}"
            )
        eos = txt.get("eos_token_id", cfg.get("eos_token_id"))
        eos = () if eos is None else tuple(eos) if isinstance(eos, list | tuple) else (eos,)
        tie = bool(cfg.get("tie_word_embeddings", False) or txt.get("tie_word_embeddings", False))
        return cls(
            vision=vision,
            text=text,
            image_token_id=_require(cfg, "image_token_id", ""),
            video_token_id=_require(cfg, "video_token_id", ""),
            vision_start_token_id=_require(cfg, "vision_start_token_id", ""),
            vision_end_token_id=cfg.get(
                "vision_end_token_id", _require(cfg, "vision_start_token_id", "") + 1
            ),
            tie_word_embeddings=tie,
            eos_token_id=eos,
            raw=dict(cfg),
        )

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path) -> Qwen25VLConfig:
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {hf_dir}")
        return cls.from_dict(json.loads(path.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json to write on export: the original one when we have it."""
        if self.raw:
            return dict(self.raw)
        v, t = self.vision, self.text
        return {
            "architectures": list(SUPPORTED_ARCHITECTURES),
            "model_type": "qwen2_5_vl",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "hidden_act": v.hidden_act,
                "tokens_per_second": v.tokens_per_second,
            },
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "rms_norm_eps": t.rms_norm_eps,
                "hidden_act": t.hidden_act,
                "max_position_embeddings": t.max_position_embeddings,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": list(t.mrope_section),
                },
                "eos_token_id": list(self.eos_token_id) or None,
                "tie_word_embeddings": self.tie_word_embeddings,
            },
        }
