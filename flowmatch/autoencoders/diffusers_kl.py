"""A diffusers-format ``AutoencoderKL`` (e.g. SD3's VAE: 16 channels, downsampling 8) loaded from a local directory.

diffusers is optional: it is imported only when this class is used. Encoding takes the mode
(mean) of the posterior, so shards are deterministic. The VAE's own ``shift_factor`` and
``scaling_factor`` (SD3: 0.0609, 1.5305) become the shards' default latent normalisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowmatch.autoencoders.base import Autoencoder, AutoencoderError, register_kind


class DiffusersAutoencoder(Autoencoder):
    """Wraps ``diffusers.AutoencoderKL.from_pretrained(path)`` behind the platform's autoencoder interface."""

    def __init__(self, path: str, sample_posterior: bool = False):
        super().__init__()
        try:
            from diffusers import AutoencoderKL
        except ImportError as err:
            raise AutoencoderError(f"loading the AutoencoderKL at {path} needs diffusers: pip install diffusers") from err
        if not (Path(path) / "config.json").is_file():
            raise AutoencoderError(f"{path}: not a diffusers AutoencoderKL directory (no config.json)")
        self.path = str(Path(path).resolve())
        self.vae = AutoencoderKL.from_pretrained(self.path).eval()
        cfg = self.vae.config
        self.image_channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.sample_posterior = sample_posterior
        self.default_shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.default_scale = float(getattr(cfg, "scaling_factor", None) or 1.0)

    @property
    def name(self) -> str:
        return f"diffusers_kl_d{self.latent_channels}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return (dist.sample() if self.sample_posterior else dist.mode()).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()

    def spec(self) -> dict:
        return {"kind": "diffusers", "path": self.path, "sample_posterior": self.sample_posterior}


register_kind("diffusers", lambda args, map_location: DiffusersAutoencoder(**args))
