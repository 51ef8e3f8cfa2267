"""Reading an image back into objects: a deterministic detector for scene images (the judge of flowmatch.data.scenes.geneval).

:func:`detect` takes an RGB image (uint8 H x W x 3, or float 3 x H x W in [-1, 1]) and returns a
:class:`DetectedObject` per object it finds:

1. Background. The background is the per-channel median colour (objects never cover half the image). It must
   be a plain light background: within :data:`BACKGROUND_TOLERANCE` of one of the data's backgrounds, and
   at least :data:`MIN_PLAIN_SHARE` of the pixels within :data:`PLAIN_TOLERANCE` of it. Otherwise the image is
   not a scene at all (noise, a dark or busy picture) and no object is reported. The tolerances leave room
   for what a generator gets a little wrong: a tinted background, or pixel noise of ~24 levels.
2. Colour segmentation. Each pixel takes the nearest of the palette's colours and the background in RGB;
   pixels that took a palette colour are foreground, split into 8-connected components
   (``scipy.ndimage.label``). The gaps the renderer keeps between objects guarantee one object per component.
3. Measurement, per component: its colour is the majority of its pixels' palette colours, each vote weighted
   by the pixel's distance from the background (faint edge pixels, whose blends can be nearer another palette
   colour, count little); its purity is the majority's share of the votes. Its coverage ``alpha`` per pixel
   is the pixel's position on the segment from the background to that colour (an anti-aliased edge pixel
   half-way is 0.5), over the component grown by one pixel so faint edges count. Area is the sum of alpha;
   the centre (x, y) the alpha-weighted centroid, as fractions of the side; the size class the nearest
   (in log radius) to the radius of the circle of that area (sizes are equal-area: flowmatch.data.scenes.graph).
4. Objectness. A component is reported only if its radius lies within :data:`SIZE_RANGE` of the size
   classes (specks and sprawling blobs are not objects) and its purity is at least :data:`MIN_PURITY`.
5. Shape. Read from the component's alpha crop, a square around its box scaled to :data:`CROP` x CROP,
   by a shape reader: the small learned classifier of flowmatch.data.scenes.shape_classifier when given,
   else the closed-form rule :func:`fill_ratio_shapes` (area over the area of the soft bounding box:
   pi/4 for a circle, 1 for a square, 1/2 for a triangle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from flowmatch.data.scenes.graph import BACKGROUNDS, COLOURS, SIZES

#: the side of the alpha crop a shape reader sees
CROP = 16
#: the median colour must lie this close (RGB distance) to one of the backgrounds for the image to be a scene
BACKGROUND_TOLERANCE = 60.0
#: share of pixels that must lie within PLAIN_TOLERANCE of the median colour (a plain background)
MIN_PLAIN_SHARE, PLAIN_TOLERANCE = 0.4, 40.0
#: a component's equal-area radius must lie in [lo x the smallest, hi x the largest] size radius
SIZE_RANGE = (0.5, 1.6)
#: the majority colour's least share of a component's (weighted) colour votes
MIN_PURITY = 0.6
#: the closed-form rule's boundaries on the fill ratio: triangle (1/2) | circle (pi/4) | square (1)
FILL_THRESHOLDS = (0.71, 0.91)

_PALETTE = np.array(list(COLOURS.values()), np.float64)
_COLOUR_NAMES = tuple(COLOURS)
_BACKGROUNDS = np.array(list(BACKGROUNDS.values()), np.float64)
_SIZE_NAMES = tuple(SIZES)
_LOG_RADII = np.log(np.array(list(SIZES.values())))


@dataclass(frozen=True)
class Component:
    """A segmented object before its shape is read: ``colour`` (name), centre ``(x, y)`` and equal-area ``radius``
    (fractions of the side), ``box`` (left, top, right, bottom) in pixels (right / bottom exclusive), ``fill``
    (area over the soft bounding box's area), ``purity`` and ``crop`` (float32 (CROP, CROP) alpha in [0, 1])."""

    colour: str
    x: float
    y: float
    radius: float
    box: tuple[int, int, int, int]
    fill: float
    purity: float
    crop: np.ndarray

    @property
    def size(self) -> str:
        return _SIZE_NAMES[int(np.argmin(np.abs(_LOG_RADII - math.log(max(self.radius, 1e-9)))))]


@dataclass(frozen=True)
class DetectedObject:
    """An object :func:`detect` found: ``shape``, ``colour``, ``size`` (names), centre ``(x, y)`` in [0, 1] image
    coordinates (y down) and ``box`` (left, top, right, bottom) in pixels."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    box: tuple[int, int, int, int]


class ShapeReader(Protocol):
    """Anything that names the shapes of components (flowmatch.data.scenes.shape_classifier.ShapeClassifier)."""

    def classify(self, components: list[Component]) -> list[str]: ...


def as_image(image) -> np.ndarray:
    """``image`` as float64 (H, W, 3) in 0..255: uint8 (H, W, 3) as the renderer writes, or a float tensor / array
    (3, H, W) in [-1, 1] as the platform's models produce (flowmatch's image convention)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32).numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8:
        return image.astype(np.float64)
    if image.ndim == 3 and image.shape[0] == 3 and np.issubdtype(image.dtype, np.floating):
        return (np.clip(image.transpose(1, 2, 0).astype(np.float64), -1, 1) + 1) * 127.5
    raise ValueError(f"expected an RGB image: uint8 (H, W, 3) or float (3, H, W) in [-1, 1]; got {image.dtype} {image.shape}")


