"""Export: Orbax checkpoint -> HF folder, gated by logits against transformers.

Two real tiny SFT runs (full fine-tuning and LoRA, one step each on the 8-device mesh) are shared by the
module; a GRPO-layout checkpoint (params + AdamW state, sharded over 8 devices) is written directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from scalereasoner_jax import export as export_mod
from scalereasoner_jax.cli import main as cli_main
from scalereasoner_jax.config import load_config, to_dict
from scalereasoner_jax.export import (
    CARD_MARKER,
    ExportError,
    export_checkpoint,
    parse_size,
    restore_checkpoint,
    verify_export,
)
from scalereasoner_jax.models.qwen2_5_vl import from_pretrained
from scalereasoner_jax.models.qwen2_5_vl.parity import probe_images, processed_prompt
from scalereasoner_jax.train.checkpoint import Checkpointer
from scalereasoner_jax.train.sft import SFTTrainer

PATCHES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "patches"
FAST_SFT = [
    "data.synthetic.n=10",
    "sft.batch_size=2",
    "sft.max_target_tokens=16",
    "train.steps=1",
    "train.eval_every=0",
    "train.tensorboard=false",
    "checkpoint.every=1",
]


def _train_sft(workdir: Path, *extra: str) -> SFTTrainer:
    trainer = SFTTrainer(load_config("sft_tiny_cpu", [*FAST_SFT, *extra], kind="sft"), workdir)
    metrics = trainer.train_step()
    trainer.save(force=True, metrics=metrics)
    trainer.checkpointer.wait()
    return trainer


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory):
    trainer = _train_sft(tmp_path_factory.mktemp("sft_full"), "optim.lr=1e-2")
    yield trainer
    trainer.close()


@pytest.fixture(scope="module")
def sft_export(sft_run: SFTTrainer, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("export") / "hf"
    return export_checkpoint(sft_run.workdir, out=out), out  # --base defaults to WORKDIR/init_model


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory):
    trainer = _train_sft(
        tmp_path_factory.mktemp("sft_lora"), "sft.lora_rank=4", "sft.lora_alpha=8", "optim.lr=5e-2"
    )
    yield trainer
    trainer.close()


@pytest.fixture(scope="module")
def probe() -> list:
    """The real 5x/10x/20x patches of ../shared/data when present, else generated images."""
    from PIL import Image

    patches = sorted(PATCHES_DIR.glob("*.png")) if PATCHES_DIR.is_dir() else []
    return [Image.open(p).convert("RGB") for p in patches] or probe_images()


def _hf_logits(hf_dir: Path, inputs: dict) -> np.ndarray:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**inputs).logits.numpy()


def _our_logits(trainer: SFTTrainer, inputs: dict) -> np.ndarray:
    model = nnx.merge(trainer.graphdef, trainer.params())  # the trained weights, as sharded in training
    return np.asarray(model(**inputs).logits)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def test_full_sft_round_trip_and_folder(sft_run: SFTTrainer, sft_export, probe) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    report, out = sft_export
    assert report.passed and report.kind == "sft" and report.step == 1, report.summary()
    assert report.parity.max_rel_diff < 1e-5 and report.tensors.n_tensors > 50

    # Independently of the gate: transformers on OUT equals the trainer's own (8-device) weights, on the
    # real patches, and training moved the logits away from the starting model's.
    inputs = processed_prompt(out, probe, "Which magnification shows the nuclei?")
    hf = _hf_logits(out, inputs)
    ours = _our_logits(sft_run, inputs)
    assert _rel(hf, ours) < 1e-5
    assert _rel(hf, _hf_logits(sft_run.hf_dir, inputs)) > 1e-3

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors.index.json", "config.json", "README.md", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= names
    assert "generation_config.json" in names and "model.safetensors" not in names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {p.name for p in out.glob("model-*.safetensors")} == set(index["weight_map"].values())

    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("library_name: transformers", "pipeline_tag: image-text-to-text", "- sft"):
        assert line in front, line
    assert CARD_MARKER in card and "## Export parity gate: passed" in card and "FAILED" not in card
    assert (
        "step 1 (of 1) of a full SFT run" in card
        and "lora_rank: 0" in card
        and f"{report.parity.max_rel_diff:.3e}" in card
    )

    AutoModelForImageTextToText.from_pretrained(str(out))
    assert AutoProcessor.from_pretrained(str(out)).tokenizer.chat_template


def test_gate_fails_on_a_tampered_tensor(sft_run: SFTTrainer, sft_export, tmp_path: Path) -> None:
    _, out = sft_export
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    shard = next(tampered.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name] + np.float32(0.05)
    save_file(tensors, str(shard), metadata={"format": "pt"})

    report = verify_export(tampered, sft_run.workdir)  # the gate alone, restoring the checkpoint again
    assert not report.passed and not report.parity.passed, report.summary()
    assert [m.split(":")[0] for m in report.tensors.mismatched] == [name]
    # The untampered folder passes against the trainer's own (8-device) parameters too.
    assert verify_export(out, sft_run.params(), base=sft_run.hf_dir).passed


def test_cli_exits_1_and_marks_the_card_when_the_gate_fails(sft_run, tmp_path, monkeypatch, capsys) -> None:
    real_save = export_mod.save_pretrained

    def broken_save(model, out, **kw):  # a conversion bug: one weight written wrong
        path = real_save(model, out, **kw)
        shard = next(Path(out).glob("model-*.safetensors"))
        tensors = load_file(str(shard))
        tensors["lm_head.weight"] = tensors["lm_head.weight"] * np.float32(1.5)
        save_file(tensors, str(shard), metadata={"format": "pt"})
        return path

    monkeypatch.setattr(export_mod, "save_pretrained", broken_save)
    out = tmp_path / "hf"
    assert cli_main(["export", "--checkpoint", str(sft_run.workdir / "checkpoints"), "--out", str(out)]) == 1
    assert "failed its parity gate" in capsys.readouterr().err
    card = (out / "README.md").read_text()
    assert "Parity gate FAILED" in card and "gate: passed" not in card and "unverified-export" in card


def test_lora_export_merges_the_factors(lora_run: SFTTrainer, tmp_path: Path, probe) -> None:
    report = export_checkpoint(lora_run.workdir, base=lora_run.hf_dir, out=tmp_path / "hf")
    assert report.passed and report.kind == "sft-lora", report.summary()
    inputs = processed_prompt(tmp_path / "hf", probe[:1], "Describe the tissue.")
    hf = _hf_logits(tmp_path / "hf", inputs)
    assert _rel(hf, _our_logits(lora_run, inputs)) < 1e-5  # equal to the merged model
    assert _rel(hf, _hf_logits(lora_run.hf_dir, inputs)) > 1e-4  # and not the base
    exported = load_file(str(next((tmp_path / "hf").glob("model-*.safetensors"))))
    base = load_file(str(lora_run.hf_dir / "model.safetensors"))
    changed = {k for k in base if not np.array_equal(base[k], exported[k])}
    assert changed and all(".self_attn." in k and k.endswith("_proj.weight") for k in changed), changed
    assert "- lora" in (tmp_path / "hf" / "README.md").read_text()


def test_grpo_checkpoint_from_8_devices_restores_on_one(sft_run: SFTTrainer, tmp_path: Path) -> None:
    """A GRPO-layout state (params, AdamW state, step, RNG) saved sharded over 8 devices; exported from
    its step directory with CLI flags, bf16, small shards."""
    workdir = tmp_path / "grpo"
    shutil.copytree(sft_run.hf_dir, workdir / "init_model")
    model = from_pretrained(workdir / "init_model", mesh=sft_run.mesh)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    noise = jax.jit(  # one program for all leaves: "trained" weights, each leaf moved differently
        lambda xs: [
            x + 0.01 * jax.random.normal(jax.random.key(i), x.shape, x.dtype) for i, x in enumerate(xs)
        ]
    )
    params = jax.tree.unflatten(treedef, noise(leaves))
    assert len(jax.tree.leaves(params)[0].sharding.device_set) == 8
    state = {
        "params": params,
        "opt_state": jax.jit(optax.adamw(1e-3).init)(params),
        "step": jnp.asarray(7),
        "rng": jax.random.key(1),
    }
    config = to_dict(load_config("grpo_tiny_cpu", kind="grpo"))
    with Checkpointer(workdir / "checkpoints", every=1) as ckpt:
        ckpt.save(
            7, state, {"next_index": 0}, {"config": config, "metrics": {"reward_mean": 0.5}}, force=True
        )

    out = tmp_path / "hf"
    flags = ["--checkpoint", str(workdir / "checkpoints" / "7"), "--out", str(out), "--dtype", "bfloat16"]
    assert cli_main(["export", *flags, "--max_shard_size", "300KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "- grpo" in (out / "README.md").read_text()
    # Written again over the previous export; float32 this time, bit-exact against the saved params.
    report = export_checkpoint(workdir, out=out, step=7)
    assert report.passed and report.kind == "grpo" and report.n_shards == 1
    exported = load_file(str(out / "model-00001-of-00001.safetensors"))
    q = np.asarray(params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value())
    np.testing.assert_array_equal(exported["model.layers.0.self_attn.q_proj.weight"], q.T)


def test_clear_errors(sft_run: SFTTrainer, tmp_path: Path) -> None:
    workdir = sft_run.workdir
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no checkpoint in"):
        restore_checkpoint(tmp_path / "empty")
    with pytest.raises(ExportError, match=r"no checkpoint step 5 .* committed steps: \[1\]"):
        restore_checkpoint(workdir, step=5)

    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(sft_run.hf_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"no_tokenizer lacks a tokenizer"):
        restore_checkpoint(workdir, base=no_tok)

    other = tmp_path / "other_arch"
    shutil.copytree(sft_run.hf_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"does not match the architecture(.|\n)*mlp.*down_proj"):
        restore_checkpoint(workdir, base=other)

    (tmp_path / "busy" / "notes.txt").parent.mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match="not empty and not a previous export"):
        export_checkpoint(workdir, out=tmp_path / "busy")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 * 2**30 and parse_size(123) == 123


def test_restore_is_partial_and_on_one_device(sft_run: SFTTrainer) -> None:
    restored = restore_checkpoint(sft_run.workdir / "checkpoints")
    leaves = jax.tree.leaves(nnx.state(restored.model, nnx.Param))
    assert {d for x in leaves for d in x.sharding.device_set} == {jax.devices("cpu")[0]}
    assert isinstance(leaves[0].sharding, NamedSharding) and leaves[0].sharding.spec == PartitionSpec()
    trained = dict(nnx.to_flat_state(sft_run.params()))
    for path, var in nnx.to_flat_state(nnx.state(restored.model, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(trained[path].get_value()))
