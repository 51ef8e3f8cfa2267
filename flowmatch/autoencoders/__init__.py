"""Autoencoders behind one interface: images in [-1, 1] <-> latents (see flowmatch.autoencoders.base).

- SpaceToDepth: lossless pixel unshuffle (tests, the built-in demo)
- ConvAutoencoder / AutoencoderModule: the platform's own small conv autoencoder, trainable with the CLI
- DiffusersAutoencoder: a diffusers AutoencoderKL from a local directory (SD3's VAE), when diffusers is installed

Each implementation module registers its spec kind with ``base.register_kind``; importing them all here is
what makes every kind known to ``load_autoencoder``. A new autoencoder: a module with its class and its
``register_kind`` call, imported below.
"""

from flowmatch.autoencoders.base import Autoencoder, AutoencoderError, load_autoencoder
from flowmatch.autoencoders.conv import AutoencoderModule, ConvAutoencoder
from flowmatch.autoencoders.diffusers_kl import DiffusersAutoencoder
from flowmatch.autoencoders.space_to_depth import SpaceToDepth

__all__ = [
    "Autoencoder",
    "AutoencoderError",
    "AutoencoderModule",
    "ConvAutoencoder",
    "DiffusersAutoencoder",
    "SpaceToDepth",
    "load_autoencoder",
]
