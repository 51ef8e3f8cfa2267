"""The LoRA demo's new concept: the demo digits drawn sideways, captioned with a word the demo never uses.

``prepare --source sideways`` (flowmatch.data.sources.SidewaysDigits, built from the parts here) gives, per
split (the demo's own fixed split: a digit held out of the demo is held out here too), every demo digit twice:

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


__all__ = ["NEW_WORD", "ROTATED_TAG", "describe_sideways", "rotate_ccw", "sideways_caption"]
