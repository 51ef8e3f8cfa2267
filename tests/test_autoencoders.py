"""Autoencoders behind one interface: the lossless space-to-depth codec, the platform's conv autoencoder
(a LightningModule trained for real, saved, loaded by path), and a diffusers AutoencoderKL from a local directory."""

from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

from flowmatch.autoencoders import (
    AutoencoderError,
    AutoencoderModule,
    ConvAutoencoder,
    SpaceToDepth,
    load_autoencoder,
)
from flowmatch.data.digits import DigitsImageDataModule, load_digit_images

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_space_to_depth_is_exact_on_the_digits():
    images = torch.from_numpy(load_digit_images(32)[0][:64])
    ae = SpaceToDepth(4, image_channels=1)
    z = ae.encode(images)
    assert z.shape == (64, 16, 8, 8) and ae.latent_shape((32, 32)) == (16, 8, 8)
    assert torch.equal(ae.decode(z), images)  # bit-exact
    rebuilt = load_autoencoder(ae.spec())
    assert isinstance(rebuilt, SpaceToDepth) and torch.equal(rebuilt.encode(images), z)
    assert load_autoencoder("s2d:2").latent_channels == 4


def test_interface_errors_name_the_problem(tmp_path):
    ae = SpaceToDepth(4)
    with pytest.raises(AutoencoderError, match="not a multiple"):
        ae.encode(torch.zeros(1, 1, 30, 30))
    with pytest.raises(AutoencoderError, match=r"\(B, 1, H, W\)"):
        ae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(AutoencoderError, match=str(tmp_path / "missing.ckpt")):
        load_autoencoder(str(tmp_path / "missing.ckpt"))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(AutoencoderError, match="AutoencoderKL"):
        load_autoencoder(str(tmp_path / "vae"))
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"state_dict": {}}, bogus)
    with pytest.raises(AutoencoderError, match="bogus.ckpt"):
        load_autoencoder(str(bogus))


@pytest.mark.parametrize("d", [4, 8, 16])
def test_conv_autoencoder_shapes_for_sd3_channel_study(d):
    ae = ConvAutoencoder(image_channels=1, latent_channels=d, downsample=4, base_channels=8)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, d, 8, 8) and ae.decode(z).shape == x.shape


def test_conv_autoencoder_trains_saves_and_loads_by_path(tmp_path):
    torch.manual_seed(0)
    dm = DigitsImageDataModule(batch_size=32)
    module = AutoencoderModule(latent_channels=4, base_channels=8, lr=3e-3, sample_shape=dm.sample_shape)
    trainer = lightning.Trainer(max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, limit_val_batches=2, val_check_interval=30, default_root_dir=tmp_path)
    before = trainer.validate(module, dm, verbose=False)[0]
    trainer.fit(module, dm)
    after = trainer.validate(module, dm, verbose=False)[0]
    assert after["val/loss"] < 0.7 * before["val/loss"] and after["val/psnr"] > before["val/psnr"] + 1
    ckpt = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(ckpt)
    ae = load_autoencoder(str(ckpt))
    assert isinstance(ae, ConvAutoencoder) and ae.spec() == {"kind": "conv", "checkpoint": str(ckpt.resolve())}
    x = dm.reference_images(4)
    with torch.no_grad():
        assert torch.allclose(ae.decode(ae.encode(x)), module(x), atol=1e-5)
    with pytest.raises(AutoencoderError, match="channels"):
        AutoencoderModule(image_channels=3, sample_shape=[1, 32, 32])


def test_autoencoder_config_trains_with_the_platform_cli(tmp_path, monkeypatch, capsys):
    """`python -m flowmatch fit --config configs/autoencoder/ae_d4.yaml` trains the autoencoder with the platform's CLI."""
    from flowmatch.cli.main import main

    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(ROOT / "configs/autoencoder/ae_d4.yaml"), "--model.init_args.base_channels", "4",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    try:
        rc = main(argv)
    except SystemExit as exc:  # jsonargparse reports a config error by exiting
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]


def save_tiny_vae(diffusers, path) -> None:
    """A tiny diffusers AutoencoderKL (16 latent channels, downsampling 2, SD3's shift and scale), saved to path."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609)
    vae.save_pretrained(path)


def test_diffusers_autoencoder_kl_from_a_local_directory(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    save_tiny_vae(diffusers, tmp_path / "vae")
    ae = load_autoencoder(str(tmp_path / "vae"))
    assert (ae.image_channels, ae.latent_channels, ae.downsample) == (3, 16, 2)
    assert (ae.default_shift, ae.default_scale) == (0.0609, 1.5305)  # SD3's normalisation travels with the VAE
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 16, 8, 8) and ae.decode(z).shape == x.shape
        assert torch.equal(ae.encode(x), z)  # the posterior mode: deterministic shards
    assert load_autoencoder(ae.spec()).latent_channels == 16
    np.testing.assert_equal(ae.spec()["kind"], "diffusers")


def test_prepare_with_a_diffusers_vae_takes_its_normalisation(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from flowmatch.data.prepare import PrepareConfig, prepare_shards
    from flowmatch.data.shards import LatentShardDataModule

    save_tiny_vae(diffusers, tmp_path / "vae")
    manifest = prepare_shards(PrepareConfig(out=str(tmp_path / "set"), autoencoder=str(tmp_path / "vae"), size=16, limit=8,
                                            text_encoders=[], progress=False), log=lambda *_: None)
    assert manifest["latent"]["shape"] == [16, 8, 8] and (manifest["latent"]["shift"], manifest["latent"]["scale"]) == (0.0609, 1.5305)
    assert manifest["image"]["channels"] == 3  # grey digits are repeated to the VAE's RGB input
    from flowmatch.data.shard_format import ShardFormatError

    with pytest.raises(ShardFormatError, match="no text encodings and name no encoders"):  # written without text: say so
        LatentShardDataModule(data_dir=str(tmp_path / "set"), num_workers=0).setup("fit")
