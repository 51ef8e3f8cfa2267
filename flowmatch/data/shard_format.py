"""The latent/caption shard format: one webdataset tar sample per image, and one manifest per shard set.

A sample (``__key__`` = ``{split}_{index:07d}``; keys never contain dots):

==================  ===========================================================================
file in the tar     content
==================  ===========================================================================
KEY.latent.npy      float16 (C, h, w): the autoencoder's latent, NOT normalised
KEY.caption.txt     the original caption (UTF-8)
KEY.caption_syn.txt the synthetic caption (UTF-8)
KEY.json            {"index": position in the split, "size": [H, W], "channels": image channels,
                    "source": where the image came from, "label": int (optional),
                    "bucket": "HxW" (only in a set with aspect-ratio buckets),
                    "scene": the scene graph (only from prepare --source scenes:
                    flowmatch.data.scenes.graph.Scene.to_dict; read it with
                    flowmatch.data.scenes.source.scene_of)}
KEY.tokens.npy      float16 (n_orig + n_syn, D): token states of the real tokens of the original
                    caption, then of the synthetic one                          (only when the
KEY.mask.npy        bool (2, L): row 0 original, row 1 synthetic; True where     shards hold
                    a real token sits in the padded sequence                    text encodings)
KEY.pooled.npy      float16 (2, P): pooled vectors of the original and the synthetic caption
==================  ===========================================================================

Optional fields of KEY.json are optional for the reader too: a sample without "label", "bucket" or "scene" (every
sample written before the field existed) decodes as before, with None for it. Adding one is backward compatible in
both directions (an older reader ignores a json field it does not know), so it needs no new format version.

Only the real token states are stored; a reader scatters them into zeros (L, D) at the mask's
True positions (the padded positions are masked out by the network anyway). Seven files per
sample: each tar member costs the reader time, so both captions' encodings share three arrays.

The manifest (``manifest.json`` beside the shards) records everything a training run checks
before it starts: the splits with their shard files and sample counts, the latent shape and
channel count, the normalisation (z - shift) * scale, the autoencoder (a spec that rebuilds it,
for decoding), the image size, and the text encoders with pooled_dim / context_dim / context_length.

A set with aspect-ratio buckets (prepare with buckets; flowmatch.data.buckets) holds latents of several shapes
and says which in the manifest's "buckets" entry (a manifest without it holds one shape, latent.shape)::

    "buckets": {"names": ["32x32", "24x40", ...], "sizes": [[H, W], ...] (pixels), "latent_sizes": [[h, w], ...],
                "counts": {"train": [samples per bucket], "val": [...], "test": [...]},
                "target_pixels": int or null, "small_images": "skip" | "upscale",
                "skipped_small": {"train": n, "val": n, "test": n}}

in the buckets' configured order. latent.shape and image.size are then those of the bucket with the most
training samples (ties: the first). val and test samples are sorted by bucket (each bucket's indices are
consecutive); train shards mix buckets.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from flowmatch.networks.conditioning import ConditioningMismatchError

FORMAT_NAME = "flowmatch-latent-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")

LATENT = "latent.npy"
CAPTION = "caption.txt"
CAPTION_SYN = "caption_syn.txt"
META = "json"
TOKENS, MASK, POOLED = "tokens.npy", "mask.npy", "pooled.npy"
CAPTION_ROWS = ("orig", "syn")  # row 0 / row 1 of the encoding arrays
REQUIRED = (LATENT, CAPTION, CAPTION_SYN, META)


class ShardFormatError(ValueError):
    """A shard, sample or manifest that does not follow the format; the message names the file and key."""


class ManifestMismatchError(ConditioningMismatchError):
    """The shard set does not fit the model (channels, size, text dimensions); names the manifest and the field."""


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:07d}"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def load_npy(data: bytes, what: str) -> np.ndarray:
    """An .npy payload -> array (read-only view of ``data``). Headers are parsed once and cached (the same few
    shapes repeat in every shard), which makes this several times faster than np.load; no pickles."""
    try:
        if data[:6] == b"\x93NUMPY" and data[6] == 1:
            end = 10 + int.from_bytes(data[8:10], "little")
            header = data[10:end]
            parsed = _NPY_HEADERS.get(header)
            if parsed is None:
                fields = np.lib.format.read_array_header_1_0(io.BytesIO(data[8:end]))
                if fields[1] or len(_NPY_HEADERS) > 4096:  # Fortran order, or an unusual variety: the slow path
                    return np.load(io.BytesIO(data), allow_pickle=False)
                parsed = _NPY_HEADERS[header] = (fields[2], tuple(fields[0]))
            dtype, shape = parsed
            if dtype.hasobject:
                raise ValueError("object arrays are not allowed")
            return np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=end).reshape(shape)
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
    if encodings:
        masks = np.stack([np.asarray(encodings[w][1], dtype=bool) for w in CAPTION_ROWS])
        out[TOKENS] = npy_bytes(np.concatenate([np.asarray(encodings[w][0])[m] for w, m in zip(CAPTION_ROWS, masks)]).astype(np.float16))
        out[MASK] = npy_bytes(masks)
        if encodings["orig"][2] is not None:
            out[POOLED] = npy_bytes(np.stack([np.asarray(encodings[w][2]) for w in CAPTION_ROWS]).astype(np.float16))
    return out


class SampleSpec:
    """What every sample of a shard set must look like (from its manifest); decodes and checks raw samples."""

    def __init__(self, manifest: dict):
        latent = manifest["latent"]
        self.latent_shape = tuple(int(v) for v in latent["shape"])
        buckets = manifest.get("buckets")
        #: bucket name -> its latent shape (C, h, w); None for a set of one shape
        self.bucket_shapes: dict[str, tuple[int, int, int]] | None = None
        if buckets:
            c = self.latent_shape[0]
            self.bucket_shapes = {name: (c, int(h), int(w)) for name, (h, w) in zip(buckets["names"], buckets["latent_sizes"])}
        text = manifest.get("text") or {}
        self.encodings = bool(text.get("encodings"))
        self.context_length = int(text.get("context_length") or 0)
        self.context_dim = int(text.get("context_dim") or 0)
        self.pooled_dim = int(text.get("pooled_dim") or 0)

    def required_keys(self) -> list[str]:
        keys = list(REQUIRED)
        if self.encodings:
            keys += [TOKENS, MASK] + ([POOLED] if self.pooled_dim else [])
        return keys

    def _check_bucket(self, where: str, latent: np.ndarray, meta: dict) -> None:
        """A bucketed set: the latent has the shape of one of the manifest's buckets, the one its json names."""
        shape = tuple(latent.shape)
        bucket = meta.get("bucket")
        if bucket is not None and bucket not in self.bucket_shapes:
            raise ShardFormatError(f"{where}: bucket {bucket!r} is not one of the manifest's ({', '.join(self.bucket_shapes)})")
        if bucket is not None and shape != self.bucket_shapes[bucket]:
            raise ShardFormatError(f"{where}: latent shape {shape} differs from bucket {bucket}'s {self.bucket_shapes[bucket]}")
        if shape not in self.bucket_shapes.values():
            raise ShardFormatError(f"{where}: latent shape {shape} is none of the manifest's buckets' ({', '.join(map(str, self.bucket_shapes.values()))})")

    def decode(self, raw: dict) -> dict:
        """Raw webdataset sample (bytes per file) -> checked numpy / str fields. Raises ShardFormatError naming shard and key."""
        url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
        where = f"shard {url}, sample {key}"
        missing = [k for k in self.required_keys() if k not in raw]
        if missing:
            raise ShardFormatError(f"{where}: missing {', '.join(missing)}")
        latent = load_npy(raw[LATENT], f"{where}: {LATENT}")
        if self.bucket_shapes is None and tuple(latent.shape) != self.latent_shape:
            raise ShardFormatError(f"{where}: latent shape {tuple(latent.shape)} differs from the manifest's {self.latent_shape}")
        if not np.isfinite(latent).all():
            raise ShardFormatError(f"{where}: latent holds NaN or infinite values")
        try:
            meta = json.loads(raw[META])
            caption, caption_syn = raw[CAPTION].decode("utf-8"), raw[CAPTION_SYN].decode("utf-8")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShardFormatError(f"{where}: unreadable caption or json ({err})") from err
        if self.bucket_shapes is not None:
            self._check_bucket(where, latent, meta)
        scene = meta.get("scene")
        if scene is not None and not isinstance(scene, dict):
            raise ShardFormatError(f"{where}: the json's scene must be an object (a scene graph), got {type(scene).__name__}")
        out = {"key": key, "url": url, "latent": latent, "caption": caption, "caption_syn": caption_syn,
               "index": int(meta.get("index", -1)), "label": meta.get("label"), "scene": scene, "meta": meta}
        if self.encodings:
            mask = load_npy(raw[MASK], f"{where}: {MASK}")
            tokens = load_npy(raw[TOKENS], f"{where}: {TOKENS}")
            if mask.dtype != bool or mask.shape != (2, self.context_length):
                raise ShardFormatError(f"{where}: {MASK} must be bool (2, {self.context_length}), got {mask.dtype} {mask.shape}")
            n_orig, n_syn = int(mask[0].sum()), int(mask[1].sum())
            if tokens.shape != (n_orig + n_syn, self.context_dim):
                raise ShardFormatError(f"{where}: {TOKENS} shape {tokens.shape} does not fit {MASK} ({n_orig} + {n_syn} real tokens x {self.context_dim})")
            pooled = (None, None)
            if self.pooled_dim:
                pooled = load_npy(raw[POOLED], f"{where}: {POOLED}")
                if pooled.shape != (2, self.pooled_dim):
                    raise ShardFormatError(f"{where}: {POOLED} shape {pooled.shape} differs from the manifest's (2, {self.pooled_dim})")
            out["orig"] = (tokens[:n_orig], mask[0], pooled[0])
            out["syn"] = (tokens[n_orig:], mask[1], pooled[1])
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
    if "buckets" in manifest:
        _validate_buckets(manifest, where)


