"""Typed run configuration: frozen dataclasses, YAML presets and dotted command-line overrides.

A run is described by one root config, :class:`GRPOConfig` (RL) or :class:`SFTConfig` (supervised
warm-up / baseline), made of small sections (``model``, ``data``, ``rollout``, ...). Configs come from
a preset in ``scalereasoner_jax/configs/NAME.yaml`` or any YAML file, then ``key.sub=value`` overrides::

    cfg = load_config("grpo_tiny_cpu", ["train.steps=4", "rollout.temperature=0.7"], kind="grpo")

Everything is checked before anything runs: unknown keys (in YAML or overrides) are errors naming the
full dotted key and the valid keys at that level; wrong types, out-of-range numbers and unknown enum
values are errors naming the key, the value and what is allowed. Values are parsed with YAML 1.2 scalar
rules (``1e-6`` is a float, ``true``/``false`` are the only booleans, ``null`` is None, ``[a, b]`` a list).

A YAML file may start from another with ``extends: other_preset`` (or a relative ``.yaml`` path); the
two are merged key by key and the child wins.

GRPO loss variants: ``grpo.preset`` names a loss preset (``grpo``, ``dapo``, ``dr_grpo``, ``gspo``); the
loss fields of the ``grpo`` section default to None, meaning "the preset's value", and any field set in
YAML or an override wins. :meth:`GRPOSection.resolved_loss` returns the final values.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, overload

import yaml

__all__ = [
    "LOSS_FIELDS",
    "LOSS_PRESETS",
    "PRESET_DIR",
    "BlindEvalConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "GRPOConfig",
    "GRPOSection",
    "LossSettings",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "ReferenceConfig",
    "RolloutConfig",
    "SFTConfig",
    "SFTSection",
    "SyntheticConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "preset_names",
    "to_dict",
    "to_yaml",
]

PRESET_DIR = Path(__file__).resolve().parent / "configs"

Kind = Literal["grpo", "sft"]
Dtype = Literal["float32", "bfloat16"]
ModelInit = Literal["pretrained", "tiny"]
Remat = Literal["none", "full", "dots"]
LossPreset = Literal["grpo", "dapo", "dr_grpo", "gspo"]
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLEstimator = Literal["k1", "k2", "k3"]
RatioLevel = Literal["token", "sequence"]
OptionOrder = Literal["shuffled", "canonical"]
AdvantageKind = Literal["grpo", "dr_grpo"]
Schedule = Literal["constant", "cosine"]
SFTTarget = Literal["format_only", "rationale"]


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the full dotted key it is about ("" for the whole file)."""

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        self.detail = detail
        super().__init__(f"{key}: {detail}" if key else detail)

    def under(self, prefix: str) -> ConfigError:
        """The same error with the key prefixed by the section it was found in."""
        return ConfigError(_join(prefix, self.key), self.detail)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else prefix or key


