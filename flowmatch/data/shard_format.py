"""The latent/caption shard format: one webdataset tar sample per image, and one manifest per shard set.

A sample (``__key__`` = ``{split}_{index:07d}``; keys never contain dots):

====================  =====================================================================
file in the tar       content
====================  =====================================================================
KEY.latent.npy        float16 (C, h, w): the autoencoder's latent, NOT normalised
KEY.caption.txt       the original caption (UTF-8)
KEY.caption_syn.txt   the synthetic caption (UTF-8)
KEY.json              {"index": position in the split, "size": [H, W], "channels": image
                      channels, "source": where the image came from, "label": int (optional)}
KEY.tokens.npy        float16 (n, D): token states of the original caption, real tokens only  }
KEY.mask.npy          bool (L,): True where a real token sits in the padded sequence          } only when
KEY.pooled.npy        float16 (P,): pooled vector of the original caption                     } the shards
KEY.tokens_syn.npy    the same three for the synthetic caption                                } hold text
KEY.mask_syn.npy                                                                              } encodings
KEY.pooled_syn.npy                                                                            }
====================  =====================================================================

Only the n = mask.sum() real token states are stored; a reader scatters them into zeros (L, D)
at the mask's True positions (the padded positions are masked out by the network anyway).

The manifest (``manifest.json`` beside the shards) records everything a training run checks
before it starts: the splits with their shard files and sample counts, the latent shape and
channel count, the normalisation (z - shift) * scale, the autoencoder (a spec that rebuilds it,
for decoding), the image size, and the text encoders with pooled_dim / context_dim / context_length.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "flowmatch-latent-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")

LATENT = "latent.npy"
CAPTION = "caption.txt"
CAPTION_SYN = "caption_syn.txt"
META = "json"
ENCODING_KEYS = {  # which caption -> (tokens, mask, pooled) file names
    "orig": ("tokens.npy", "mask.npy", "pooled.npy"),
    "syn": ("tokens_syn.npy", "mask_syn.npy", "pooled_syn.npy"),
}
REQUIRED = (LATENT, CAPTION, CAPTION_SYN, META)


class ShardFormatError(ValueError):
    """A shard, sample or manifest that does not follow the format; the message names the file and key."""


class ManifestMismatchError(ValueError):
    """The shard set does not fit the model (channels, size, text dimensions); names the manifest and the field."""


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:07d}"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ShardFormatError(f"{what}: not a readable .npy ({err})") from err


def encode_sample(key: str, latent: np.ndarray, caption: str, caption_syn: str, meta: dict,
                  encodings: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] | None = None) -> dict[str, Any]:
    """The dict that webdataset's TarWriter / ShardWriter writes for one sample (all values already bytes).

    ``encodings``: {"orig": (tokens (L, D), mask (L,), pooled (P,) or None), "syn": (...)} with full padded tokens.
    """
    if "." in key:
        raise ShardFormatError(f"sample key {key!r} contains a dot (webdataset splits keys at dots)")
    out = {
        "__key__": key,
        LATENT: npy_bytes(np.asarray(latent, dtype=np.float16)),
        CAPTION: caption.encode("utf-8"),
        CAPTION_SYN: caption_syn.encode("utf-8"),
        META: json.dumps(meta).encode("utf-8"),
    }
    for which, (tokens, mask, pooled) in (encodings or {}).items():
        tk, mk, pk = ENCODING_KEYS[which]
        mask = np.asarray(mask, dtype=bool)
        out[tk] = npy_bytes(np.asarray(tokens)[mask].astype(np.float16))
        out[mk] = npy_bytes(mask)
        if pooled is not None:
            out[pk] = npy_bytes(np.asarray(pooled, dtype=np.float16))
    return out


class SampleSpec:
    """What every sample of a shard set must look like (from its manifest); decodes and checks raw samples."""

    def __init__(self, manifest: dict):
        latent = manifest["latent"]
        self.latent_shape = tuple(int(v) for v in latent["shape"])
        text = manifest.get("text") or {}
        self.encodings = bool(text.get("encodings"))
        self.context_length = int(text.get("context_length") or 0)
        self.context_dim = int(text.get("context_dim") or 0)
        self.pooled_dim = int(text.get("pooled_dim") or 0)

    def required_keys(self) -> list[str]:
        keys = list(REQUIRED)
        if self.encodings:
            for tk, mk, pk in ENCODING_KEYS.values():
                keys += [tk, mk] + ([pk] if self.pooled_dim else [])
        return keys

    def decode(self, raw: dict) -> dict:
        """Raw webdataset sample (bytes per file) -> checked numpy / str fields. Raises ShardFormatError naming shard and key."""
        url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
        where = f"shard {url}, sample {key}"
        missing = [k for k in self.required_keys() if k not in raw]
        if missing:
            raise ShardFormatError(f"{where}: missing {', '.join(missing)}")
        latent = load_npy(raw[LATENT], f"{where}: {LATENT}")
        if tuple(latent.shape) != self.latent_shape:
            raise ShardFormatError(f"{where}: latent shape {tuple(latent.shape)} differs from the manifest's {self.latent_shape}")
        if not np.isfinite(latent).all():
            raise ShardFormatError(f"{where}: latent holds NaN or infinite values")
        try:
            meta = json.loads(raw[META])
            caption, caption_syn = raw[CAPTION].decode("utf-8"), raw[CAPTION_SYN].decode("utf-8")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShardFormatError(f"{where}: unreadable caption or json ({err})") from err
        out = {"key": key, "url": url, "latent": latent, "caption": caption, "caption_syn": caption_syn,
               "index": int(meta.get("index", -1)), "label": meta.get("label")}
        if self.encodings:
            for which, (tk, mk, pk) in ENCODING_KEYS.items():
                mask = load_npy(raw[mk], f"{where}: {mk}")
                tokens = load_npy(raw[tk], f"{where}: {tk}")
                if mask.dtype != bool or mask.shape != (self.context_length,):
                    raise ShardFormatError(f"{where}: {mk} must be bool ({self.context_length},), got {mask.dtype} {mask.shape}")
                if tokens.shape != (int(mask.sum()), self.context_dim):
                    raise ShardFormatError(f"{where}: {tk} shape {tokens.shape} does not fit {mk} ({int(mask.sum())} real tokens x {self.context_dim})")
                pooled = None
                if self.pooled_dim:
                    pooled = load_npy(raw[pk], f"{where}: {pk}")
                    if pooled.shape != (self.pooled_dim,):
                        raise ShardFormatError(f"{where}: {pk} shape {pooled.shape} differs from the manifest's ({self.pooled_dim},)")
                out[which] = (tokens, mask, pooled)
        return out


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def read_manifest(location: str) -> tuple[dict, str]:
    """Read a manifest from a file, a directory holding manifest.json, or any URL webdataset's gopen opens.

    Returns (manifest, base) where ``base`` is the directory / URL prefix its relative shard names are under.
    """
    path = Path(location)
    if "://" not in location and not location.startswith("pipe:"):
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise ShardFormatError(f"no shard manifest at {path}: write the shards with `python -m flowmatch prepare --out {path.parent}`")
        text, base = path.read_text(), str(path.parent)
    else:
        import webdataset as wds

        try:
            with wds.gopen(location) as stream:
                text = stream.read().decode("utf-8")
        except Exception as err:  # noqa: BLE001 - any transport error, reported with the URL
            raise ShardFormatError(f"cannot read the shard manifest {location}: {err}") from err
        base = location.rsplit("/", 1)[0] if "/" in location else ""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ShardFormatError(f"shard manifest {location} is not valid JSON: {err}") from err
    validate_manifest(manifest, str(location))
    return manifest, base


def validate_manifest(manifest: dict, where: str) -> None:
    if manifest.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{where}: not a {FORMAT_NAME} manifest (format={manifest.get('format')!r})")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise ShardFormatError(f"{where}: format version {manifest.get('version')} is newer than this reader's {FORMAT_VERSION}")
    for field in ("latent", "splits", "autoencoder"):
        if field not in manifest:
            raise ShardFormatError(f"{where}: manifest lacks the field {field!r}")
    latent = manifest["latent"]
    for field in ("shape", "channels", "shift", "scale"):
        if field not in latent:
            raise ShardFormatError(f"{where}: manifest lacks latent.{field}")
    if int(latent["channels"]) != int(latent["shape"][0]):
        raise ShardFormatError(f"{where}: latent.channels {latent['channels']} differs from latent.shape {latent['shape']}")


def write_manifest(manifest: dict, directory: str | Path) -> Path:
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path
