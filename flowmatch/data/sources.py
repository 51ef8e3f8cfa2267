"""Where ``prepare`` takes images and captions from: the built-in demo, a folder of images, or a jsonl file.

Every source gives, per split, a list of :class:`Record` (caption, synthetic caption, optional
label, where the image came from) and loads the images of any slice of it on demand as float32
(n, C, size, size) in [-1, 1].

- ``demo``: scikit-learn's digits (flowmatch.data.digits), 1 channel; original caption "a 7",
  synthetic caption from the describer.
- ``sideways``: the LoRA demo's new concept (flowmatch.data.sideways): every demo digit upright with its
  own captions and turned 90 degrees with captions using a new word ("a sideways 7"), on the demo's split.
- ``demo_buckets``: the aspect-ratio buckets demo (flowmatch.data.placed_digits): every demo digit on a square,
  wide or tall canvas, its place in the synthetic caption ("a 3 on the left of a wide picture"); its own buckets.
- ``scenes``: procedural RGB scenes of 1-4 coloured shapes (flowmatch.data.scenes.source, docs/scenes.md), ``num``
  of them drawn with ``seed``; original caption "a red circle", synthetic caption from the scene graph, label the
  number of objects, and the scene graph itself in every sample's json (field "scene").
- a folder: every .png / .jpg / .jpeg / .bmp / .webp below it (sorted); the caption is in a
  sidecar ``NAME.txt`` (else the file name, underscores as spaces), the synthetic caption in
  ``NAME.syn.txt`` (else the original caption is used for both: the sample then takes no part in mixing).
- a ``.jsonl`` file: one object per line, ``{"image": path (relative to the file), "caption": str,
  "synthetic_caption": str (optional), "label": int (optional)}``.

Images are centre-cropped to a square and resized (bicubic) to ``size``; splits come from a fixed
permutation (``seed``) so a re-run assigns every image to the same split. For aspect-ratio buckets
(flowmatch.data.buckets) prepare asks instead for each image's native size (:meth:`Source.image_size`) and
the images themselves uncropped (:meth:`Source.load_native`), and fits each to its bucket itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flowmatch.data import placed_digits
from flowmatch.data.buckets import fit_to_bucket
from flowmatch.data.digits import describe_digits, load_digit_images, original_caption
from flowmatch.data.source_base import Record, Source, SourceError  # noqa: F401 - the types, re-exported here
from flowmatch.data.sideways import ROTATED_TAG, describe_sideways, rotate_ccw, sideways_caption

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


class DemoDigits(Source):
    name = "demo"

    def __init__(self, size: int = 32):
        self.size, self.channels = size, 1
        images, labels = load_digit_images(size)
        self._images = {f"sklearn-digits:{i}": images[i] for i in range(len(labels))}
        synthetic = describe_digits(images, labels)
        self.records = [Record(original_caption(int(lab)), syn, f"sklearn-digits:{i}", int(lab)) for i, (lab, syn) in enumerate(zip(labels, synthetic))]

    def load_images(self, records: list[Record]) -> np.ndarray:
        return np.stack([self._images[r.source] for r in records]) if records else np.zeros((0, 1, self.size, self.size), np.float32)


class SidewaysDigits(Source):
    """The demo digits upright (their own captions) and turned 90 degrees counter-clockwise (captions with the
    new word "sideways"), two records per digit, on the demo's split (flowmatch.data.sideways says why and how)."""

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


class PlacedDigits(Source):
    """The demo digits each on a square, wide or tall canvas of its own size (flowmatch.data.placed_digits), one record
    per digit in the demo's order (so on the demo's split); the placement is drawn per digit with ``placement_seed``."""

    name = placed_digits.NAME
    buckets = placed_digits.DEFAULT_BUCKETS

    def __init__(self, size: int = 32, placement_seed: int = 0):
        self.size, self.channels = size, 1
        canvases, labels, placements = placed_digits.placed_digit_canvases(placement_seed)
        templates = np.random.default_rng(placement_seed + 1).integers(0, len(placed_digits.TEMPLATES), len(labels))
        self.records, self._canvases = [], {}
        for i, (placement, label, canvas, t) in enumerate(zip(placements, labels, canvases, templates)):
            key = f"sklearn-digits:{i}:{placement}"
            self._canvases[key] = canvas
            self.records.append(Record(original_caption(int(label)), placed_digits.placed_caption(int(label), placement, int(t)), key, int(label)))

    def image_size(self, record: Record) -> tuple[int, int]:
        return self._canvases[record.source].shape[1:]

    def load_native(self, records: list[Record]) -> list[np.ndarray]:
        return [self._canvases[r.source] for r in records]

    def load_images(self, records: list[Record]) -> np.ndarray:
        """Square images of ``size`` (each canvas fitted as a bucket of size x size would be)."""
        if not records:
            return np.zeros((0, 1, self.size, self.size), np.float32)
        return np.stack([fit_to_bucket(im, (self.size, self.size)) for im in self.load_native(records)])


