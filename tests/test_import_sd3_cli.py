"""`python -m flowmatch import-sd3`: a real (tiny, random) diffusers SD3 transformer saved to disk,
converted by the real CLI in a subprocess, reloaded with load_objective, compared with diffusers,
and fine-tuned by a real `python -m flowmatch fit` that starts from it (model.init_args.init_weights).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flowmatch.cli.main import main as flowmatch_main
from helpers_sd3 import random_sd3

TESTS_DIR = Path(__file__).resolve().parent


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env["JSONARGPARSE_DEPRECATION_WARNINGS"] = "off"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _flowmatch(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowmatch", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """A tiny diffusers SD3Transformer2DModel with random weights everywhere (zero-initialised layers included), on disk."""
    pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("sd3") / "transformer"
    return path, random_sd3(path)


def test_import_load_compare_and_finetune(sd3_dir, tmp_path):
    from flowmatch.objectives.loading import load_objective

    src, ref = sd3_dir
    out = tmp_path / "model.ckpt"

    # 1. the real CLI converts the directory
    run = _flowmatch(["import-sd3", str(src), "--out", str(out)], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert out.is_file() and str(out) in run.stdout and "depth 2" in run.stdout and "qk_norm True" in run.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the temporary file was renamed

    ckpt = torch.load(out, weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["_class_path"] == "flowmatch.objectives.RectifiedFlow"
    assert hp["network"]["class_path"] == "flowmatch.networks.mmdit.MMDiT"
    assert hp["network"]["init_args"]["pos_embed_base_size"] == 4  # sample_size / patch_size: needed for diffusers' positions
    assert list(hp["sample_shape"]) == [4, 8, 8] and ckpt["flowmatch"]["sample_shape"] == [4, 8, 8]
    assert "pytorch-lightning_version" in ckpt and all(k.startswith("net.") for k in ckpt["state_dict"])

    # 2. load_objective rebuilds a model whose output is diffusers'
    model = load_objective(out)
    assert list(model.sample_shape) == [4, 8, 8]
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(2, 4, 8, 6, generator=g), torch.rand(2, generator=g)
    tokens, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        expected = ref(hidden_states=z, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=1000 * t).sample
        got = model.net(z, t, {"pooled": pooled, "tokens": tokens})
    assert _rel_err(got, expected) < 1e-5

    # 3. a real fine-tuning run starts from the imported weights
    weights_dir = tmp_path / "weights"
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "flowmatch.objectives.RectifiedFlow",
            "init_args": {"network": hp["network"], "init_weights": str(out), "lr": 1e-3},
        },
        "data": {
            "class_path": "helpers_latents.RandomLatentsDataModule",
            "init_args": {"channels": 4, "size": 8, "pooled_dim": 16, "context_dim": 32, "num_tokens": 5, "batch_size": 4},
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [{"class_path": "helpers_latents.SaveNetworkWeights", "init_args": {"dirpath": str(weights_dir)}}],
        },
    }
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(config))
    # (not --trainer.enable_checkpointing false: FlowCLI always adds its ModelCheckpoint, which Lightning then refuses)
    run = _flowmatch(["fit", "--config", "finetune.yaml", "--trainer.max_steps", "2", "--trainer.logger", "false",
                      "--trainer.limit_val_batches", "0"], cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    imported = {k[len("net."):]: v for k, v in ckpt["state_dict"].items()}
    start = torch.load(weights_dir / "start.pt", weights_only=True)
    end = torch.load(weights_dir / "end.pt", weights_only=True)
    assert set(start) >= set(imported)
    for k, v in imported.items():
        assert torch.equal(start[k], v), f"{k} differs from the imported weights at the first step"
    assert any(not torch.equal(end[k], v) for k, v in imported.items()), "fine-tuning did not update the weights"
    tuned = load_objective(tmp_path / "runs" / "checkpoints" / "last.ckpt")  # the fine-tuned run's checkpoint rebuilds too
    for k, v in tuned.net.state_dict().items():
        assert torch.equal(v, end[k]), k


def test_missing_directory(tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    rc = flowmatch_main(["import-sd3", str(missing), "--out", str(tmp_path / "m.ckpt")])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("error: ") and str(missing) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.ckpt").exists()


def test_directory_without_config(tmp_path, capsys):
    empty = tmp_path / "not_a_transformer"
    empty.mkdir()
    (empty / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    rc = flowmatch_main(["import-sd3", str(empty), "--out", str(tmp_path / "m.ckpt")])
    err = capsys.readouterr().err
    assert rc != 0 and "config.json" in err and str(empty) in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.ckpt")) and not list(tmp_path.glob(".*.tmp"))


def test_refuses_other_models_and_existing_output(tmp_path, capsys):
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "in_channels": 4}')
    rc = flowmatch_main(["import-sd3", str(other), "--out", str(tmp_path / "m.ckpt")])
    err = capsys.readouterr().err
    assert rc != 0 and str(other / "config.json") in err and "UNet2DConditionModel" in err

    existing = tmp_path / "keep.ckpt"
    existing.write_bytes(b"precious")
    rc = flowmatch_main(["import-sd3", str(other), "--out", str(existing)])
    err = capsys.readouterr().err
    assert rc != 0 and str(existing) in err and "--force" in err and existing.read_bytes() == b"precious"


def test_missing_tensor_is_named(sd3_dir, tmp_path, capsys):
    """A checkpoint that lacks a tensor: the error names it, and nothing is written."""
    from safetensors.torch import load_file, save_file

    src, _ = sd3_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "diffusion_pytorch_model.safetensors")
    del tensors["transformer_blocks.1.attn.to_q.weight"]
    save_file(tensors, broken / "diffusion_pytorch_model.safetensors")
    rc = flowmatch_main(["import-sd3", str(broken), "--out", str(tmp_path / "m.ckpt")])
    err = capsys.readouterr().err
    assert rc != 0 and "transformer_blocks.1.attn.to_q.weight" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.ckpt").exists()
