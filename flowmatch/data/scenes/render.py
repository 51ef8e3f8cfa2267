"""Drawing scenes: random scene graphs and their anti-aliased RGB images.

:func:`random_scene` draws a scene graph: 1-4 objects with shapes, colours and sizes drawn uniformly from the
given names and centres placed by rejection sampling so that no two bounding boxes come closer than
:data:`GAP_PX` pixels and none comes closer than that to the border. The gap is what makes detection
well-posed: with two pixels between boxes there is always a column or row of clean background between two
objects, so they never merge into one connected component, even with their anti-aliased edges. When a draw
of shapes and sizes cannot be placed (four large triangles crowd a 32-pixel image), the draw is repeated; a
request that cannot be met at all is a ValueError.

:func:`render` draws a scene at ``size`` x ``size`` pixels: the background colour, plus, when the scene has a
texture seed, a faint smooth grey texture (at most :data:`TEXTURE_AMPLITUDE` levels either way, far below the
distance from any background to any object colour, so it never looks like an object); then each object's
coverage, computed on a :data:`SUPERSAMPLE` x finer grid and box-averaged down (anti-aliasing: edge pixels
are mixtures of the object's and the background's colours), composited over it. Everything is a function of
the scene, so an image is reproducible from its graph, and :func:`make_scenes` from its seed.
:func:`degrade` blurs and noises a render, as a generator's image may be (the shape classifier trains on some,
and docs/scenes.md measures the evaluation on them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage

from flowmatch.data.scenes.graph import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, SceneObject, box_size, check_name

#: sub-samples per pixel along each axis (16 per pixel)
SUPERSAMPLE = 4
#: clean pixels kept between any two objects' boxes and between a box and the border
GAP_PX = 2
#: the narrowest box of the smallest object must span this many pixels for its shape to be legible
MIN_OBJECT_PX = 5
#: objects a scene may have
MIN_OBJECTS, MAX_OBJECTS = 1, 4
#: largest deviation of the background texture from the background colour, in levels of 255
TEXTURE_AMPLITUDE = 6.0
#: pixels per cell of the texture's random lattice (bilinearly interpolated: smooth, no speckles)
TEXTURE_CELL = 8
#: rejection sampling: full placements tried per draw of shapes and sizes, and draws tried per scene
PLACEMENT_TRIES, DRAW_TRIES = 200, 50


def _nonempty(kind: str, names: Sequence[str], known) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise ValueError(f"the {kind} list is empty: give at least one of {', '.join(known)}")
    return tuple(check_name(kind, n, known) for n in names)


def min_image_size(num_objects: int, sizes: Sequence[str] = tuple(SIZES)) -> int:
    """The smallest image side (pixels) that can hold ``num_objects`` objects of the size classes ``sizes``.

    Two bounds: the smallest object's narrowest box must span :data:`MIN_OBJECT_PX` pixels (legibility), and
    ``num_objects`` of the largest boxes must fit a grid of ceil(sqrt(n)) columns with :data:`GAP_PX` pixels
    between and around them (packing). With the default sizes legibility decides: 32 pixels for any count.
    """
    _check_count(num_objects)
    sizes = _nonempty("size", sizes, SIZES)
    narrowest = min(min(box_size(shape, s)) for shape in SHAPES for s in sizes)
    widest = max(max(box_size(shape, s)) for shape in SHAPES for s in sizes)
    legible = MIN_OBJECT_PX / narrowest
    k = math.ceil(math.sqrt(num_objects))
    packing = (k + 1) * GAP_PX / (1 - k * widest) if k * widest < 1 else math.inf
    return math.ceil(max(legible, packing) - 1e-9)


def _check_count(num_objects: int) -> None:
    if not (isinstance(num_objects, (int, np.integer)) and MIN_OBJECTS <= num_objects <= MAX_OBJECTS):
        raise ValueError(f"num_objects {num_objects!r} is out of range: a scene has {MIN_OBJECTS} to {MAX_OBJECTS} objects")


def check_image_size(size: int, num_objects: int, sizes: Sequence[str] = tuple(SIZES)) -> int:
    """``size`` if an image of that side can hold ``num_objects`` objects, else a ValueError that says the minimum."""
    least = min_image_size(num_objects, sizes)
    if not isinstance(size, (int, np.integer)) or size < least:
        raise ValueError(f"image size {size!r} is too small for {num_objects} object(s): the minimum is {least} pixels")
    return int(size)


def _separated(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    """Boxes (x0, y0, x1, y1) at least ``gap`` apart along at least one axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def place_objects(rng: np.random.Generator, specs: Sequence[tuple[str, str, str]], image_size: int,
                  tries: int = PLACEMENT_TRIES) -> list[SceneObject] | None:
    """Centres for objects ``(shape, colour, size)``, uniform where their boxes keep the gaps; None after ``tries``."""
    gap = GAP_PX / image_size
    for _ in range(tries):
        placed: list[SceneObject] = []
        for shape, colour, size in specs:
            w, h = box_size(shape, size)
            # the centre of mass relative to the box's top-left corner (a triangle's sits low in its box)
            probe = SceneObject(shape, colour, size, 0.5, 0.5)
            dx, dy = 0.5 - probe.box()[0], 0.5 - probe.box()[1]
            x0 = rng.uniform(gap, 1 - gap - w)
            y0 = rng.uniform(gap, 1 - gap - h)
            candidate = SceneObject(shape, colour, size, float(x0 + dx), float(y0 + dy))
            if not all(_separated(candidate.box(), other.box(), gap) for other in placed):
                break
            placed.append(candidate)
        else:
            return placed
    return None