def load_image(path: Path, size: int | None, channels: int) -> np.ndarray:
    """One image file -> float32 (channels, size, size) in [-1, 1] (centre crop to a square, bicubic resize);
    ``size`` None: the image as it is, (channels, H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None:
                w, h = img.size
                s = min(w, h)
                img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                img = img.resize((size, size), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as err:
        raise SourceError(f"cannot read image {path}: {err}") from err
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr / 127.5 - 1.0


class _FileSource(Source):
    def load_images(self, records: list[Record]) -> np.ndarray:
        if not records:
            return np.zeros((0, self.channels, self.size, self.size), np.float32)
        return np.stack([load_image(Path(r.source), self.size, self.channels) for r in records])

    def image_size(self, record: Record) -> tuple[int, int]:
        """Read from the file's header only."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(record.source) as img:
                w, h = img.size
        except (OSError, UnidentifiedImageError) as err:
            raise SourceError(f"cannot read image {record.source}: {err}") from err
        return (h, w)

    def load_native(self, records: list[Record]) -> list[np.ndarray]:
        return [load_image(Path(r.source), None, self.channels) for r in records]


class ImageFolder(_FileSource):
    def __init__(self, folder: str | Path, size: int = 32, channels: int = 3):
        self.name, self.size, self.channels = str(folder), size, channels
        root = Path(folder)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
        self.records = []
        for f in files:
            side = f.with_suffix(".txt")
            syn = f.with_suffix(".syn.txt")
            caption = side.read_text(encoding="utf-8").strip() if side.is_file() else f.stem.replace("_", " ")
            has_syn = syn.is_file()
            self.records.append(Record(caption, syn.read_text(encoding="utf-8").strip() if has_syn else caption, str(f.resolve()), None, has_syn))


class JsonlSource(_FileSource):
    def __init__(self, path: str | Path, size: int = 32, channels: int = 3):
        self.name, self.size, self.channels = str(path), size, channels
        path = Path(path)
        if not path.is_file():
            raise SourceError(f"no such jsonl file: {path}")
        self.records = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise SourceError(f"{where}: expected an object with 'image' and 'caption'")
            for key in ("image", "caption"):
                if not isinstance(obj.get(key), str) or not obj.get(key):
                    raise SourceError(f"{where}: missing or empty key {key!r}")
            image = Path(obj["image"])
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                raise SourceError(f"{where}: image {image} does not exist")
            label = obj.get("label")
            if label is not None and not isinstance(label, int):
                raise SourceError(f"{where}: 'label' must be an integer, got {label!r}")
            syn = obj.get("synthetic_caption")
            self.records.append(Record(obj["caption"], syn or obj["caption"], str(image.resolve()), label, bool(syn)))
        if not self.records:
            raise SourceError(f"{path} holds no records")


#: the procedural scenes' name (flowmatch.data.scenes.source.NAME; imported only when they are asked for)
SCENES = "scenes"
#: the sources built into flowmatch, named by a word rather than a path
BUILT_IN_SOURCES = ("demo", "sideways", placed_digits.NAME, SCENES)


def open_source(source: str, size: int | None = None, channels: int | None = None, num: int | None = None, seed: int = 0) -> Source:
    """``demo``, ``sideways``, ``demo_buckets``, ``scenes``, a folder of images, or a .jsonl file (see the module docstring).

    ``num`` (the number of scenes) and ``seed`` (the scenes' seed) are for the scenes, which are drawn, not read."""
    if source == SCENES:
        if channels not in (None, 3):
            raise SourceError(f"--channels {channels}: the scenes are RGB (--channels 3)")
        from flowmatch.data.scenes.source import SceneSource

        return SceneSource(size, num, seed)
    if num is not None:
        raise SourceError(f"--num {num} sets how many scenes the {SCENES!r} source draws; source {source!r} has its own images "
                          f"(--limit N takes a subset of them)")
    if source == "demo":
        if channels not in (None, 1):
            raise SourceError("the demo digits have 1 channel (--channels 1)")
        return DemoDigits(size or 32)
    if source == "sideways":
        if channels not in (None, 1):
            raise SourceError("the sideways demo digits have 1 channel (--channels 1)")
        return SidewaysDigits(size or 32)
    if source == placed_digits.NAME:
        if channels not in (None, 1):
            raise SourceError(f"the {placed_digits.NAME} digits have 1 channel (--channels 1)")
        return PlacedDigits(size or 32)
    path = Path(source)
    if path.is_dir():
        return ImageFolder(path, size or 256, channels or 3)
    if path.suffix == ".jsonl":
        return JsonlSource(path, size or 256, channels or 3)
    if not path.exists():
        raise SourceError(f"source {source!r}: not one of {', '.join(BUILT_IN_SOURCES)} and no such file or folder")
    raise SourceError(f"source {source!r}: expected {', '.join(BUILT_IN_SOURCES)}, a folder of images or a .jsonl file")
