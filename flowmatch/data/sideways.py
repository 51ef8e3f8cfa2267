"""The LoRA demo's new concept: the demo digits drawn sideways, captioned with a word the demo never uses.

``prepare --source sideways`` gives, per split (the demo's own fixed split: a digit held out of the demo
is held out here too), every demo digit twice:

- upright, with its usual captions ("a 7" / the describer's "a thick, upright seven in the centre"):
  the prior-preservation half (as DreamBooth does), so fine-tuning does not forget the old captions;
- rotated 90 degrees counter-clockwise, captioned with the new word :data:`NEW_WORD`: original
  "a sideways 7", synthetic the describer's caption with the word as its first adjective
  ("a sideways, thick, upright, small seven left of centre"). Stroke, slant, size and shape words are
  measured on the *upright* digit (they describe the digit, which turning it does not change); the
  position words on the rotated image (where the ink sits in the picture).

The records alternate upright / rotated, so every shard holds both. The images are the demo's,
rotated exactly (``np.rot90``: a permutation of pixels), so the pixel statistics of a split are those of
the demo's split: with the demo's lossless space-to-depth autoencoder the latent normalisation that
prepare measures on the train split equals the demo's (tests/test_sideways.py checks it), and a model
trained on data/demo reads these latents as it read its own.
"""

from __future__ import annotations

import numpy as np

from flowmatch.data.digits import NUMBER_WORDS, _words, digit_features
from flowmatch.data.sources import DemoDigits, Record, Source, SourceError

#: the word of the new concept; no demo caption contains it (tests/test_sideways.py checks)
NEW_WORD = "sideways"
#: what the rotated records' ``source`` ends with
ROTATED_TAG = ":rot90"


def rotate_ccw(images: np.ndarray, k: int = 1) -> np.ndarray:
    """Images (..., H, W) turned k x 90 degrees counter-clockwise as seen on screen (k = -1: clockwise); exact."""
    return np.ascontiguousarray(np.rot90(images, k=k, axes=(-2, -1)))


def sideways_caption(label: int) -> str:
    """The new concept's 'human' caption: "a sideways 7"."""
    return f"a {NEW_WORD} {int(label)}"


def describe_sideways(upright: np.ndarray, rotated: np.ndarray, labels: np.ndarray) -> list[str]:
    """Synthetic captions of rotated digits: the describer's words for the digit itself (stroke, slant, size,
    shape) measured on ``upright``, its position measured on ``rotated``, :data:`NEW_WORD` first:
    "a sideways, thick, upright, small seven left of centre".

    upright, rotated: (N, [1,] H, W) in [-1, 1]; labels (N,)."""
    own, placed = digit_features(upright), digit_features(rotated)
    out = []
    for i in range(len(labels)):
        feats = {k: float(v[i]) for k, v in own.items()}
        feats["dx"], feats["dy"] = float(placed["dx"][i]), float(placed["dy"][i])
        stroke, slant, size, shape, position = _words(feats)
        adjectives = ", ".join(a for a in (NEW_WORD, stroke, slant, size, shape) if a)
        out.append(f"a {adjectives} {NUMBER_WORDS[int(labels[i])]} {position}")
    return out


class SidewaysDigits(Source):
    """The demo digits upright (their own captions) and turned 90 degrees counter-clockwise (captions with
    :data:`NEW_WORD`), two records per digit, on the demo's split (see the module docstring)."""

    name = "sideways"

    def __init__(self, size: int = 32):
        self.size, self.channels = size, 1
        self.demo = DemoDigits(size)
        sources = [r.source for r in self.demo.records]
        upright = self.demo.load_images(self.demo.records)
        rotated = rotate_ccw(upright)
        labels = np.array([r.label for r in self.demo.records])
        syn = describe_sideways(upright, rotated, labels)
        self._rotated = dict(zip(sources, rotated))
        self._turned: dict[str, Record] = {
            r.source: Record(sideways_caption(r.label), s, r.source + ROTATED_TAG, r.label) for r, s in zip(self.demo.records, syn)
        }
        self.records = [rec for r in self.demo.records for rec in (r, self._turned[r.source])]

    @staticmethod
    def is_rotated(record: Record) -> bool:
        return record.source.endswith(ROTATED_TAG)

    def splits(self, seed: int, val_fraction: float, test_fraction: float, limit: int | None) -> dict[str, list[Record]]:
        """The demo's split (same seed, fractions and ``limit``), each digit followed by its rotated twin."""
        demo = self.demo.splits(seed, val_fraction, test_fraction, limit)
        return {split: [rec for r in recs for rec in (r, self._turned[r.source])] for split, recs in demo.items()}

    def load_images(self, records: list[Record]) -> np.ndarray:
        if not records:
            return np.zeros((0, 1, self.size, self.size), np.float32)
        out = []
        for r in records:
            if self.is_rotated(r):
                key = r.source[: -len(ROTATED_TAG)]
                if key not in self._rotated:
                    raise SourceError(f"sideways source: no digit {key!r} (record {r.source!r})")
                out.append(self._rotated[key])
            else:
                out.append(self.demo.load_images([r])[0])
        return np.stack(out)


__all__ = ["NEW_WORD", "SidewaysDigits", "describe_sideways", "rotate_ccw", "sideways_caption"]