def _validate_buckets(manifest: dict, where: str) -> None:
    """The "buckets" entry: names, sizes and latent_sizes of equal length, a count per bucket per split summing to the split's samples."""
    b = manifest["buckets"]
    if not isinstance(b, dict):
        raise ShardFormatError(f"{where}: manifest buckets must be an object, got {type(b).__name__}")
    for field in ("names", "sizes", "latent_sizes", "counts"):
        if field not in b:
            raise ShardFormatError(f"{where}: manifest lacks buckets.{field}")
    n = len(b["names"])
    if n == 0 or len(b["sizes"]) != n or len(b["latent_sizes"]) != n:
        raise ShardFormatError(f"{where}: buckets.names, sizes and latent_sizes must be non-empty lists of one length, "
                               f"got {n}, {len(b['sizes'])} and {len(b['latent_sizes'])}")
    for name, size, lsize in zip(b["names"], b["sizes"], b["latent_sizes"]):
        if len(size) != 2 or len(lsize) != 2 or name != f"{size[0]}x{size[1]}":
            raise ShardFormatError(f"{where}: bucket {name!r} has size {size} and latent size {lsize}; expected [H, W] each and the name 'HxW'")
    for split, info in manifest["splits"].items():
        counts = b["counts"].get(split)
        if counts is None or len(counts) != n:
            raise ShardFormatError(f"{where}: buckets.counts.{split} must give {n} counts (one per bucket), got {counts}")
        if sum(counts) != int(info.get("samples", sum(info.get("counts", [])))):
            raise ShardFormatError(f"{where}: buckets.counts.{split} sums to {sum(counts)} but the split holds {info.get('samples')} samples")


def write_manifest(manifest: dict, directory: str | Path) -> Path:
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path