def scene_background(pixels: np.ndarray) -> np.ndarray | None:
    """The background colour of float (H, W, 3) pixels, or None when the image has no plain light background."""
    median = np.median(pixels.reshape(-1, 3), axis=0)
    if np.linalg.norm(_BACKGROUNDS - median, axis=1).min() > BACKGROUND_TOLERANCE:
        return None
    plain = np.linalg.norm(pixels - median, axis=-1) <= PLAIN_TOLERANCE
    return median if plain.mean() >= MIN_PLAIN_SHARE else None


def _square_crop(alpha: np.ndarray) -> np.ndarray:
    """An alpha patch padded to a centred square and resized to CROP x CROP (float32)."""
    h, w = alpha.shape
    side = max(h, w)
    square = np.zeros((side, side))
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = alpha
    x = torch.from_numpy(square).float()[None, None]
    return F.interpolate(x, size=(CROP, CROP), mode="bilinear", align_corners=False, antialias=side > CROP)[0, 0].numpy()


def find_components(image) -> list[Component]:
    """The objects of an image before their shapes are read (steps 1-4 of the module docstring)."""
    pixels = as_image(image)
    size = pixels.shape[0]
    bg = scene_background(pixels)
    if bg is None:
        return []
    references = np.concatenate([_PALETTE, bg[None]])
    nearest = np.linalg.norm(pixels[:, :, None, :] - references[None, None], axis=-1).argmin(-1)
    labels, count = ndimage.label(nearest < len(_PALETTE), structure=np.ones((3, 3), bool))
    strength = np.linalg.norm(pixels - bg, axis=-1)
    radii = np.exp(_LOG_RADII)
    lo, hi = SIZE_RANGE[0] * radii.min(), SIZE_RANGE[1] * radii.max()
    found = []
    for index, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
        member = labels[rows, cols] == index
        votes = np.bincount(nearest[rows, cols][member], weights=strength[rows, cols][member], minlength=len(_PALETTE) + 1)
        colour = int(votes.argmax())
        purity = float(votes[colour] / max(votes.sum(), 1e-9))
        # grow the box and the component by a pixel (not into other components) so faint edge pixels count
        top, left = max(rows.start - 1, 0), max(cols.start - 1, 0)
        bottom, right = min(rows.stop + 1, size), min(cols.stop + 1, pixels.shape[1])
        own = labels[top:bottom, left:right]
        grown = ndimage.binary_dilation(own == index, structure=np.ones((3, 3), bool)) & ((own == 0) | (own == index))
        direction = _PALETTE[colour] - bg
        alpha = np.clip((pixels[top:bottom, left:right] - bg) @ direction / (direction @ direction), 0, 1) * grown
        area = alpha.sum()
        radius = math.sqrt(area / math.pi) / size
        if not (lo <= radius <= hi) or purity < MIN_PURITY:
            continue
        ys, xs = np.mgrid[top:bottom, left:right] + 0.5
        soft_box = alpha.max(0).sum() * alpha.max(1).sum()  # soft width x soft height: edge columns count partly
        found.append(Component(
            colour=_COLOUR_NAMES[colour], x=float((alpha * xs).sum() / area / pixels.shape[1]),
            y=float((alpha * ys).sum() / area / size), radius=radius, box=(cols.start, rows.start, cols.stop, rows.stop),
            fill=float(area / max(soft_box, 1e-9)), purity=purity, crop=_square_crop(alpha)))
    return found


def fill_ratio_shapes(components: list[Component]) -> list[str]:
    """The closed-form shape rule: the fill ratio (area / soft bounding box) against :data:`FILL_THRESHOLDS`."""
    low, high = FILL_THRESHOLDS
    return ["triangle" if c.fill < low else "circle" if c.fill < high else "square" for c in components]


def detect(image, classifier: ShapeReader | None = None) -> list[DetectedObject]:
    """The objects in ``image`` (see the module docstring), left to right. ``classifier`` reads the shapes (a trained
    flowmatch.data.scenes.shape_classifier.ShapeClassifier); None uses the closed-form rule :func:`fill_ratio_shapes`."""
    components = find_components(image)
    shapes = (classifier.classify(components) if classifier is not None else fill_ratio_shapes(components)) if components else []
    objects = [DetectedObject(shape, c.colour, c.size, c.x, c.y, c.box) for shape, c in zip(shapes, components)]
    return sorted(objects, key=lambda o: (o.x, o.y))


__all__ = ["BACKGROUND_TOLERANCE", "CROP", "Component", "DetectedObject", "FILL_THRESHOLDS", "MIN_PURITY",
           "SIZE_RANGE", "ShapeReader", "as_image", "detect", "fill_ratio_shapes", "find_components", "scene_background"]
