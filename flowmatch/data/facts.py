"""The facts of a latent/caption data set, in one object: what sampling, metrics, checkpoints and the data
module all need to know about it, read from its manifest (or from the record a checkpoint keeps of it).

A model trained on latent shards generates *normalised latents* conditioned on *text encodings*. Turning
a prompt into an image needs the text encoders that made the encodings (with their max_length), the
autoencoder that decodes the latents and the normalisation (z - shift) * scale. :class:`LatentDataFacts`
holds them, says what condition the data provides (a :class:`~flowmatch.networks.conditioning.ConditioningSpec`,
for :func:`~flowmatch.networks.conditioning.check_fits`), and does the two conversions they allow:
``encode`` (captions -> condition dict; text encoders loaded on first use) and ``decode`` (normalised
latents -> images; autoencoder loaded on first use).

Every checkpoint stores :meth:`LatentDataFacts.record` as ``checkpoint["flowmatch"]["data"]`` (small,
JSON-like, no tensors; the keys are those older checkpoints have)::

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

from flowmatch.data.shard_format import MANIFEST_NAME, ShardFormatError, read_manifest
from flowmatch.networks.conditioning import ConditioningSpec

#: the keys of a text encoder description that HFTextEncoder takes back as arguments
_ENCODER_ARGS = ("path", "max_length", "kind", "hidden_layer", "pooled", "name")
_DIMS = ("pooled_dim", "context_dim", "context_length")


def is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def absolute(location: str) -> str:
    """A local path made absolute (so a checkpoint works from any directory); URLs unchanged."""
    return location if is_url(location) else str(Path(location).resolve())


def encoder_specs(descriptions: list[dict]) -> list[dict]:
    """HFTextEncoder arguments from encoder descriptions (``describe()`` / the manifest's text.encoders)."""
    return [{k: d[k] for k in _ENCODER_ARGS if d.get(k) is not None} for d in descriptions]


def portable_autoencoder_spec(spec: Any) -> Any:
    """A spec that still works from another directory: a relative checkpoint / directory path made absolute."""
    if isinstance(spec, str) and Path(spec).exists():
        return absolute(spec)
    if isinstance(spec, dict):
        spec = dict(spec)
        for key in ("checkpoint", "path"):
            if isinstance(spec.get(key), str) and Path(spec[key]).exists():
                spec[key] = absolute(spec[key])
    return spec


def decode_latents(autoencoder, latents: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> images (B, C_img, H, W) in [-1, 1]: un-normalise (z / scale + shift),
    run the autoencoder's decoder, clamp."""
    with torch.no_grad():
        ae = autoencoder.to(latents.device)
        return ae.decode(latents.float() / scale + shift).clamp(-1, 1)


def is_latent_manifest(manifest: Any) -> bool:
    return isinstance(manifest, dict) and isinstance(manifest.get("latent"), dict) and "autoencoder" in manifest


class LatentDataFacts:
    """Manifest, sample shape, text encoders, autoencoder and latent normalisation of one latent/caption data set.

    Build it with :meth:`read` (a manifest's location), :meth:`from_manifest` (a manifest already read) or
    :meth:`from_record` (what a checkpoint stores). ``text_encoders`` replaces the manifest's encoders with
    ones run on the fly (then the text widths are those of the built encoders), ``autoencoder`` its
    autoencoder, as a data module's own settings do.
    """

    def __init__(self, *, location: str, sample_shape, shift: float, scale: float, autoencoder: Any,
                 encoder_descriptions: list[dict], dims: dict[str, int] | None, image_shape: list[int] | None,
                 manifest: dict | None = None, base: str | None = None, text_encoders: list[str] | None = None):
        self.location = str(location)
        self.sample_shape = [int(v) for v in sample_shape]
        self.shift, self.scale = float(shift), float(scale)
        self.autoencoder_spec = autoencoder
        self.image_shape = image_shape
        self.manifest, self.base = manifest, base
        self._descriptions = list(encoder_descriptions)
        self._dims = dims  # None: the widths of the on-the-fly encoders, known once they are built
        self._own_encoders = text_encoders  # on-the-fly encoders replacing the manifest's
        self._text = None  # the TextEncoderStack, built on first use
        self._autoencoder = None
        self._record: dict | None = None  # the checkpoint record these facts were built from, if any

    # ---- building ----
    @classmethod
    def read(cls, location: str, text_encoders: list[str] | None = None, autoencoder: Any = None) -> "LatentDataFacts":
        """The facts of the shard set at ``location`` (a directory with manifest.json, the manifest file, or a URL)."""
        location = str(location)
        manifest, base = read_manifest(location)
        if not is_url(location) and Path(location).is_dir():
            location = str(Path(location) / MANIFEST_NAME)
        return cls.from_manifest(manifest, location, base, text_encoders, autoencoder)

    @classmethod
    def from_manifest(cls, manifest: dict, location: str, base: str | None = None, text_encoders: list[str] | None = None,
                      autoencoder: Any = None) -> "LatentDataFacts":
        if not is_latent_manifest(manifest):
            raise ShardFormatError(f"{location} is not a latent/caption shard manifest (no 'latent' / 'autoencoder' entries)")
        latent, text, image = manifest["latent"], manifest.get("text") or {}, manifest.get("image") or {}
        size = image.get("size")
        image_shape = [int(image["channels"]), *(int(s) for s in size)] if size and image.get("channels") else None
        own = list(text_encoders) if text_encoders else None
        return cls(location=location, sample_shape=latent["shape"], shift=latent["shift"], scale=latent["scale"],
                   autoencoder=autoencoder if autoencoder is not None else manifest["autoencoder"]["spec"],
                   encoder_descriptions=[] if own else list(text.get("encoders") or []),
                   dims=None if own else {k: int(text.get(k) or 0) for k in _DIMS}, image_shape=image_shape,
                   manifest=manifest, base=base if base is not None else str(Path(location).parent), text_encoders=own)

    @classmethod
    def from_record(cls, record: dict) -> "LatentDataFacts":
        """The facts a checkpoint recorded (:meth:`record`): everything but the manifest itself."""
        facts = cls(location=record.get("manifest", ""), sample_shape=record["latent_shape"], shift=record["shift"],
                    scale=record["scale"], autoencoder=record["autoencoder"], encoder_descriptions=record.get("text_encoders") or [],
                    dims={k: int(record.get(k) or 0) for k in _DIMS}, image_shape=record.get("image_shape"))
        facts._record = dict(record)  # handed on unchanged (a checkpoint written elsewhere keeps its paths)
        return facts

    # ---- what the data provides ----
    @property
    def stores_encodings(self) -> bool:
        """The shards hold the captions' encodings (and no encoders replace them): nothing to encode while training."""
        return self._own_encoders is None and bool(((self.manifest or {}).get("text") or {}).get("encodings"))

    @property
    def encodes_on_the_fly(self) -> bool:
        """Captions are encoded after the batch reaches its device (the shards hold no encodings, or encoders were given)."""
        return self.manifest is not None and not self.stores_encodings

    def _dim(self, name: str) -> int:
        if self._dims is None:
            return int(getattr(self.text_encoders, name))
        return self._dims[name]

    @property
    def pooled_dim(self) -> int:
        return self._dim("pooled_dim")

    @property
    def context_dim(self) -> int:
        return self._dim("context_dim")

    @property
    def context_length(self) -> int:
        return self._dim("context_length")

    @property
    def buckets(self) -> list[dict]:
        """The aspect-ratio buckets of the set: [{"name": "24x40", "size": [H, W] pixels, "latent_size": [h, w]}], in the
        manifest's order; [] for a single-shape set (``sample_shape`` is then the only shape). A checkpoint keeps them."""
        if self._record is not None:
            return [dict(b) for b in self._record.get("buckets") or []]
        info = (self.manifest or {}).get("buckets")
        if not info:
            return []
        return [{"name": n, "size": [int(v) for v in size], "latent_size": [int(v) for v in lat]}
                for n, size, lat in zip(info["names"], info["sizes"], info["latent_sizes"])]

    @property
    def sample_shapes(self) -> list[list[int]]:
        """Every latent shape (C, h, w) the set holds: one per bucket, or ``sample_shape`` alone."""
        if not self.buckets:
            return [list(self.sample_shape)]
        return [[self.num_channels, *b["latent_size"]] for b in self.buckets]

    @property
    def num_channels(self) -> int:
        return self.sample_shape[0]

    @property
    def conditioning(self) -> ConditioningSpec:
        """What condition the data provides: text (a pooled vector and one token stream), never "not conditional"."""
        return ConditioningSpec.text(self.pooled_dim, self.context_dim, self.context_length or None)

    @property
    def encoder_descriptions(self) -> list[dict]:
        if self._own_encoders is not None:
            return self.text_encoders.describe()["encoders"]
        return self._descriptions

    @property
    def max_lengths(self) -> list[int | None]:
        return [d.get("max_length") for d in self.encoder_descriptions]

    # ---- conversions ----
    @property
    def text_encoders(self):
        """The TextEncoderStack, built on first use: the encoders given as ``text_encoders``, else those the
        manifest (or checkpoint) names, which made the stored encodings, so new captions match them."""
        if self._text is None:
            from flowmatch.text.encoders import build_text_encoders

            if self._own_encoders is not None:
                stack = build_text_encoders(self._own_encoders, None)
            else:
                specs = encoder_specs(self._descriptions)
                if not specs:
                    raise ShardFormatError(f"{self.location}: the manifest names no text encoders: give text_encoders=[...]")
                stack = build_text_encoders(specs, [s.get("max_length") for s in specs])
            # encoders that encode training batches run as built; those that only encode prompts in eval mode
            self._text = stack if self.encodes_on_the_fly else stack.eval()
        return self._text

    def encode(self, captions: list[str], device: torch.device | str = "cpu") -> dict:
        """The condition dict {"pooled", "tokens", "mask"} of a list of captions, on ``device``."""
        text = self.text_encoders
        text.to(device)
        return text.encode(list(captions)).as_cond()

    @property
    def autoencoder(self):
        """The autoencoder that decodes the latents, in eval mode; loaded on first use."""
        if self._autoencoder is None:
            self.load_autoencoder()
        return self._autoencoder

    def load_autoencoder(self, device: torch.device | str | None = None):
        """Load the autoencoder (onto ``device``, if given), in eval mode, and keep it for ``decode``."""
        from flowmatch.autoencoders.base import load_autoencoder

        if device is None:
            self._autoencoder = load_autoencoder(self.autoencoder_spec).eval()
        else:
            self._autoencoder = load_autoencoder(self.autoencoder_spec, map_location=str(device)).to(device).eval()
        return self._autoencoder

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, C_img, H, W) in [-1, 1]: un-normalise, then the autoencoder's decoder."""
        return decode_latents(self.autoencoder, latents, self.shift, self.scale)

    # ---- what a checkpoint keeps ----
    def record(self) -> dict:
        """The checkpoint record (module docstring): same keys and values as checkpoints have always had."""
        if self._record is not None:
            return dict(self._record)
        return {
            "manifest": absolute(self.location),
            "text_encoders": encoder_specs(self.encoder_descriptions),
            **{k: self._dim(k) for k in _DIMS},
            "autoencoder": portable_autoencoder_spec(self.autoencoder_spec),
            "shift": self.shift,
            "scale": self.scale,
            "latent_shape": list(self.sample_shape),
            "image_shape": self.image_shape,
            **({"buckets": self.buckets} if self.buckets else {}),  # only sets with buckets: older records stay as they were
        }

    def __repr__(self) -> str:
        return f"LatentDataFacts({self.location}, latents {tuple(self.sample_shape)}, {self.conditioning.describe()})"


def facts_of(datamodule) -> LatentDataFacts | None:
    """The facts of a data module that reads latent shards (one with ``facts``); None for other data."""
    facts = getattr(datamodule, "facts", None)
    return facts if isinstance(facts, LatentDataFacts) else None
