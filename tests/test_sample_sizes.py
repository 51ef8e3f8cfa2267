"""`python -m flowmatch sample` at sizes other than the training one (issue 15): --height/--width (pixels, through
the autoencoder's factor from the checkpoint's data record) and --latent_size; the time grid's shift is the model's
training time_shift rule at the size sampled (or --shift), recorded in samples.json; sizes the network cannot take
are one-line errors naming the size and the limit.

The checkpoints: a tiny unconditional DiT (16 latent channels, patch 2, position table for latents up to 16x16)
trained 2 steps on random 16x8x8 latents by a Trainer, with a data record of the demo's space_to_depth:4
autoencoder (32x32 one-channel images), once with SD3's sqrt rule, once with FLUX's rule, once without a shift.
"""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

from flowmatch.checkpoints import read_checkpoint
from flowmatch.cli.main import main as flowmatch_main
from flowmatch.networks.dit import DiT
from flowmatch.objectives import RectifiedFlow
from flowmatch.objectives.loading import load_objective
from flowmatch.time_shift import FluxShift, SD3ResolutionShift, sampling_shift

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

NET = {"size": None, "patch_size": 2, "depth": 1, "hidden_size": 32, "num_heads": 2, "in_channels": 16, "input_size": 16}
RECORD = {"manifest": "", "text_encoders": [], "pooled_dim": 0, "context_dim": 0, "context_length": 0,
          "autoencoder": {"kind": "space_to_depth", "factor": 4, "image_channels": 1}, "shift": 0.0, "scale": 1.0,
          "latent_shape": [16, 8, 8], "image_shape": [1, 32, 32]}
RULES = {  # the training rule, as its config and as the object
    "sd3": ({"class_path": "flowmatch.time_shift.SD3ResolutionShift",
             "init_args": {"base_pixels": 32 * 32, "base_alpha": 1.0, "downsample": 4}},
            SD3ResolutionShift(base_pixels=32 * 32, base_alpha=1.0, downsample=4)),
    "flux": ({"class_path": "flowmatch.time_shift.FluxShift", "init_args": {"base_tokens": 16, "max_tokens": 64}},
             FluxShift(base_tokens=16, max_tokens=64)),
    "none": (None, None),
}
FAST = ["--steps", "2", "--num", "2"]


def _checkpoint(path, rule: str):
    """The DiT trained 2 steps with the rule, built the way the CLI builds it (the config as hyper-parameters)."""
    config, shift = RULES[rule]
    hparams = {"_class_path": "flowmatch.objectives.RectifiedFlow", "network": {"class_path": "flowmatch.networks.dit.DiT", "init_args": NET},
               "time_sampler": None, "weighting": "native", "time_shift": config, "lr": 1e-3, "weight_decay": 0.0,
               "betas": [0.9, 0.999], "warmup_steps": 0, "sample_shape": [16, 8, 8], "val_levels": 8, "val_seed": 0, "init_weights": None}
    torch.manual_seed(0)
    with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
        model = RectifiedFlow(lambda: DiT(**NET), time_shift=shift, sample_shape=[16, 8, 8])
    model.data_info = dict(RECORD)  # what a run on the demo shards records (no data module here: the fallback is kept)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader([{"x0": x} for x in torch.randn(8, 16, 8, 8)], batch_size=4))
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return {rule: _checkpoint(folder / f"{rule}.ckpt", rule) for rule in RULES}


def sample(ckpt, out, *args) -> int:
    return flowmatch_main(["sample", "--ckpt", str(ckpt), "--out", str(out), *map(str, args)])


def _info(out) -> dict:
    return json.loads((out / "samples.json").read_text())


# ---------------------------------------------------------------------------------------------
# Two sizes, the rule's shift at each
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["sd3", "flux"])
def test_two_sizes_through_the_cli_use_the_training_rule_at_each(ckpts, rule, tmp_path, capsys):
    shift = RULES[rule][1]
    assert sample(ckpts[rule], tmp_path / "default", *FAST) == 0, capsys.readouterr().err
    assert sample(ckpts[rule], tmp_path / "wide", *FAST, "--height", 32, "--width", 64) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    default, wide = _info(tmp_path / "default"), _info(tmp_path / "wide")
    assert default["latent_shape"] == [2, 16, 8, 8] and default["shape"] == [2, 1, 32, 32]
    assert wide["latent_shape"] == [2, 16, 8, 16] and wide["shape"] == [2, 1, 32, 64]
    assert np.load(tmp_path / "wide" / "samples.npy").shape == (2, 1, 32, 64)
    assert default["shift"] == pytest.approx(shift.alpha((1, 16, 8, 8)), rel=1e-12)
    assert wide["shift"] == pytest.approx(shift.alpha((1, 16, 8, 16)), rel=1e-12)
    if rule == "sd3":  # sqrt of the pixel ratio: 1 at the training size, sqrt(2) at twice the pixels
        assert (default["shift"], wide["shift"]) == (pytest.approx(1.0), pytest.approx(math.sqrt(2)))
    else:  # FLUX's mu: 16 tokens -> base_shift 0.5, 32 tokens -> 0.5 + 0.65 * 16 / 48
        assert (default["shift"], wide["shift"]) == (pytest.approx(math.exp(0.5)), pytest.approx(math.exp(0.5 + 0.65 / 3)))
    assert wide["shift_source"] == f"the training time_shift {shift!r} at latent 8x16"
    assert f"time-grid shift {wide['shift']:.4g} (the training time_shift" in printed


