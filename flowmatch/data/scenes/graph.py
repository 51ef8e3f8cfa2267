"""The scene graph: what a procedural scene contains, as plain data that round-trips through JSON.

A :class:`Scene` is a light background (one of :data:`BACKGROUNDS`, optionally with a faint texture
drawn from ``texture``, a seed) and 1-4 :class:`SceneObject`\\ s. An object is a shape (:data:`SHAPES`), a
colour (:data:`COLOURS`), a size class (:data:`SIZES`) and the position of its centre of mass ``(x, y)`` in
image coordinates: fractions of the side, x to the right, y DOWN, (0, 0) the top-left corner.

Sizes are equal-area: an object of size class s covers the area of a circle of radius ``SIZES[s]`` (a
fraction of the image side), whatever its shape, so a detector can read the size from the area alone,
before it knows the shape. Shapes are axis-aligned and upright:

==========  ===================================================================  =====================
shape       geometry (r = the size's radius)                                      bounding box (w x h)
==========  ===================================================================  =====================
circle      radius r                                                              2r x 2r
square      side r * sqrt(pi)                                                     1.77r x 1.77r
triangle    isosceles, base = height = r * sqrt(2 pi), apex up; (x, y) its        2.51r x 2.51r
            centroid, a third of the height above the base
==========  ===================================================================  =====================

Relations between two objects are read from their centres with a dead zone (:data:`DEAD_ZONE`): A is
"to the left of" B when B's centre is more than DEAD_ZONE of the side to the right of A's, "above" when it
is more than DEAD_ZONE lower, and so on; closer than that along an axis, neither relation holds on it.
Captions state a relation only with :data:`STATED_MARGIN` to spare, so a pixel of error in a detector's
centre never turns a stated relation false (flowmatch.data.scenes.captions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: shape names, in the order of the shape classifier's classes
SHAPES = ("circle", "square", "triangle")
#: object colours: well separated in RGB (>= 100 apart) and far from every background (>= 180)
COLOURS = {
    "red": (215, 40, 40),
    "yellow": (235, 200, 25),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (150, 50, 190),
    "cyan": (20, 195, 200),
}
#: size class -> radius of the circle of the same area, as a fraction of the image side
SIZES = {"small": 0.09, "large": 0.14}
#: light background colours (no caption names them: they are a nuisance, like the lighting of a photo)
BACKGROUNDS = {"white": (246, 246, 244), "cream": (242, 235, 218), "grey": (222, 223, 225)}
#: the four relations, each with the axis it reads and its sign (+1: the subject's centre is at the smaller coordinate)
RELATIONS = {"left of": ("x", +1), "right of": ("x", -1), "above": ("y", +1), "below": ("y", -1)}
#: centres closer than this (fraction of the side) along an axis are in no relation on that axis
DEAD_ZONE = 0.1
#: captions and prompt scenes state a relation only when it holds with this much more than the dead zone
STATED_MARGIN = 0.03

# half-width and half-height of each shape's bounding box, and the offset of the box's centre from the centre
# of mass (< 0: the box centre is higher, as a triangle's is), all in units of r (see the table above)
_HALF_EXTENT = {"circle": (1.0, 1.0), "square": (math.sqrt(math.pi) / 2, math.sqrt(math.pi) / 2),
                "triangle": (math.sqrt(2 * math.pi) / 2, math.sqrt(2 * math.pi) / 2)}
_BOX_OFFSET_Y = {"circle": 0.0, "square": 0.0, "triangle": -math.sqrt(2 * math.pi) / 6}


def check_name(kind: str, name: str, known) -> str:
    """``name`` if it is one of ``known``, else a ValueError naming it and the known ones."""
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(known)}")
    return name


@dataclass(frozen=True)
class SceneObject:
    """One shape: ``shape``, ``colour``, ``size`` (names) and its centre of mass ``(x, y)`` in [0, 1] image coordinates."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    def __post_init__(self):
        check_name("shape", self.shape, SHAPES)
        check_name("colour", self.colour, COLOURS)
        check_name("size", self.size, SIZES)
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"object centre ({self.x}, {self.y}) is outside the image (coordinates are fractions in [0, 1])")

    @property
    def radius(self) -> float:
        """Radius of the circle of the same area (fraction of the side)."""
        return SIZES[self.size]

    def box(self) -> tuple[float, float, float, float]:
        """Bounding box ``(x0, y0, x1, y1)`` in fractions of the side."""
        r = self.radius
        hw, hh = _HALF_EXTENT[self.shape]
        cy = self.y + _BOX_OFFSET_Y[self.shape] * r
        return self.x - hw * r, cy - hh * r, self.x + hw * r, cy + hh * r

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": self.x, "y": self.y}

    @classmethod
    def from_dict(cls, d: dict) -> "SceneObject":
        return cls(str(d["shape"]), str(d["colour"]), str(d["size"]), float(d["x"]), float(d["y"]))


@dataclass(frozen=True)
class Scene:
    """Objects on a background (a name of :data:`BACKGROUNDS`); ``texture`` seeds the faint background texture (None: plain)."""

    objects: tuple[SceneObject, ...]
    background: str = "white"
    texture: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        check_name("background", self.background, BACKGROUNDS)
        if self.texture is not None and int(self.texture) < 0:
            raise ValueError(f"texture seed must be a non-negative integer or None, got {self.texture}")

    def to_dict(self) -> dict:
        """Plain JSON-able data (a shard stores the graph next to the image)."""
        return {"background": self.background, "texture": self.texture, "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        texture = d.get("texture")
        return cls(tuple(SceneObject.from_dict(o) for o in d["objects"]), str(d.get("background", "white")),
                   None if texture is None else int(texture))


def box_size(shape: str, size: str) -> tuple[float, float]:
    """Width and height of the bounding box of a ``shape`` of size class ``size`` (fractions of the side)."""
    hw, hh = _HALF_EXTENT[check_name("shape", shape, SHAPES)]
    r = SIZES[check_name("size", size, SIZES)]
    return 2 * hw * r, 2 * hh * r


def relation_holds(a, b, relation: str, margin: float = DEAD_ZONE) -> bool:
    """Whether ``a`` is ``relation`` ("left of", "right of", "above", "below") ``b``, read from their centres
    (anything with ``x`` and ``y``): their distance along the relation's axis is more than ``margin``."""
    axis, sign = RELATIONS[check_name("relation", relation, RELATIONS)]
    return sign * (getattr(b, axis) - getattr(a, axis)) > margin


__all__ = ["BACKGROUNDS", "COLOURS", "DEAD_ZONE", "RELATIONS", "SHAPES", "SIZES", "STATED_MARGIN", "Scene", "SceneObject",
           "box_size", "check_name", "relation_holds"]
