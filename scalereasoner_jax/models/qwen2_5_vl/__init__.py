"""Qwen2.5-VL in Flax NNX, numerically equal to the Hugging Face implementation."""

from scalereasoner_jax.models.qwen2_5_vl.config import ConfigError, Qwen25VLConfig, TextConfig, VisionConfig
from scalereasoner_jax.models.qwen2_5_vl.model import (
    CausalLMOutput,
    InputError,
    ModelInputs,
    Qwen25VL,
    batch_inputs,
    get_rope_index,
    prepare_inputs,
)
from scalereasoner_jax.models.qwen2_5_vl.params import WeightsError, from_pretrained, save_pretrained
from scalereasoner_jax.models.qwen2_5_vl.text import KVCache

__all__ = [
    "CausalLMOutput",
    "ConfigError",
    "InputError",
    "KVCache",
    "ModelInputs",
    "Qwen25VL",
    "Qwen25VLConfig",
    "TextConfig",
    "VisionConfig",
    "WeightsError",
    "batch_inputs",
    "from_pretrained",
    "get_rope_index",
    "prepare_inputs",
    "save_pretrained",
]