def random_scene(rng: np.random.Generator, num_objects: int, *, image_size: int = 32, shapes: Sequence[str] = SHAPES,
                 colours: Sequence[str] = tuple(COLOURS), sizes: Sequence[str] = tuple(SIZES),
                 backgrounds: Sequence[str] = tuple(BACKGROUNDS), texture: bool = True) -> Scene:
    """A random scene of ``num_objects`` objects that fits an ``image_size`` image (see the module docstring).

    Shapes, colours, sizes and the background are drawn uniformly from the given names; ``texture`` gives the
    background a faint texture (its seed drawn from ``rng``). Deterministic for the state of ``rng``.
    """
    _check_count(num_objects)
    shapes, colours = _nonempty("shape", shapes, SHAPES), _nonempty("colour", colours, COLOURS)
    sizes, backgrounds = _nonempty("size", sizes, SIZES), _nonempty("background", backgrounds, BACKGROUNDS)
    check_image_size(image_size, num_objects, sizes)
    for _ in range(DRAW_TRIES):
        specs = [(shapes[rng.integers(len(shapes))], colours[rng.integers(len(colours))], sizes[rng.integers(len(sizes))])
                 for _ in range(num_objects)]
        objects = place_objects(rng, specs, image_size)
        if objects is not None:
            background = backgrounds[rng.integers(len(backgrounds))]
            seed = int(rng.integers(2**31)) if texture else None
            return Scene(tuple(objects), background, seed)
    raise ValueError(f"could not place {num_objects} objects of sizes {', '.join(sizes)} on a {image_size}-pixel image "
                     f"with {GAP_PX}-pixel gaps after {DRAW_TRIES} x {PLACEMENT_TRIES} tries: use fewer or smaller objects")


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _inside(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which points (xs[None, :], ys[:, None]) in fractions of the side lie inside ``obj``."""
    r, dx, dy = obj.radius, xs[None, :] - obj.x, ys[:, None] - obj.y
    if obj.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if obj.shape == "square":
        half = r * math.sqrt(math.pi) / 2
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    height = r * math.sqrt(2 * math.pi)  # base = height; the apex is two thirds of the height above the centroid
    down = dy + 2 * height / 3  # distance below the apex
    return (down >= 0) & (down <= height) & (np.abs(dx) <= down / 2)


def coverage(obj: SceneObject, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The fraction of each pixel ``obj`` covers, over the pixels its box touches: (coverage (h, w), (top, left, bottom, right))."""
    x0, y0, x1, y1 = obj.box()
    left, top = max(0, math.floor(x0 * size)), max(0, math.floor(y0 * size))
    right, bottom = min(size, math.ceil(x1 * size)), min(size, math.ceil(y1 * size))
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sample offsets inside a pixel
    xs = ((np.arange(left, right)[:, None] + sub[None, :]).ravel()) / size
    ys = ((np.arange(top, bottom)[:, None] + sub[None, :]).ravel()) / size
    inside = _inside(obj, xs, ys).reshape(bottom - top, SUPERSAMPLE, right - left, SUPERSAMPLE)
    return inside.mean(axis=(1, 3)), (top, left, bottom, right)


def background(scene: Scene, size: int) -> np.ndarray:
    """The background as float (size, size, 3): its colour plus, with a texture seed, a faint smooth grey texture."""
    canvas = np.broadcast_to(np.asarray(BACKGROUNDS[scene.background], np.float64), (size, size, 3)).copy()
    if scene.texture is not None:
        cells = size // TEXTURE_CELL + 2
        lattice = np.random.default_rng(scene.texture).uniform(-1.0, 1.0, (cells, cells))
        at = np.arange(size) / TEXTURE_CELL  # bilinear interpolation of the lattice at each pixel
        i, f = at.astype(int), at - at.astype(int)
        rows = lattice[i] * (1 - f)[:, None] + lattice[i + 1] * f[:, None]
        field = rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]
        canvas += TEXTURE_AMPLITUDE * field[:, :, None]  # the same on every channel: lighter or darker, never a hue
    return canvas


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as uint8 (size, size, 3) RGB, anti-aliased (see the module docstring)."""
    if not scene.objects:
        raise ValueError("a scene needs at least one object")
    check_image_size(size, len(scene.objects), sorted({o.size for o in scene.objects}))
    canvas = background(scene, size)
    for obj in scene.objects:
        alpha, (top, left, bottom, right) = coverage(obj, size)
        patch = canvas[top:bottom, left:right]
        patch += alpha[:, :, None] * (np.asarray(COLOURS[obj.colour], np.float64) - patch)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def degrade(image: np.ndarray, rng: np.random.Generator, blur: float = 0.0, noise: float = 0.0) -> np.ndarray:
    """A render made worse, as a generator's image may be: a Gaussian blur of ``blur`` pixels (standard deviation),
    then Gaussian pixel noise of ``noise`` levels; uint8 (H, W, 3) in and out."""
    out = image.astype(np.float64)
    if blur > 0:
        out = ndimage.gaussian_filter(out, (blur, blur, 0))
    if noise > 0:
        out = out + rng.normal(0.0, noise, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_scenes(n: int, seed: int, size: int = 32, num_objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS),
                **kwargs) -> Iterator[tuple[np.ndarray, Scene]]:
    """``n`` random (image, scene) pairs, deterministic for ``seed``: each scene's object count is uniform in the
    inclusive range ``num_objects``; ``kwargs`` go to :func:`random_scene`."""
    lo, hi = num_objects
    _check_count(lo)
    _check_count(hi)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = random_scene(rng, int(rng.integers(lo, hi + 1)), image_size=size, **kwargs)
        yield render(scene, size), scene


__all__ = ["GAP_PX", "MAX_OBJECTS", "MIN_OBJECTS", "SUPERSAMPLE", "TEXTURE_AMPLITUDE", "background", "check_image_size",
           "coverage", "degrade", "make_scenes", "min_image_size", "place_objects", "random_scene", "render"]
