"""What a checkpoint remembers of the latent/caption data it was trained on, and the two conversions that
makes possible without the data config: prompts -> conditions, latents -> images.

A model trained on latent shards generates *normalised latents* conditioned on *text encodings*. To turn
a prompt into an image, ``sample`` needs the text encoders that made the encodings (with their
max_length), the autoencoder that decodes the latents and the normalisation (z - shift) * scale. The
facts come from the shard manifest (or the data module's on-the-fly encoders) and are stored in every
checkpoint as ``checkpoint["flowmatch"]["data"]`` (small, JSON-like, no tensors)::

    {"manifest": "/abs/path/data/demo/manifest.json",
     "text_encoders": [{"path": "minilm", "max_length": 32, "kind": "bert", "pooled": "mean", "hidden_layer": -1, "name": "minilm"}],
     "pooled_dim": 384, "context_dim": 384, "context_length": 32,
     "autoencoder": {"kind": "space_to_depth", "factor": 4, "image_channels": 1},
     "shift": -0.368, "scale": 1.53, "latent_shape": [16, 8, 8], "image_shape": [1, 32, 32]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: the keys of a text encoder description that HFTextEncoder takes back as arguments
_ENCODER_ARGS = ("path", "max_length", "kind", "hidden_layer", "pooled", "name")


def _absolute(location: str) -> str:
    """A local path made absolute (so a checkpoint works from any directory); URLs unchanged."""
    if "://" in location or location.startswith("pipe:"):
        return location
    return str(Path(location).resolve())


def encoder_specs(descriptions: list[dict]) -> list[dict]:
    """HFTextEncoder arguments from encoder descriptions (``describe()`` / the manifest's text.encoders)."""
    return [{k: d[k] for k in _ENCODER_ARGS if d.get(k) is not None} for d in descriptions]


def _autoencoder_spec(spec: Any) -> Any:
    """A spec that still works from another directory: a relative checkpoint / directory path made absolute."""
    if isinstance(spec, str) and Path(spec).exists():
        return _absolute(spec)
    if isinstance(spec, dict):
        spec = dict(spec)
        for key in ("checkpoint", "path"):
            if isinstance(spec.get(key), str) and Path(spec[key]).exists():
                spec[key] = _absolute(spec[key])
    return spec


def info_from_manifest(manifest: dict, location: str, text_stack=None, autoencoder: Any = None) -> dict:
    """The data facts of a shard manifest. ``text_stack`` (a TextEncoderStack) replaces the manifest's encoders,
    ``autoencoder`` (a spec) its autoencoder, as a data module's own settings do."""
    latent, text = manifest["latent"], manifest.get("text") or {}
    if text_stack is not None:
        described = text_stack.describe()
        descriptions = described["encoders"]
        dims = {k: int(described[k]) for k in ("pooled_dim", "context_dim", "context_length")}
    else:
        descriptions = list(text.get("encoders") or [])
        dims = {k: int(text.get(k) or 0) for k in ("pooled_dim", "context_dim", "context_length")}
    image = manifest.get("image") or {}
    size = image.get("size")
    image_shape = [int(image["channels"]), *(int(s) for s in size)] if size and image.get("channels") else None
    return {
        "manifest": _absolute(str(location)),
        "text_encoders": encoder_specs(descriptions),
        **dims,
        "autoencoder": _autoencoder_spec(autoencoder if autoencoder is not None else manifest["autoencoder"]["spec"]),
        "shift": float(latent["shift"]),
        "scale": float(latent["scale"]),
        "latent_shape": [int(v) for v in latent["shape"]],
        "image_shape": image_shape,
    }


def read_info(location: str) -> dict:
    """The data facts of the shard set at ``location`` (a directory with manifest.json, the manifest file, or a URL)."""
    from flowmatch.data.shard_format import MANIFEST_NAME, ShardFormatError, read_manifest

    manifest, base = read_manifest(str(location))
    if not isinstance(manifest.get("latent"), dict) or "autoencoder" not in manifest:
        raise ShardFormatError(f"{location} is not a latent/caption shard manifest (no 'latent' / 'autoencoder' entries)")
    if "://" not in str(location) and Path(location).is_dir():
        location = str(Path(location) / MANIFEST_NAME)
    return info_from_manifest(manifest, str(location))


def info_from_datamodule(datamodule) -> dict | None:
    """The data facts of a data module that reads latent shards (a LatentShardDataModule, or anything with a shard
    ``manifest`` dict and ``manifest_location``); None for other data (2-D points, couplings, random tensors)."""
    manifest = getattr(datamodule, "manifest", None)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("latent"), dict) or "autoencoder" not in manifest:
        return None
    hparams = getattr(datamodule, "hparams", None) or {}
    return info_from_manifest(manifest, str(getattr(datamodule, "manifest_location", "")), getattr(datamodule, "_text", None),
                              hparams.get("autoencoder"))


def decode_latents(autoencoder, latents: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> images (B, C_img, H, W) in [-1, 1]: un-normalise (z / scale + shift),
    run the autoencoder's decoder, clamp."""
    with torch.no_grad():
        ae = autoencoder.to(latents.device)
        return ae.decode(latents.float() / scale + shift).clamp(-1, 1)


def load_text_encoders(info: dict, device: str | torch.device = "cpu"):
    """The TextEncoderStack the data facts name (None if they name no encoder)."""
    from flowmatch.text.encoders import build_text_encoders

    specs = info.get("text_encoders") or []
    stack = build_text_encoders(specs or None, [s.get("max_length") for s in specs] if specs else None)
    return None if stack is None else stack.to(device).eval()


def load_decoder(info: dict, device: str | torch.device = "cpu"):
    """The autoencoder the data facts name, in eval mode."""
    from flowmatch.autoencoders.base import load_autoencoder

    return load_autoencoder(info["autoencoder"], map_location=str(device)).to(device).eval()
