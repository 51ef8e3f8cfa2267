"""SD3's caption mixing: each sample takes its synthetic caption with probability p, else its original one.

The draw is a hash of (seed, epoch, sample key), not a stateful generator: it is reproducible from
the seed whatever the number of workers, ranks or the shuffle order, differs between epochs, and
is fixed for validation (epoch 0). SD3 (§5.2.2) draws 50 : 50 between original captions and
CogVLM's synthetic captions.
"""

from __future__ import annotations

import hashlib


def mixing_draw(seed: int, epoch: int, key: str) -> float:
    """A uniform number in [0, 1) determined by (seed, epoch, key)."""
    digest = hashlib.blake2b(f"{seed}\x1f{epoch}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def use_synthetic(p: float, seed: int, epoch: int, key: str) -> bool:
    """True when the sample ``key`` takes its synthetic caption in this epoch (probability ``p``)."""
    if p <= 0:
        return False
    if p >= 1:
        return True
    return mixing_draw(seed, epoch, key) < p
