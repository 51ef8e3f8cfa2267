"""The built-in demo data: scikit-learn's 8x8 handwritten digits, upscaled, with two captions each.

- images: the 1,797 digits of ``sklearn.datasets.load_digits`` (values 0..16), bilinearly upscaled
  to ``size`` x ``size`` (32 by default) and mapped to [-1, 1] (background -1, ink +1).
- original caption: the label, as a person would tag it: "a 7", "an 8".
- synthetic caption: written by :func:`describe_digits`, a deterministic describer that looks at
  the image only (measured stroke width, slant, size, aspect and position), standing in for SD3's
  vision-language captioner: "a thick, slightly right-leaning, small seven, left of centre".
  Its words carry what the label does not: e.g. "thick" digits hold more ink than "thin" ones of
  the same class (tests/test_data_digits.py checks this).
- splits: a fixed permutation (seed) cut into train / val / test; held-out digits never reach training.

:class:`DigitsImageDataModule` serves the images themselves (for training the autoencoder).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from flowmatch.data.image_splits import SplitImageDataModule

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "test")

# Category boundaries of the describer's measurements, fixed once from the tertiles of all 1,797
# digits at 32 x 32 (so about a third of the digits fall in each class; the describer itself sees
# one image at a time; tests/test_data_digits.py checks the tertiles). Units: stroke width in pixels of a 32-pixel image, slant as horizontal
# shift per unit height, sizes as fractions of the image side, offsets in pixels of a 32-pixel image.
STROKE_THIN, STROKE_THICK = 4.34, 5.07
SLANT_SLIGHT, SLANT_STRONG = 0.053, 0.121
HEIGHT_SMALL, HEIGHT_LARGE = 0.949, 1.017
ASPECT_NARROW, ASPECT_WIDE = 0.547, 0.625
OFFSET_CENTRE = 1.5  # pixels off centre before "left" / "high" ... is said (about 20% of digits per axis)


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as float32 (N, 8, 8) with values 0..16, and int64 labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def upscale_digits(raw: np.ndarray, size: int = 32) -> np.ndarray:
    """(N, 8, 8) values 0..16 -> float32 (N, 1, size, size) in [-1, 1], bilinear (background exactly -1)."""
    x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).unsqueeze(1) / 16.0
    if size != raw.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).numpy()


def load_digit_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All digits as images float32 (N, 1, size, size) in [-1, 1] and labels int64 (N,)."""
    raw, labels = load_digits_raw()
    return upscale_digits(raw, size), labels


