"""The one small interface every autoencoder of the platform offers, and a loader from a spec.

An autoencoder maps images (B, C_img, H, W) with values in [-1, 1] to latents (B, C, H/f, W/f)
and back. Shard writing (``prepare``) encodes with it; the streaming data module decodes with
it for sample pictures. ``spec()`` is a small JSON-able dict that ``load_autoencoder`` turns
back into the same autoencoder; it is written into every shard manifest.

Specs ``load_autoencoder`` understands:

==============================  ===========================================================
``space_to_depth`` / ``s2d:4``  lossless pixel unshuffle by factor 4 (tests, the demo)
``path/to/ae.ckpt``             a checkpoint of :class:`~flowmatch.autoencoders.conv.AutoencoderModule`
                                (``python -m flowmatch fit --config configs/autoencoder/ae_d16.yaml``)
``path/to/vae_dir``             a diffusers ``AutoencoderKL`` directory (config.json + weights),
                                e.g. SD3's 16-channel VAE; needs diffusers
``conv:PATH`` / ``diffusers:PATH``  the same, with the kind spelt out
a dict ``{"kind": ...}``        what ``spec()`` returned
==============================  ===========================================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class AutoencoderError(ValueError):
    """An autoencoder spec that cannot be loaded (names the spec or path)."""


class Autoencoder(nn.Module):
    """images (B, image_channels, H, W) in [-1, 1]  <->  latents (B, latent_channels, H/downsample, W/downsample)."""

    image_channels: int
    latent_channels: int
    downsample: int
    #: normalisation the autoencoder's authors recommend ((z - shift) * scale), or None to measure it
    default_shift: float | None = None
    default_scale: float | None = None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> dict:
        """A JSON-able dict from which :func:`load_autoencoder` rebuilds this autoencoder."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__

    def latent_shape(self, image_size: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of size (H, W); H and W must be multiples of the downsampling."""
        h, w = image_size
        f = self.downsample
        if h % f or w % f:
            raise AutoencoderError(f"{self.name}: image size {h}x{w} is not a multiple of the downsampling factor {f}")
        return (self.latent_channels, h // f, w // f)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.image_channels:
            raise AutoencoderError(
                f"{self.name} encodes images shaped (B, {self.image_channels}, H, W), got {tuple(images.shape)}"
            )
        self.latent_shape(tuple(images.shape[2:]))

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise AutoencoderError(
                f"{self.name} decodes latents shaped (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}"
            )


#: How each kind of spec becomes an autoencoder: kind -> builder(args, map_location). Each implementation module
#: registers its kind beside its class (register_kind), and flowmatch/autoencoders/__init__.py imports them all;
#: Python runs that package __init__ before any module inside it, so every kind is known by the time a spec is
#: loaded, while this module imports none of the implementations (they import it).
_BUILDERS: dict[str, Callable[[dict, str], Autoencoder]] = {}


def register_kind(kind: str, builder: Callable[[dict, str], Autoencoder]) -> None:
    """Make ``load_autoencoder({"kind": kind, **args})`` call ``builder(args, map_location)``."""
    _BUILDERS[kind] = builder


def load_autoencoder(spec: str | dict | Autoencoder, map_location: str = "cpu") -> Autoencoder:
    """Build an autoencoder from a spec (see this module's docstring). Errors name the spec / path."""
    if isinstance(spec, Autoencoder):
        return spec
    if isinstance(spec, str):
        spec = _parse_spec_string(spec)
    if not isinstance(spec, dict) or "kind" not in spec:
        raise AutoencoderError(f"autoencoder spec must be a string or a dict with a 'kind', got {spec!r}")
    kind = spec["kind"]
    builder = _BUILDERS.get(kind)
    if builder is None:
        raise AutoencoderError(f"unknown autoencoder kind {kind!r} in {spec!r}; known: {', '.join(sorted(_BUILDERS))}")
    return builder({k: v for k, v in spec.items() if k != "kind"}, map_location)


def _parse_spec_string(text: str) -> dict:
    head, sep, rest = text.partition(":")
    if head in ("s2d", "space_to_depth"):
        return {"kind": "space_to_depth", "factor": int(rest) if rest else 4}
    if head == "conv" and sep:
        return {"kind": "conv", "checkpoint": rest}
    if head == "diffusers" and sep:
        return {"kind": "diffusers", "path": rest}
    path = Path(text)
    if path.is_file() and path.suffix == ".ckpt":
        return {"kind": "conv", "checkpoint": str(path.resolve())}
    if path.is_dir() and (path / "config.json").is_file():
        cls = json.loads((path / "config.json").read_text()).get("_class_name")
        if cls != "AutoencoderKL":
            raise AutoencoderError(f"{path / 'config.json'}: _class_name is {cls!r}, expected 'AutoencoderKL'")
        return {"kind": "diffusers", "path": str(path.resolve())}
    if not path.exists():
        raise AutoencoderError(
            f"autoencoder {text!r}: no such file or directory; use 'space_to_depth[:FACTOR]', a .ckpt of "
            f"flowmatch.autoencoders.conv.AutoencoderModule, or a diffusers AutoencoderKL directory"
        )
    raise AutoencoderError(f"autoencoder {text!r} is neither a .ckpt file nor a directory with config.json")
