"""Config presets, overrides and validation: everything a run is checked for before it starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from scalereasoner_jax.config import (
    LOSS_PRESETS,
    ConfigError,
    GRPOConfig,
    GRPOSection,
    MeshConfig,
    RolloutConfig,
    SFTConfig,
    from_dict,
    load_config,
    preset_names,
    to_dict,
    to_yaml,
)


def _kind(name: str) -> str:
    return "sft" if name.startswith("sft") else "grpo"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_four_presets_ship():
    assert set(preset_names()) >= {"grpo_scale_vqa_7b", "grpo_tiny_cpu", "sft_scale_vqa_7b", "sft_tiny_cpu"}


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips(name, tmp_path):
    kind = _kind(name)
    config = load_config(name, kind=kind)
    assert isinstance(config, GRPOConfig if kind == "grpo" else SFTConfig)
    # to_dict -> from_dict gives an equal config; so does YAML written by to_yaml and read back.
    assert from_dict(to_dict(config), kind=kind) == config
    assert load_config(_write(tmp_path / "dumped.yaml", to_yaml(config)), kind=kind) == config


def test_7b_preset_is_the_papers_recipe():
    """DESIGN.md §3: the ScaleReasoner-R1 GRPO recipe."""
    c = load_config("grpo_scale_vqa_7b", kind="grpo")
    assert (c.rollout.prompts_per_step, c.rollout.group_size) == (32, 5)
    assert (c.grpo.ppo_epochs, c.grpo.num_minibatches) == (1, 1)  # one optimizer update per step
    assert c.train.steps == 500
    assert (c.rollout.max_prompt_tokens, c.rollout.max_new_tokens) == (5120, 4096)
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (1.0, 1.0, 0)
    assert c.rollout.eval_greedy
    loss = c.grpo.resolved_loss()
    assert (loss.clip_low, loss.clip_high) == (0.2, 0.2)
    assert (loss.kl_estimator, loss.kl_coef) == ("k3", 0.01)
    assert (loss.loss_agg, loss.ratio_level, loss.advantage) == ("token-mean", "token", "grpo")
    assert not loss.dynamic_filtering and loss.overlong_buffer == 0
    assert c.grpo.advantage_eps == 1e-6
    assert c.grpo.reward == "scale_vqa"
    o = c.optim
    assert (o.lr, o.schedule, o.warmup_steps, o.weight_decay, o.clip_norm) == (1e-6, "constant", 0, 0.01, 1.0)
    assert c.model.dtype == "bfloat16" and c.model.remat == "full"
    assert (c.checkpoint.every, c.checkpoint.keep) == (50, 3)
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (1, -1, 1)
    assert c.data.val_split == "val" and max(c.data.length_buckets) == c.rollout.max_prompt_tokens


def test_tiny_presets_use_the_tiny_model_and_synthetic_data():
    for name, kind in (("grpo_tiny_cpu", "grpo"), ("sft_tiny_cpu", "sft")):
        c = load_config(name, kind=kind)
        assert c.model.init == "tiny" and c.model.dtype == "float32"
        assert (c.model.min_pixels, c.model.max_pixels) == (56 * 56, 112 * 112)
        assert c.data.synthetic is not None and c.data.synthetic.n == 600
    sft = load_config("sft_tiny_cpu", kind="sft")
    assert sft.sft.target == "format_only"
    assert load_config("sft_scale_vqa_7b", kind="sft").sft.target == "rationale"


def test_overrides_apply_with_yaml_types():
    c = load_config(
        "grpo_tiny_cpu",
        [
            "train.steps=4",
            "rollout.temperature=0.7",
            "optim.lr=1e-6",  # YAML 1.2 float (PyYAML alone reads this as a string)
            "optim.weight_decay=0",  # an int is fine for a float field
            "mesh.fsdp=-1",
            "mesh.data=1",
            "train.tensorboard=false",
            'rollout.stop_strings=["</answer>", "<|im_end|>"]',
            "model.hf_dir=null",
            "train.eval_examples=null",
            "data.synthetic.n=50",
            "model.tiny.text_config.num_hidden_layers=3",
            "grpo.reward_kwargs={letters: ABCD}",
        ],
        kind="grpo",
    )
    assert c.train.steps == 4 and isinstance(c.train.steps, int)
    assert c.rollout.temperature == 0.7
    assert c.optim.lr == 1e-6
    assert c.optim.weight_decay == 0.0 and isinstance(c.optim.weight_decay, float)
    assert c.mesh.fsdp == -1
    assert c.train.tensorboard is False
    assert c.rollout.stop_strings == ("</answer>", "<|im_end|>")
    assert c.model.hf_dir is None and c.train.eval_examples is None
    assert c.data.synthetic.n == 50 and c.data.synthetic.seed == 0  # the rest of the section stays
    assert c.model.tiny == {"text_config": {"num_hidden_layers": 3}}
    assert c.grpo.reward_kwargs == {"letters": "ABCD"}


def test_override_creates_a_null_section():
    c = load_config("grpo_scale_vqa_7b", ["data.synthetic.n=20", "data.synthetic.seed=3"], kind="grpo")
    assert (c.data.synthetic.n, c.data.synthetic.seed) == (20, 3)
    with pytest.raises(ConfigError, match=r"^data\.synthetic\.n: required"):
        load_config("grpo_scale_vqa_7b", ["data.synthetic.seed=3"], kind="grpo")  # n has no default


@pytest.mark.parametrize(
    ("override", "key", "says"),
    [
        ("train.stepz=4", "train.stepz", "valid keys under train: ['steps'"),
        ("trian.steps=4", "trian.steps", "valid keys at the top level: ['model'"),
        ("data.synthetic.size=4", "data.synthetic.size", "valid keys under data.synthetic: ['n', 'seed'"),
        ("train.steps.max=4", "train.steps.max", "train.steps is a value"),
    ],
)
def test_unknown_override_keys_name_the_dotted_key(override, key, says):
    with pytest.raises(ConfigError) as err:
        load_config("grpo_tiny_cpu", [override], kind="grpo")
    assert err.value.key == key
    assert says in str(err.value)


def test_unknown_yaml_keys_name_the_dotted_key(tmp_path):
    path = _write(tmp_path / "bad.yaml", "extends: grpo_tiny_cpu\nrollout:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, kind="grpo")
    assert err.value.key == "rollout.temprature"
    assert "valid keys under rollout:" in str(err.value) and "'temperature'" in str(err.value)
    path = _write(tmp_path / "bad_top.yaml", "extends: grpo_tiny_cpu\noptimizer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^optimizer: unknown key; valid keys at the top level"):
        load_config(path, kind="grpo")


@pytest.mark.parametrize(
    ("override", "key", "says"),
    [
        ("train.steps=abc", "train.steps", "got 'abc'; expected an integer"),
        ("train.steps=4.0", "train.steps", "got 4.0; expected an integer"),
        ("train.steps=-1", "train.steps", "got -1; expected an integer >= 0"),
        ("train.steps=true", "train.steps", "expected an integer"),
        ("optim.clip_norm=-0.5", "optim.clip_norm", "got -0.5; expected a number >= 0"),
        ("optim.lr=0", "optim.lr", "expected a number > 0"),
        ("rollout.top_p=1.5", "rollout.top_p", "got 1.5; expected a number > 0 and <= 1"),
        ("rollout.top_p=0", "rollout.top_p", "expected a number > 0 and <= 1"),
        ("rollout.group_size=1", "rollout.group_size", "got 1; expected an integer >= 2"),
        ("grpo.loss_agg=foo", "grpo.loss_agg", "got 'foo'; expected one of 'token-mean'"),
        ("grpo.preset=ppo", "grpo.preset", "expected one of 'grpo', 'dapo', 'dr_grpo', 'gspo'"),
        ("model.dtype=float8", "model.dtype", "got 'float8'; expected one of 'float32', 'bfloat16'"),
        ("model.remat=yes", "model.remat", "expected one of 'none', 'full', 'dots'"),
        ("train.tensorboard=yes", "train.tensorboard", "expected true or false"),
        ("rollout.stop_strings=</answer>", "rollout.stop_strings", "expected a list of strings"),
        ("data.length_buckets=[512, 256]", "data.length_buckets", "strictly increasing"),
        ("model.max_pixels=1000", "model.max_pixels", ">= min_pixels"),
        ("mesh.data=0", "mesh.data", "a positive size or -1"),
        ("mesh.data=-1", "mesh", "at most one axis may be -1"),
        ("grpo.num_minibatches=3", "grpo.num_minibatches", "a divisor of prompts_per_step x group_size (32)"),
        ("grpo.preset=dapo", "grpo.overlong_buffer", "1024 (from preset 'dapo')"),
        ("model.init=pretrained", "model.hf_dir", "required when model.init is 'pretrained'"),
        ("optim.lr=.nan", "optim.lr", "expected a finite number"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(override, key, says):
    with pytest.raises(ConfigError) as err:
        load_config("grpo_tiny_cpu", [override], kind="grpo")
    assert err.value.key == key
    assert says in str(err.value)
    assert str(err.value).startswith(f"{key}: ")


def test_malformed_overrides_and_sources(tmp_path):
    with pytest.raises(ConfigError, match=r"not of the form key\.sub=value"):
        load_config("grpo_tiny_cpu", ["train.steps"], kind="grpo")
    with pytest.raises(ConfigError, match="unknown preset 'grpo_huge'"):
        load_config("grpo_huge", kind="grpo")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml", kind="grpo")
    with pytest.raises(TypeError):
        load_config("grpo_tiny_cpu", "train.steps=4", kind="grpo")  # type: ignore[arg-type]


def test_kind_mismatch_is_explained():
    with pytest.raises(
        ConfigError, match=r"^sft: belongs to sft configs, not grpo; load this one with kind='sft'"
    ):
        load_config("sft_tiny_cpu", kind="grpo")
    with pytest.raises(ConfigError, match="kind='grpo'"):
        load_config("grpo_tiny_cpu", kind="sft")


def test_extends_merges_and_the_child_wins(tmp_path):
    base = _write(tmp_path / "base.yaml", "extends: grpo_tiny_cpu\ntrain:\n  steps: 7\n  seed: 5\n")
    (tmp_path / "sub").mkdir()
    child = _write(
        tmp_path / "sub" / "child.yaml",
        "extends: ../base.yaml\ntrain:\n  steps: 9\ndata:\n  synthetic:\n    n: 40\n",
    )
    c = load_config(child, kind="grpo")
    tiny = load_config("grpo_tiny_cpu", kind="grpo")
    assert c.train.steps == 9  # child over parent
    assert c.train.seed == 5  # parent over grandparent, merged key by key
    assert c.data.synthetic.n == 40 and c.data.synthetic.seed == tiny.data.synthetic.seed
    assert c.rollout == tiny.rollout  # untouched sections come from the preset
    # Overrides win over every file.
    assert load_config(child, ["train.steps=3"], kind="grpo").train.steps == 3
    assert load_config(base, kind="grpo").train.steps == 7


def test_extends_cycle_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", "extends: b.yaml\n")
    _write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"extends: cycle: a.yaml -> b.yaml -> a.yaml"):
        load_config(tmp_path / "a.yaml", kind="grpo")


def test_loss_presets_supply_defaults_and_set_fields_win():
    assert set(LOSS_PRESETS) == {"grpo", "dapo", "dr_grpo", "gspo"}
    dapo = load_config("grpo_tiny_cpu", ["grpo.preset=dapo", "grpo.overlong_buffer=8"], kind="grpo")
    loss = dapo.grpo.resolved_loss()
    assert (loss.preset, loss.clip_high, loss.dynamic_filtering, loss.overlong_buffer) == (
        "dapo",
        0.28,
        True,
        8,
    )
    assert loss.kl_coef == 0.001  # set in grpo_tiny_cpu.yaml, so it wins over the preset
    gspo = GRPOSection(preset="gspo", clip_high=0.01).resolved_loss()
    assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high) == ("sequence", 3e-4, 0.01)
    dr = GRPOSection(preset="dr_grpo").resolved_loss()
    assert (dr.advantage, dr.loss_agg) == ("dr_grpo", "seq-mean-token-sum-norm")
    # The 7B preset leaves the loss to its preset, so switching the preset switches the loss.
    seven = load_config("grpo_scale_vqa_7b", ["grpo.preset=dapo"], kind="grpo").grpo.resolved_loss()
    assert (seven.clip_high, seven.dynamic_filtering) == (0.28, True)
    # A caller (rl/grpo.py) may pass its own table.
    assert GRPOSection().resolved_loss({"grpo": {**LOSS_PRESETS["grpo"], "kl_coef": 0.5}}).kl_coef == 0.5


def test_direct_construction_is_checked_and_frozen():
    with pytest.raises(ConfigError, match=r"^group_size: got 1; expected an integer >= 2"):
        RolloutConfig(group_size=1)
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        MeshConfig(data=-1)
    config = GRPOConfig()
    assert RolloutConfig(stop_strings=["a"]).stop_strings == ("a",)  # lists normalised to tuples
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.steps = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"^rollout.top_k: got -2"):
        from_dict({"model": {"init": "tiny"}, "rollout": {"top_k": -2}}, kind="grpo")


def test_to_dict_is_plain_and_round_trips():
    config = load_config("grpo_tiny_cpu", ["rollout.stop_strings=[a, b]"], kind="grpo")
    d = to_dict(config)
    assert d["rollout"]["stop_strings"] == ["a", "b"] and d["data"]["length_buckets"] == [512, 640, 768]
    assert d["data"]["synthetic"] == {
        "n": 600,
        "seed": 0,
        "image_size": 224,
        "high_mag_missing_rate": 0.0,
        "option_order": "shuffled",
    }
    assert from_dict(d, kind="grpo") == config
    sft = load_config("sft_scale_vqa_7b", kind="sft")
    assert from_dict(to_dict(sft), kind="sft") == sft


def test_loss_presets_match_rl_grpo():
    """config.LOSS_PRESETS is a JAX-free copy of rl/grpo.py's table: keep the two equal."""
    grpo = pytest.importorskip("scalereasoner_jax.rl.grpo")
    renamed = {"dynamic_filtering": "dynamic_filter"}
    assert set(grpo.LOSS_PRESETS) == set(LOSS_PRESETS)
    for name, values in LOSS_PRESETS.items():
        theirs = grpo.LOSS_PRESETS[name]
        assert {k: getattr(theirs, renamed.get(k, k)) for k in values} == values, name
    assert GRPOSection().advantage_eps == grpo.LossConfig().advantage_eps