def _field(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with numeric bounds, checked on construction (None values are not bounded)."""
    bounds = {op: v for op, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, metadata={"bounds": bounds})


# ----------------------------------------------------------------------------------------------------
# Type checking and coercion from plain (YAML) values
# ----------------------------------------------------------------------------------------------------

_BOUNDS = {
    "ge": (">=", operator.ge),
    "gt": (">", operator.gt),
    "le": ("<=", operator.le),
    "lt": ("<", operator.lt),
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _describe(tp: Any) -> str:
    """What a type accepts, in words, for error messages."""
    if _is_union(tp):
        args = get_args(tp)
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        inner = _describe(get_args(tp)[0])
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s"
    if get_origin(tp) is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    shown = "null" if value is None else repr(value)
    return ConfigError(key, f"got {shown}; expected {expected}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the type hint ``tp``; return it normalised (int -> float, list -> tuple)."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _bad(key, value, _describe(tp))
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(key, value, options[0])
        for option in options:
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise _bad(key, value, _describe(tp))
    if get_origin(tp) is Literal:
        if isinstance(value, str) and value in get_args(tp):
            return value
        raise _bad(key, value, _describe(tp))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key)
    if get_origin(tp) is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise _bad(key, value, _describe(tp))
        item_type = get_args(tp)[0]
        return tuple(_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value))
    if get_origin(tp) is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _bad(key, value, "a mapping with string keys")
        return {k: _plain(v) for k, v in value.items()}
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"{key}: unsupported config type {tp!r}")
    if not ok:
        raise _bad(key, value, _describe(tp))
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise _bad(key, value, "a finite number")
    return value


def _check_field(key: str, value: Any, tp: Any, field: dataclasses.Field) -> Any:
    value = _coerce(key, value, tp)
    bounds = field.metadata.get("bounds", {})
    if value is not None and bounds and not all(_BOUNDS[op][1](value, lim) for op, lim in bounds.items()):
        kind = "an integer" if isinstance(value, int) else "a number"
        conds = " and ".join(f"{_BOUNDS[op][0]} {lim:g}" for op, lim in bounds.items())
        raise _bad(key, value, f"{kind} {conds}")
    return value


def _build(cls: type, data: Any, path: str) -> Any:
    """Construct dataclass ``cls`` from a mapping, reporting problems with full dotted keys."""
    names = [f.name for f in dataclasses.fields(cls)]
    where = f"under {path}" if path else "at the top level"
    if not isinstance(data, Mapping):
        raise _bad(path, data, f"a mapping with keys {names}")
    for key in data:
        if key not in names:
            raise ConfigError(_join(path, str(key)), f"unknown key; valid keys {where}: {names}")
    hints = _hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        key = _join(path, field.name)
        if field.name in data:
            kwargs[field.name] = _check_field(key, data[field.name], hints[field.name], field)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "required; no default")
    try:
        return cls(**kwargs)
    except ConfigError as err:  # cross-field checks name keys relative to their section
        raise err.under(path) from None


def _plain(value: Any) -> Any:
    """Dataclasses -> dicts and tuples -> lists, recursively (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _Section:
    """Base of every config dataclass: checks types and bounds on construction, then `_check`."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _check_field(field.name, getattr(self, field.name), hints[field.name], field)
            object.__setattr__(self, field.name, value)
        self._check()

    def _check(self) -> None:
        """Cross-field checks; raise ConfigError with keys relative to this section."""


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
    """Which weights to start from, and how to run them."""

    hf_dir: str | None = None  # Hugging Face folder (local or gs://) to import; required for init=pretrained
    init: ModelInit = "pretrained"  # tiny: a tiny random Qwen2.5-VL + local tokenizer in WORKDIR/init_model
    # init=tiny: tiny_config overrides, e.g. {"text_config": {"num_hidden_layers": 3}, "vocab_size": 512}
    tiny: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: Dtype = "bfloat16"  # compute dtype
    param_dtype: Dtype = "float32"  # stored (master) weights; bf16 compute over fp32 weights as verl's FSDP
    remat: Remat = "none"  # activation checkpointing per decoder block
    min_pixels: int = _field(56 * 56, ge=28 * 28)  # image processor bounds (one LLM token per 28 x 28 px)
    max_pixels: int = _field(28 * 28 * 1280, ge=28 * 28)  # <= 1280 tokens per view

    def _check(self) -> None:
        if self.max_pixels < self.min_pixels:
            raise _bad("max_pixels", self.max_pixels, f"an integer >= min_pixels ({self.min_pixels})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticConfig(_Section):
    """Build the synthetic cross-scale set (data/synthetic.py) into WORKDIR/data before training."""

    n: int = _field(ge=1)  # questions (rounded up to a multiple of five: one triplet carries five)
    seed: int = 0
    image_size: int = _field(224, ge=28)  # rendered view size in px (the image processor resizes after)
    high_mag_missing_rate: float = _field(0.0, ge=0.0, le=1.0)  # the real set: about 0.07
    option_order: OptionOrder = "shuffled"  # canonical: a fixed option list, the letter names the views


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(_Section):
    """Where examples come from and how the Grain pipeline batches them."""

    dataset: str = "scale_vqa"  # a registered TFDS name or a built dataset version directory
    data_dir: str | None = None  # TFDS data_dir for a registered name
    train_split: str = "train"
    val_split: str = "val"
    synthetic: SyntheticConfig | None = None
    length_buckets: tuple[int, ...] = (1024, 2048, 3072, 4096, 5120)  # prompt padding sizes (one jit each)
    shuffle_options: bool = False  # augmentation: permute option texts and remap the answer
    worker_count: int = _field(0, ge=0)  # Grain worker processes (0: in the training process)
    seed: int = 0  # shuffling and option permutation

    def _check(self) -> None:
        b = self.length_buckets
        if not b or b[0] < 1 or any(x >= y for x, y in itertools.pairwise(b)):
            raise _bad(
                "length_buckets", list(b), "a non-empty, strictly increasing list of positive integers"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig(_Section):
    """Sampling of the G responses per prompt, and of validation answers."""

    group_size: int = _field(5, ge=2)  # responses per prompt (G); GRPO advantages need at least two
    prompts_per_step: int = _field(32, ge=1)
    max_new_tokens: int = _field(4096, ge=1)
    max_prompt_tokens: int = _field(5120, ge=1)
    temperature: float = _field(1.0, ge=0.0)
    top_p: float = _field(1.0, gt=0.0, le=1.0)
    top_k: int = _field(0, ge=0)  # 0: off
    stop_strings: tuple[str, ...] = ("</answer>",)  # besides the EOS token
    eval_greedy: bool = True
    eval_max_new_tokens: int | None = _field(None, ge=1)  # None: max_new_tokens

    def _check(self) -> None:
        if any(not s for s in self.stop_strings):
            raise _bad("stop_strings", list(self.stop_strings), "a list of non-empty strings")


# The loss fields a preset supplies; the same values as rl/grpo.py's LOSS_PRESETS (a test keeps them equal;
# this copy keeps config loading free of JAX).
LOSS_FIELDS = (
    "clip_low",
    "clip_high",
    "kl_coef",
    "kl_estimator",
    "loss_agg",
    "ratio_level",
    "advantage",
    "dynamic_filtering",
    "overlong_buffer",
    "overlong_penalty",
)
_GRPO_LOSS: dict[str, Any] = {
    "clip_low": 0.2,
    "clip_high": 0.2,
    "kl_coef": 0.01,
    "kl_estimator": "k3",
    "loss_agg": "token-mean",
    "ratio_level": "token",
    "advantage": "grpo",
    "dynamic_filtering": False,
    "overlong_buffer": 0,
    "overlong_penalty": 1.0,
}
LOSS_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe (ScaleReasoner-R1).
    "grpo": _GRPO_LOSS,
    # DAPO: clip-higher, no KL, drop groups whose rewards are all equal, soft overlong penalty over the
    # last `overlong_buffer` tokens (DAPO used 4,096 of 20,480; 1,024 suits 4,096-token responses).
    "dapo": {
        **_GRPO_LOSS,
        "clip_high": 0.28,
        "kl_coef": 0.0,
        "dynamic_filtering": True,
        "overlong_buffer": 1024,
    },
    # Dr.GRPO: advantages without std scaling; token sums divided by a constant (max_new_tokens).
    "dr_grpo": {**_GRPO_LOSS, "advantage": "dr_grpo", "loss_agg": "seq-mean-token-sum-norm"},
    # GSPO: one length-normalised ratio per sequence with the GSPO paper's clip range, no KL.
    "gspo": {
        **_GRPO_LOSS,
        "clip_low": 3e-4,
        "clip_high": 4e-4,
        "kl_coef": 0.0,
        "ratio_level": "sequence",
        "loss_agg": "seq-mean-token-mean",
    },
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSettings:
    """The final loss settings of a run: the preset's values with the explicitly set fields on top."""

    preset: str
    clip_low: float
    clip_high: float
    kl_coef: float
    kl_estimator: str
    loss_agg: str
    ratio_level: str
    advantage: str
    dynamic_filtering: bool
    overlong_buffer: int
    overlong_penalty: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOSection(_Section):
    """The policy update. Loss fields left at None take the value of `preset` (see LOSS_PRESETS)."""

    preset: LossPreset = "grpo"
    clip_low: float | None = _field(None, ge=0.0, lt=1.0)  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float | None = _field(None, ge=0.0)
    kl_coef: float | None = _field(None, ge=0.0)  # KL-to-reference loss coefficient (0: no reference)
    kl_estimator: KLEstimator | None = None  # k3: exp(d) - d - 1 with d = ref - policy log-prob
    loss_agg: LossAgg | None = None  # how token losses become one number
    ratio_level: RatioLevel | None = None  # sequence: GSPO
    advantage: AdvantageKind | None = None  # grpo: (r - mean) / (std + eps); dr_grpo: r - mean
    dynamic_filtering: bool | None = None  # drop groups whose rewards are all equal (DAPO)
    overlong_buffer: int | None = _field(None, ge=0)  # soft overlong penalty window in tokens (0: off)
    overlong_penalty: float | None = _field(None, ge=0.0)  # penalty at the hard limit
    advantage_eps: float = _field(1e-6, gt=0.0)  # added to the unbiased group std
    ppo_epochs: int = _field(1, ge=1)  # passes over each step's rollouts
    num_minibatches: int = _field(1, ge=1)  # optimizer updates per pass
    grad_accum: int = _field(1, ge=1)  # micro-batches per update: memory, not maths
    reward: str = "scale_vqa"  # a name in the reward registry (rl/rewards.py)
    reward_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _check(self) -> None:
        if not self.reward:
            raise _bad("reward", self.reward, "a reward registry name")

    def resolved_loss(self, presets: Mapping[str, Mapping[str, Any]] | None = None) -> LossSettings:
        """The preset's loss values (from ``presets``, default LOSS_PRESETS) overridden by set fields."""
        values = dict((presets if presets is not None else LOSS_PRESETS)[self.preset])
        values.update({k: getattr(self, k) for k in LOSS_FIELDS if getattr(self, k) is not None})
        return LossSettings(preset=self.preset, **{k: values[k] for k in LOSS_FIELDS})


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig(_Section):
    """AdamW with global-norm clipping and an optional warmup/cosine schedule."""

    lr: float = _field(1e-6, gt=0.0)
    weight_decay: float = _field(0.01, ge=0.0)
    clip_norm: float = _field(1.0, ge=0.0)  # global gradient norm (0: no clipping)
    b1: float = _field(0.9, ge=0.0, lt=1.0)
    b2: float = _field(0.999, ge=0.0, lt=1.0)
    eps: float = _field(1e-8, gt=0.0)
    warmup_steps: int = _field(0, ge=0)  # linear warmup from 0
    schedule: Schedule = "constant"  # after warmup; cosine decays to 0 at train.steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(_Section):
    """Loop length, seeds and periodic work."""

    steps: int = _field(500, ge=0)
    seed: int = 0  # parameter init (tiny), sampling and dropout RNG
    log_every: int = _field(1, ge=1)
    eval_every: int = _field(0, ge=0)  # 0: off
    eval_examples: int | None = _field(None, ge=1)  # None: the whole validation split
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig(_Section):
    """Orbax checkpoints (params, optimizer, step, RNG, data iterator) under WORKDIR/checkpoints."""

    every: int = _field(50, ge=0)  # steps between saves (0: no periodic saves)
    keep: int = _field(3, ge=1)  # most recent checkpoints kept
    async_save: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig(_Section):
    """Device mesh (parallel.make_mesh): -1 fills an axis with the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def _check(self) -> None:
        for name in ("data", "fsdp", "tensor"):
            size = getattr(self, name)
            if size != -1 and size < 1:
                raise _bad(name, size, "a positive size or -1 (fill with the remaining devices)")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ConfigError(
                "", f"at most one axis may be -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReferenceConfig(_Section):
    """The frozen reference policy for the KL term."""

    offload_to_host: bool = False  # keep its weights in host memory between uses


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlindEvalConfig(_Section):
    """Validation without the images: how much a checkpoint answers from text alone."""

    every: int = _field(0, ge=0)  # 0: off
    examples: int | None = _field(None, ge=1)  # None: the whole validation split


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTSection(_Section):
    """Supervised fine-tuning: LoRA or full, on a format-only or rationale target."""

    lora_rank: int = _field(0, ge=0)  # 0: full fine-tune
    lora_alpha: float = _field(16.0, gt=0.0)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    batch_size: int = _field(32, ge=1)  # examples per optimizer step
    max_prompt_tokens: int = _field(5120, ge=1)
    max_target_tokens: int = _field(512, ge=1)
    # format_only: <think>...</think><answer>X</answer> with X a random option letter (teaches the
    # format, not the task); rationale: <think>{rationale}</think><answer>{key}</answer>.
    target: SFTTarget = "rationale"
    epochs: int | None = _field(None, ge=1)  # passes over the data (None: repeat until train.steps)

    def _check(self) -> None:
        if self.lora_rank > 0 and not self.lora_targets:
            raise _bad("lora_targets", [], "at least one module name when lora_rank > 0")


# ----------------------------------------------------------------------------------------------------
# Roots
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(_Section):
    """A GRPO (or DAPO / Dr.GRPO / GSPO) run."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    blind_eval: BlindEvalConfig = dataclasses.field(default_factory=BlindEvalConfig)

    def _check(self) -> None:
        loss = self.grpo.resolved_loss()
        if loss.overlong_buffer > self.rollout.max_new_tokens:
            origin = "" if self.grpo.overlong_buffer is not None else f" (from preset {loss.preset!r})"
            raise ConfigError(
                "grpo.overlong_buffer",
                f"got {loss.overlong_buffer}{origin}; expected an integer <= rollout.max_new_tokens "
                f"({self.rollout.max_new_tokens})",
            )
        batch = self.rollout.prompts_per_step * self.rollout.group_size
        if batch % self.grpo.num_minibatches:
            raise _bad(
                "grpo.num_minibatches",
                self.grpo.num_minibatches,
                f"a divisor of prompts_per_step x group_size ({batch})",
            )
        minibatch = batch // self.grpo.num_minibatches
        if minibatch % self.grpo.grad_accum:
            raise _bad(
                "grpo.grad_accum", self.grpo.grad_accum, f"a divisor of the minibatch size ({minibatch})"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(_Section):
    """A supervised fine-tuning run."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sft: SFTSection = dataclasses.field(default_factory=SFTSection)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


_ROOTS: dict[str, type] = {"grpo": GRPOConfig, "sft": SFTConfig}
_OTHER_KIND_SECTIONS = {"grpo": ("sft",), "sft": ("rollout", "grpo", "reference", "blind_eval")}


# ----------------------------------------------------------------------------------------------------
# YAML with YAML 1.2 scalars (PyYAML is 1.1: `1e-6` would be a string, `no` a boolean, `010` octal)
# ----------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """Quotes exactly the strings that _Loader would read as something else."""


_Dumper.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(where, f"invalid YAML: {err}") from None


def preset_names() -> list[str]:
    """The presets shipped in scalereasoner_jax/configs/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _locate(name_or_path: str | Path, base_dir: Path | None = None) -> Path:
    """A preset name (no suffix, no slash) or a YAML path (relative to ``base_dir`` when given)."""
    text = str(name_or_path)
    looks_like_path = text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if path.is_file():
            return path.resolve()
        raise ConfigError("", f"config file not found: {path}")
    path = PRESET_DIR / f"{text}.yaml"
    if path.is_file():
        return path
    raise ConfigError("", f"unknown preset {text!r}; presets: {preset_names()} (or give a .yaml path)")


def _merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge; the child wins. Mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file and whatever it `extends`, merged."""
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise ConfigError("extends", f"cycle: {cycle}")
    data = _parse_yaml(path.read_text(), "")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("", f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise _bad("extends", parent, "a preset name or a .yaml path")
    return _merge(_read(_locate(parent, path.parent), (*chain, path)), data)


def _schema_at(root: type, parts: Sequence[str], key: str) -> None:
    """Check that dotted ``parts`` name a field of ``root`` (or something inside a dict field)."""
    tp: Any = root
    for i, part in enumerate(parts):
        if _is_union(tp):  # e.g. `SyntheticConfig | None`
            tp = next((a for a in get_args(tp) if dataclasses.is_dataclass(a)), tp)
        here = ".".join(parts[:i])
        if get_origin(tp) is dict or tp is Any:
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(key, f"{here} is a value ({_describe(tp)}), not a section")
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            where = f"under {here}" if here else "at the top level"
            raise ConfigError(key, f"unknown key {part!r}; valid keys {where}: {names}")
        tp = _hints(tp)[part]


def _apply_override(root: type, raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(parts):
        raise ConfigError("", f"override {override!r} is not of the form key.sub=value")
    _schema_at(root, parts, key)
    value = _parse_yaml(text, key)
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, Mapping):  # absent or null (e.g. data.synthetic): start an empty section
            child = {}
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value


def _check_runnable(config: Any) -> None:
    """Checks that only make sense for a config about to run (direct construction skips them)."""
    model = config.model
    if model.init == "pretrained" and not model.hf_dir:
        raise ConfigError("model.hf_dir", "required when model.init is 'pretrained' (or set model.init=tiny)")


@overload
def from_dict(data: Mapping[str, Any], *, kind: Literal["grpo"]) -> GRPOConfig: ...
@overload
def from_dict(data: Mapping[str, Any], *, kind: Literal["sft"]) -> SFTConfig: ...
def from_dict(data: Mapping[str, Any], *, kind: Kind) -> GRPOConfig | SFTConfig:
    """Build and check a config from plain values (e.g. ``to_dict`` output read back from a checkpoint)."""
    if kind not in _ROOTS:
        raise ValueError(f"kind must be one of {list(_ROOTS)}, got {kind!r}")
    if not isinstance(data, Mapping):
        raise _bad("", data, "a mapping")
    for section in _OTHER_KIND_SECTIONS[kind]:
        if section in data:
            other = "sft" if kind == "grpo" else "grpo"
            raise ConfigError(
                section, f"belongs to {other} configs, not {kind}; load this one with kind={other!r}"
            )
    config = _build(_ROOTS[kind], data, "")
    _check_runnable(config)
    return config


@overload
def load_config(
    name_or_path: str | Path, overrides: Sequence[str] = (), *, kind: Literal["grpo"]
) -> GRPOConfig: ...
@overload
def load_config(
    name_or_path: str | Path, overrides: Sequence[str] = (), *, kind: Literal["sft"]
) -> SFTConfig: ...
def load_config(
    name_or_path: str | Path, overrides: Sequence[str] = (), *, kind: Kind
) -> GRPOConfig | SFTConfig:
    """Load a preset (``grpo_tiny_cpu``) or YAML file, apply ``key.sub=value`` overrides, check it all.

    Raises ConfigError (a ValueError) naming the dotted key, the value and what is allowed.
    """
    if kind not in _ROOTS:
        raise ValueError(f"kind must be one of {list(_ROOTS)}, got {kind!r}")
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    raw = _read(_locate(name_or_path))
    for override in overrides:
        _apply_override(_ROOTS[kind], raw, override)
    return from_dict(raw, kind=kind)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dicts/lists of a config (for logs and checkpoint metadata); ``from_dict`` reverses it."""
    return _plain(config)


def to_yaml(config: Any) -> str:
    """The config as YAML that ``load_config`` reads back to an equal config."""
    return yaml.dump(to_dict(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
