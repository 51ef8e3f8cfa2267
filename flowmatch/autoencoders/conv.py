"""The platform's own small convolutional autoencoder, and the LightningModule that trains it.

    encoder: conv3x3 -> [ResBlock, stride-2 conv (channels x2)] x log2(f) -> ResBlock -> GroupNorm, SiLU, conv3x3 -> d
    decoder: conv3x3 <- d -> ResBlock -> [nearest x2 upsample, conv, ResBlock] x log2(f) -> GroupNorm, SiLU, conv3x3 -> image

A plain deterministic autoencoder (no KL term; a tiny L2 penalty keeps the latent scale bounded)
with d = latent_channels = 4 / 8 / 16, the channel study of SD3 §5.2.1 (more channels reconstruct
better: SD3 reports PSNR 25.12 / 26.40 / 28.62). Train it with the platform's CLI::

    python -m flowmatch fit --config configs/autoencoder/ae_d16.yaml

then write shards with it: ``python -m flowmatch prepare --source demo --autoencoder runs/.../last.ckpt``.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from flowmatch.autoencoders.base import Autoencoder, AutoencoderError, register_kind


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvAutoencoder(Autoencoder):
    """A small conv autoencoder: images (B, image_channels, H, W) <-> latents (B, latent_channels, H/f, W/f)."""

    def __init__(self, image_channels: int = 1, latent_channels: int = 16, downsample: int = 4, base_channels: int = 32):
        super().__init__()
        stages = int(round(math.log2(downsample)))
        if downsample < 1 or 2**stages != downsample:
            raise AutoencoderError(f"downsample must be a power of two, got {downsample}")
        self.image_channels, self.latent_channels, self.downsample = image_channels, latent_channels, downsample
        widths = [base_channels * 2**i for i in range(stages + 1)]
        enc: list[nn.Module] = [nn.Conv2d(image_channels, widths[0], 3, padding=1)]
        for i in range(stages):
            enc += [ResBlock(widths[i]), nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)]
        enc += [ResBlock(widths[-1]), _norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, widths[-1], 3, padding=1), ResBlock(widths[-1])]
        for i in reversed(range(stages)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i + 1], widths[i], 3, padding=1), ResBlock(widths[i])]
        dec += [_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], image_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.base_channels = base_channels
        self.checkpoint_path: str | None = None

    @property
    def name(self) -> str:
        return f"conv_ae_d{self.latent_channels}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        return self.decoder(latents)

    def spec(self) -> dict:
        if self.checkpoint_path is None:
            raise AutoencoderError("this ConvAutoencoder was not loaded from a checkpoint: save one (fit) and load it by path")
        return {"kind": "conv", "checkpoint": self.checkpoint_path}


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2), averaged over the batch."""
    mse = (images.float() - reconstructions.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()


class AutoencoderModule(L.LightningModule):
    """Trains :class:`ConvAutoencoder` on batches ``{"x0": images in [-1, 1]}`` (e.g. DigitsImageDataModule).

    Logs ``train/loss``, ``val/loss``, ``val/psnr`` (and ``test/...``). The network is ``self.autoencoder``.
    """

    def __init__(
        self,
        latent_channels: int = 16,
        image_channels: int = 1,
        downsample: int = 4,
        base_channels: int = 32,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        latent_l2: float = 1e-6,
        sample_shape: list[int] | None = None,
    ):
        """
        Args:
            latent_channels: d, channels of the latent (SD3's study: 4, 8, 16).
            image_channels: channels of the images (1 for the digits demo, 3 for RGB).
            downsample: spatial downsampling factor f (a power of two; 4 for 32x32 digits, 8 in SD3).
            base_channels: width of the first stage (doubled at every downsampling).
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            latent_l2: weight of the mean squared latent added to the reconstruction MSE (keeps latents bounded).
            sample_shape: shape of one image (C, H, W); linked from the data module by the CLI and checked here.
        """
        super().__init__()
        self.save_hyperparameters()
        if sample_shape is not None and int(sample_shape[0]) != image_channels:
            raise AutoencoderError(f"the data's images have {sample_shape[0]} channels but image_channels={image_channels}")
        self.autoencoder = ConvAutoencoder(image_channels, latent_channels, downsample, base_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(self.autoencoder.encode(images))

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = batch["x0"] if isinstance(batch, dict) else batch
        z = self.autoencoder.encode(images)
        recon = self.autoencoder.decode(z)
        mse = F.mse_loss(recon.float(), images.float())
        return mse + self.hparams.latent_l2 * z.float().pow(2).mean(), recon, images

    def training_step(self, batch, batch_idx):
        loss, _, images = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        loss, recon, images = self._loss(batch)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=images.shape[0])
        self.log(f"{stage}/psnr", psnr(images, recon), prog_bar=True, batch_size=images.shape[0])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def load_conv_autoencoder(checkpoint: str, map_location: str = "cpu") -> ConvAutoencoder:
    """The ConvAutoencoder inside a checkpoint written by fitting :class:`AutoencoderModule` (eval mode)."""
    from pathlib import Path

    path = Path(checkpoint)
    if not path.is_file():
        raise AutoencoderError(f"autoencoder checkpoint {checkpoint}: no such file")
    try:
        module = AutoencoderModule.load_from_checkpoint(str(path), map_location=map_location)
    except (KeyError, RuntimeError, TypeError) as err:
        raise AutoencoderError(f"{checkpoint} is not a checkpoint of flowmatch.autoencoders.conv.AutoencoderModule: {err}") from err
    ae = module.autoencoder.eval()
    ae.checkpoint_path = str(path.resolve())
    return ae


register_kind("conv", lambda args, map_location: load_conv_autoencoder(args["checkpoint"], map_location=map_location))
