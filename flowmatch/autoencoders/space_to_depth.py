"""A lossless "autoencoder": space-to-depth (pixel unshuffle), e.g. 1 x 32 x 32 -> 16 x 8 x 8.

It learns nothing and loses nothing (decode(encode(x)) == x exactly), so tests and the built-in
demo get latents of the shape a real autoencoder would give, in no time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowmatch.autoencoders.base import Autoencoder, AutoencoderError, register_kind


class SpaceToDepth(Autoencoder):
    """Pixel unshuffle by ``factor``: (B, C, H, W) -> (B, C * factor^2, H / factor, W / factor), and back."""

    def __init__(self, factor: int = 4, image_channels: int = 1):
        super().__init__()
        if factor < 1:
            raise AutoencoderError(f"space_to_depth factor must be >= 1, got {factor}")
        self.factor = self.downsample = int(factor)
        self.image_channels = int(image_channels)
        self.latent_channels = self.image_channels * self.factor**2

    @property
    def name(self) -> str:
        return f"space_to_depth{self.factor}"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_latents(latents)
        return F.pixel_shuffle(latents, self.factor)

    def spec(self) -> dict:
        return {"kind": "space_to_depth", "factor": self.factor, "image_channels": self.image_channels}


register_kind("space_to_depth", lambda args, map_location: SpaceToDepth(**args))