def test_latent_size_and_an_explicit_shift(ckpts, tmp_path, capsys):
    assert sample(ckpts["sd3"], tmp_path / "big", *FAST, "--latent_size", 16, 16) == 0, capsys.readouterr().err
    assert sample(ckpts["sd3"], tmp_path / "fixed", *FAST, "--latent_size", 16, 8, "--shift", 3) == 0, capsys.readouterr().err
    big, fixed = _info(tmp_path / "big"), _info(tmp_path / "fixed")
    assert big["latent_shape"] == [2, 16, 16, 16] and big["shape"] == [2, 1, 64, 64]
    assert big["shift"] == pytest.approx(2.0)  # four times the pixels of 32x32
    assert (fixed["shift"], fixed["shift_source"]) == (3.0, "--shift") and fixed["latent_shape"] == [2, 16, 16, 8]


def test_a_model_trained_without_a_shift_samples_with_none(ckpts, tmp_path, capsys):
    assert sample(ckpts["none"], tmp_path / "wide", *FAST, "--height", 64, "--width", 32) == 0, capsys.readouterr().err
    info = _info(tmp_path / "wide")
    assert info["shift"] == 1.0 and info["shift_source"].startswith("none") and info["latent_shape"] == [2, 16, 16, 8]


def test_the_loaded_rule_is_the_trained_one_and_generate_takes_a_shape(ckpts):
    model = load_objective(ckpts["flux"])
    assert repr(model.time_shift) == repr(RULES["flux"][1])
    assert sampling_shift(model.time_shift, (16, 8, 16)) == pytest.approx(math.exp(0.5 + 0.65 / 3))
    x, _ = model.generate(2, shape=(16, 8, 16))
    assert x.shape == (2, 16, 8, 16)
    same, _ = model.generate(2)  # no shape: the training shape, the same draws as before
    torch.testing.assert_close(same, model.generate(2, shape=(16, 8, 8))[0], rtol=0, atol=0)


def test_without_a_data_record_latent_size_works_and_pixels_say_what_is_missing(ckpts, tmp_path, capsys):
    """A checkpoint that records no data (older, or imported) generates latents: its factor is unknown."""
    state = read_checkpoint(ckpts["sd3"])
    del state["flowmatch"]["data"]
    torch.save(state, tmp_path / "old.ckpt")
    assert sample(tmp_path / "old.ckpt", tmp_path / "wide", *FAST, "--latent_size", 8, 16) == 0, capsys.readouterr().err
    info = _info(tmp_path / "wide")
    assert info["shape"] == [2, 16, 8, 16] and info["shift"] == pytest.approx(math.sqrt(2))
    assert sample(tmp_path / "old.ckpt", tmp_path / "no", *FAST, "--height", 32, "--width", 64) == 2
    err = capsys.readouterr().err
    assert "records no autoencoder" in err and "--latent_size h w" in err and not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------------------------
# Sizes the network cannot take: one line, naming the size and the limit, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--height", 96, "--width", 32], "--height 96 --width 32 (latent 24x8): DiT: latent 24x8 gives a 12x4 token grid, "
                                      "which exceeds the position table (8x8 tokens, input_size=16: latents up to 16x16)"),
    (["--latent_size", 8, 18], "--latent_size 8 18: DiT: latent 8x18 gives a 4x9 token grid"),
    (["--latent_size", 8, 7], "--latent_size 8 7: DiT: latent height/width 8x7 (shape (1, 16, 8, 7)) must be divisible by patch_size 2"),
    (["--height", 36, "--width", 32], "--height 36 --width 32: image sizes must be multiples of 8 (the autoencoder's factor 4 x "
                                      "the network's patch_size 2)"),
    (["--height", 32], "give --height and --width together"),
    (["--height", 32, "--width", 32, "--latent_size", 8, 8], "not both"),
])
def test_sizes_the_network_cannot_take_are_one_line_errors(ckpts, tmp_path, capsys, args, message):
    assert sample(ckpts["sd3"], tmp_path / "no", *FAST, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "no").exists()