def split_indices(n: int, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """A fixed random partition of range(n) into train / val / test (each sorted; val and test at least 1 when n >= 3)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1) and sum below 1")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1 if val_fraction > 0 and n >= 3 else 0, int(round(n * val_fraction)))
    n_test = max(1 if test_fraction > 0 and n >= 3 else 0, int(round(n * test_fraction)))
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test : n_test + n_val]), "train": np.sort(perm[n_test + n_val :])}


def original_caption(label: int) -> str:
    """The 'human' caption: the label as a tag, "a 7" / "an 8"."""
    return f"{'an' if int(label) == 8 else 'a'} {int(label)}"


# ---------------------------------------------------------------------------------------------
# The describer
# ---------------------------------------------------------------------------------------------


def digit_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Measurements of ink images (N, H, W) or (N, 1, H, W) with values in [-1, 1] (ink = +1).

    Returns arrays (N,): ``ink`` (mean ink over the image, 0..1), ``stroke`` (stroke width in
    pixels of a 32-pixel image: twice the inked area over its boundary length), ``slant``
    (horizontal shift per unit height of the ink's principal axis; > 0 leans right), ``height``
    and ``width`` (the ink's extent, sqrt(12) x its standard deviation along the axis, as fractions
    of the side: 1 for ink spread evenly over the whole side), ``dx`` / ``dy`` (centre of
    ink mass minus image centre, in 32-pixel units; > 0 = right / down).
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4:
        x = x[:, 0]
    n, h, w = x.shape
    ink = np.clip((x + 1) / 2, 0, 1)
    unit = 32.0 / w
    on = ink > 0.5
    area = on.sum((1, 2)).astype(np.float64)
    padded = np.pad(on, ((0, 0), (1, 1), (1, 1)))
    boundary = (padded[:, 1:, :] != padded[:, :-1, :]).sum((1, 2)) + (padded[:, :, 1:] != padded[:, :, :-1]).sum((1, 2))
    stroke = 2 * area / np.maximum(boundary, 1) * unit
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    mass = ink.sum((1, 2)) + 1e-9
    cx = (ink * xs).sum((1, 2)) / mass
    cy = (ink * ys).sum((1, 2)) / mass
    dxs, dys = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    cov_xy = (ink * dxs * dys).sum((1, 2)) / mass
    var_y = (ink * dys * dys).sum((1, 2)) / mass
    slant = -cov_xy / np.maximum(var_y, 1e-9)  # image y points down: a right lean has x growing as y shrinks
    var_x = (ink * dxs * dxs).sum((1, 2)) / mass
    return {
        "ink": ink.mean((1, 2)),
        "stroke": stroke,
        "slant": slant,
        "height": np.sqrt(12 * var_y) / h,
        "width": np.sqrt(12 * var_x) / w,
        "dx": (cx - (w - 1) / 2) * unit,
        "dy": (cy - (h - 1) / 2) * unit,
    }


def _words(f: dict[str, float]) -> tuple[str, str, str, str, str]:
    stroke = "thin" if f["stroke"] < STROKE_THIN else "thick" if f["stroke"] > STROKE_THICK else "medium-weight"
    lean = abs(f["slant"])
    side = "right" if f["slant"] > 0 else "left"
    slant = "upright" if lean < SLANT_SLIGHT else f"slightly {side}-leaning" if lean < SLANT_STRONG else f"strongly {side}-leaning"
    size = "small" if f["height"] < HEIGHT_SMALL else "large" if f["height"] > HEIGHT_LARGE else ""
    aspect = f["width"] / max(f["height"], 1e-9)
    shape = "narrow" if aspect < ASPECT_NARROW else "wide" if aspect > ASPECT_WIDE else ""
    vertical = "high" if f["dy"] < -OFFSET_CENTRE else "low" if f["dy"] > OFFSET_CENTRE else ""
    horizontal = "left" if f["dx"] < -OFFSET_CENTRE else "right" if f["dx"] > OFFSET_CENTRE else ""
    if not vertical and not horizontal:
        position = "in the centre"
    elif vertical and horizontal:
        position = f"{vertical} on the {horizontal}"
    else:
        position = f"sitting {vertical}" if vertical else f"{horizontal} of centre"
    return stroke, slant, size, shape, position


def describe_digits(images: np.ndarray, labels: np.ndarray | None = None) -> list[str]:
    """Synthetic captions of ink images (N, [1,] H, W) in [-1, 1]: "a thick, upright, small seven in the centre".

    Deterministic: the same image (and label) always gives the same words. Without labels the
    digit is called "digit".
    """
    feats = digit_features(images)
    n = len(feats["ink"])
    out = []
    for i in range(n):
        stroke, slant, size, shape, position = _words({k: float(v[i]) for k, v in feats.items()})
        noun = NUMBER_WORDS[int(labels[i])] if labels is not None else "digit"
        adjectives = ", ".join(a for a in (stroke, slant, size, shape) if a)
        out.append(f"a {adjectives} {noun} {position}")
    return out


# ---------------------------------------------------------------------------------------------
# The images as a data module (to train the autoencoder)
# ---------------------------------------------------------------------------------------------


class DigitsImageDataModule(SplitImageDataModule):
    """The upscaled digits as images: batches ``{"x0": float32 (B, 1, size, size) in [-1, 1], "label": int64 (B,)}``.

    The splits are those ``prepare --source demo`` writes (same seed and fractions), so an
    autoencoder trained here never sees the flow model's held-out digits.
    """

    def __init__(self, size: int = 32, batch_size: int = 64, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, num_workers: int = 0):
        """
        Args:
            size: image side after upscaling the 8x8 digits.
            batch_size: images per batch.
            seed: seed of the train / val / test partition (and of the training shuffle).
            val_fraction: share of the digits held out for validation.
            test_fraction: share held out for testing.
            num_workers: DataLoader workers (the data is in memory: 0 is fine).
        """
        super().__init__()
        self.save_hyperparameters()
        self.size, self.batch_size, self.seed, self.num_workers = size, batch_size, seed, num_workers
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    @property
    def sample_shape(self) -> list[int]:
        return [1, self.size, self.size]

    def _split(self, split: str) -> TensorDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")
        if self._images is None:
            self._images, self._labels = load_digit_images(self.size)
        idx = split_indices(len(self._labels), self.seed, self.val_fraction, self.test_fraction)[split]
        return TensorDataset(torch.from_numpy(self._images[idx]), torch.from_numpy(self._labels[idx]))

    @staticmethod
    def _collate(items) -> dict:
        return _collate_images(items)

    def reference_images(self, n: int, split: str = "val") -> torch.Tensor:
        """The first ``n`` images of a split (float32 (n, 1, size, size) in [-1, 1])."""
        return self._split(split).tensors[0][:n]


def _collate_images(items):
    images, labels = zip(*items)
    return {"x0": torch.stack(images), "label": torch.stack(labels)}
