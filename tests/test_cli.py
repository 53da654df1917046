"""The `scalereasoner` console command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from scalereasoner_jax.cli import main

PATCHES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "patches"


def test_parity_command_passes_on_a_good_folder(tiny_hf_dir):
    images = [str(p) for p in sorted(PATCHES.glob("cmu1_*.png"))]  # the real patches when present
    cmd = [sys.executable, "-m", "scalereasoner_jax.cli", "parity", "--hf-model", str(tiny_hf_dir), "--json"]
    for image in images:
        cmd += ["--image", image]
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "parity PASS (float32" in proc.stdout
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["passed"] and report["n_images"] == (len(images) or 3)  # else 3 probe images
    assert report["max_rel_diff"] < 1e-4


def test_parity_command_exits_nonzero_when_models_disagree(tiny_hf_dir, monkeypatch, capsys):
    """Perturb one weight of our side only: the gate must catch it and the command must fail."""
    from scalereasoner_jax.models.qwen2_5_vl import params

    real = params.from_pretrained

    def perturbed(*args, **kwargs):
        model = real(*args, **kwargs)
        scale = model.language_model.layers[0].input_layernorm.scale
        scale.set_value(scale.get_value() * 1.05)
        return model

    monkeypatch.setattr(params, "from_pretrained", perturbed)
    assert main(["parity", "--hf-model", str(tiny_hf_dir)]) == 1
    assert "parity FAIL" in capsys.readouterr().out


def test_eval_export_dir_never_writes_beside_a_bucket(tmp_path):
    import contextlib

    from scalereasoner_jax.cli import eval_export_dir

    with contextlib.ExitStack() as stack:
        assert eval_export_dir("gs://bucket/run", tmp_path / "out", stack) == tmp_path / "out" / "export"
        assert eval_export_dir(str(tmp_path / "run"), None, stack) == tmp_path / "run" / "export"
        remote = eval_export_dir("gs://bucket/run", None, stack)
        assert "gs:" not in str(remote) and remote.parent.is_dir()  # a local temporary folder
    assert not remote.parent.exists()  # removed with the evaluation
