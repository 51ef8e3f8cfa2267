"""The checkpoint record of latent/caption data, as functions of dicts: thin aliases of
:class:`flowmatch.data.facts.LatentDataFacts`, kept for the code (and notebooks) that call them.

``info_from_datamodule(dm)`` is what an objective stores as ``checkpoint["flowmatch"]["data"]``;
the record's keys and values are described in flowmatch.data.facts.
"""

from __future__ import annotations

from typing import Any

import torch

from flowmatch.data.facts import LatentDataFacts, decode_latents, encoder_specs, facts_of, is_latent_manifest

__all__ = ["decode_latents", "encoder_specs", "info_from_datamodule", "info_from_manifest", "load_decoder", "load_text_encoders",
           "read_info"]


def info_from_manifest(manifest: dict, location: str, text_encoders: list[str] | None = None, autoencoder: Any = None) -> dict:
    """The checkpoint record of a shard manifest (``text_encoders`` / ``autoencoder`` replace the manifest's)."""
    return LatentDataFacts.from_manifest(manifest, str(location), None, text_encoders, autoencoder).record()


def read_info(location: str) -> dict:
    """The checkpoint record of the shard set at ``location`` (a directory with manifest.json, the manifest file, or a URL)."""
    return LatentDataFacts.read(str(location)).record()


def info_from_datamodule(datamodule) -> dict | None:
    """The checkpoint record of a data module that reads latent shards (its ``facts``, or a shard ``manifest``
    dict with ``manifest_location``); None for other data (2-D points, couplings, random tensors)."""
    facts = facts_of(datamodule)
    if facts is not None:
        return facts.record()
    manifest = getattr(datamodule, "manifest", None)
    if not is_latent_manifest(manifest):
        return None
    return info_from_manifest(manifest, str(getattr(datamodule, "manifest_location", "")))


def load_text_encoders(info: dict, device: str | torch.device = "cpu"):
    """The TextEncoderStack a checkpoint record names (None if it names none), in eval mode on ``device``."""
    if not info.get("text_encoders"):
        return None
    return LatentDataFacts.from_record(info).text_encoders.to(device)


def load_decoder(info: dict, device: str | torch.device = "cpu"):
    """The autoencoder a checkpoint record names, in eval mode on ``device``."""
    return LatentDataFacts.from_record(info).load_autoencoder(device)
