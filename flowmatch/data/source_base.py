"""What a source of images and captions is (flowmatch.data.sources lists the built-in ones): its records, its split
and its image loader. Apart from the sources themselves so that a source defined in its own package (the scenes,
flowmatch.data.scenes.source) can build on it without importing the module that opens it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowmatch.data.buckets import Bucket
from flowmatch.data.digits import split_indices


class SourceError(ValueError):
    """Unreadable source input; the message names the file (and line)."""


@dataclass
class Record:
    caption: str
    caption_syn: str
    source: str  # file path, or "sklearn-digits:INDEX"
    label: int | None = None
    has_synthetic: bool = True
    #: more fields for the sample's json (the scenes' "scene" graph); None: none
    meta: dict | None = None


class Source:
    """A list of records split into train / val / test, and an image loader."""

    name: str
    channels: int
    size: int
    records: list[Record]
    #: the buckets prepare uses unless told others (None: one square size, ``size``)
    buckets: list[Bucket] | None = None
    #: tokens per caption its captions need, prepare's default when --max_length is not given (None: the encoders' own)
    max_length: int | None = None
    #: captions per text-encoder batch when --text_batch_size is not given, and whether each distinct caption of a shard
    #: is encoded once (both change which captions share a batch, so the stored encodings by float rounding: the older
    #: sources keep 256 and every caption, and so write the bytes they always wrote)
    text_batch_size: int = 256
    encode_distinct_captions: bool = False

    def load_images(self, records: list[Record]) -> np.ndarray:
        raise NotImplementedError

    def manifest_entry(self) -> dict | None:
        """What the manifest records about a generated source (its "source_info"); None for the others."""
        return None

    def image_size(self, record: Record) -> tuple[int, int]:
        """(H, W) of the record's image as :meth:`load_native` gives it (decides its bucket before any image is loaded)."""
        return (self.size, self.size)

    def load_native(self, records: list[Record]) -> list[np.ndarray]:
        """The records' images, each float32 (C, H, W) in [-1, 1] of its own size, aspect ratio kept (for bucketing)."""
        return list(self.load_images(records))

    def splits(self, seed: int, val_fraction: float, test_fraction: float, limit: int | None) -> dict[str, list[Record]]:
        records = self.records
        if limit is not None:
            if limit < 1:
                raise SourceError(f"--limit must be >= 1, got {limit}")
            order = np.random.default_rng(seed + 1).permutation(len(records))[:limit]
            records = [records[i] for i in sorted(order)]
        parts = split_indices(len(records), seed, val_fraction, test_fraction)
        return {split: [records[i] for i in idx] for split, idx in parts.items()}
