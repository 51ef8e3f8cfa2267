"""Aspect-ratio buckets (SDXL / kohya style): several image sizes in one shard set, each image in the nearest.

A bucket is a size ``(height, width)`` in pixels, named ``"HxW"``. Every side is a multiple of the
autoencoder's downsampling times the network's patch size, so each bucket's latent cuts into whole
patches. Training batches hold one bucket each (the network takes one shape per batch), so a set
of buckets trades a little cropping for keeping most of every picture:

- :func:`make_buckets`: the sizes of about ``target_pixels`` pixels with aspect ratios up to ``max_ratio``;
- :func:`nearest_bucket`: the bucket whose aspect ratio is closest to an image's (in log ratio, so
  2:1 and 1:2 are equally far from 1:1); ties go to the larger bucket (less upscaling);
- :func:`fit_to_bucket`: resize keeping the aspect ratio until the image just covers the bucket,
  then crop the centre: the least that makes an image exactly the bucket's size.
"""

from __future__ import annotations

import math

import numpy as np

Bucket = tuple[int, int]


def bucket_name(bucket: Bucket) -> str:
    """"HxW": height first, as everywhere in flowmatch (arrays are (C, H, W))."""
    return f"{int(bucket[0])}x{int(bucket[1])}"


def check_buckets(buckets, multiple: int) -> list[Bucket]:
    """``buckets`` as a list of (H, W) int tuples; ValueError for an empty list, a malformed entry, a repeated bucket, or a
    side that is not a positive multiple of ``multiple`` (the latent would not cut into whole patches)."""
    if not buckets:
        raise ValueError("the list of buckets is empty: give at least one [height, width]")
    out: list[Bucket] = []
    for b in buckets:
        if len(b) != 2 or any(int(v) != v for v in b):
            raise ValueError(f"bucket {b!r}: expected [height, width] in whole pixels")
        h, w = int(b[0]), int(b[1])
        if h <= 0 or w <= 0 or h % multiple or w % multiple:
            raise ValueError(f"bucket {bucket_name((h, w))}: both sides must be positive multiples of {multiple} "
                             f"(the autoencoder's downsampling x the patch size)")
        if (h, w) in out:
            raise ValueError(f"bucket {bucket_name((h, w))} is listed twice")
        out.append((h, w))
    return out


def make_buckets(target_pixels: int, multiple: int, max_ratio: float = 2.0) -> list[Bucket]:
    """Buckets of at most ``target_pixels`` pixels with sides multiples of ``multiple`` and aspect ratio <= ``max_ratio``.

    As kohya's ``make_bucket_resolutions``: for every width the tallest height that keeps the area within the
    target, and its transpose, plus the largest square. Order: the square first, then by growing aspect ratio,
    each wide bucket before its tall twin (so ``make_buckets(1024, 8)`` = 32x32, 24x40, 40x24).
    """
    if multiple < 1 or max_ratio < 1:
        raise ValueError(f"bucket multiple must be >= 1 and max_ratio >= 1, got {multiple} and {max_ratio}")
    side = math.isqrt(int(target_pixels)) // multiple * multiple
    if side < multiple:
        raise ValueError(f"bucket target of {target_pixels} pixels is below one {multiple}x{multiple} square")
    found = {(side, side)}
    for w in range(multiple, target_pixels // multiple + 1, multiple):
        h = target_pixels // w // multiple * multiple
        if h >= multiple and max(h, w) / min(h, w) <= max_ratio:
            found |= {(h, w), (w, h)}
    return sorted(found, key=lambda b: (round(abs(math.log(b[1] / b[0])), 9), b[1] < b[0], -b[0] * b[1]))


def nearest_bucket(height: int, width: int, buckets: list[Bucket]) -> Bucket:
    """The bucket closest in log aspect ratio to an image of ``height`` x ``width``; ties: the larger area, then the first."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[1] / b[0]) - ratio), 9), -b[0] * b[1]))


def is_small(height: int, width: int, buckets: list[Bucket]) -> bool:
    """True when both sides are below both of every bucket's: whichever bucket took the image would have to enlarge it
    in both directions (prepare skips such images unless asked to upscale them)."""
    return all(height < b[0] and width < b[1] for b in buckets)


def fit_to_bucket(image: np.ndarray, bucket: Bucket) -> np.ndarray:
    """float (C, H, W) in [-1, 1] -> float32 (C, bh, bw): bicubic resize (PIL, as sources.load_image) keeping the aspect
    ratio to the smallest size that covers the bucket, then a centre crop. An image of the bucket's size is returned as is."""
    from PIL import Image

    c, h, w = image.shape
    bh, bw = bucket
    if (h, w) != (bh, bw):
        scale = max(bh / h, bw / w)
        nh, nw = max(bh, round(h * scale)), max(bw, round(w * scale))
        if (nh, nw) != (h, w):
            image = np.stack([np.asarray(Image.fromarray(np.asarray(ch, np.float32)).resize((nw, nh), Image.BICUBIC))
                              for ch in image])
            image = np.clip(image, -1.0, 1.0)  # bicubic overshoots at sharp edges
        top, left = (nh - bh) // 2, (nw - bw) // 2
        image = image[:, top : top + bh, left : left + bw]
    return np.ascontiguousarray(image, dtype=np.float32)


__all__ = ["Bucket", "bucket_name", "check_buckets", "fit_to_bucket", "is_small", "make_buckets", "nearest_bucket"]
