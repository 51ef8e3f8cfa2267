"""The scenes as a data source of the platform: ``prepare --source scenes`` and the images for the autoencoder.

    python -m flowmatch prepare --source scenes --out data/scenes                       # 6,000 scenes at 32x32
    python -m flowmatch prepare --source scenes --out data/scenes64 --size 64 --num 10000
    python -m flowmatch prepare --source scenes --out data/scenes_ae16 --autoencoder runs/.../last.ckpt

:class:`SceneSource` draws ``num`` scenes with :func:`flowmatch.data.scenes.render.make_scenes` (``seed``: prepare's
``--seed``, which also draws the train / val / test split), 1-4 objects each, and gives one record per scene:

- the original caption and the synthetic caption (flowmatch.data.scenes.captions), drawn with the generator
  ``np.random.default_rng([seed, index])``, so a record's captions follow from (seed, index) alone;
- the label: the number of objects (1-4);
- ``source`` "scenes:INDEX" and the scene graph (:meth:`Scene.to_dict`), which prepare writes into the sample's json
  as its field "scene" (flowmatch.data.shard_format): :func:`scene_of` reads it back from a decoded sample.

The images are RGB (3 channels) in [-1, 1]; rendering is exact, so ``render(scene_of(sample), size)`` is the image a
sample was encoded from. :class:`ScenesImageDataModule` serves the same scenes as images, on the same split, for
training the platform's autoencoder on them (configs/autoencoder/ae_scenes_d16.yaml), so an autoencoder never sees
the held-out scenes of the flow model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from flowmatch.data.image_splits import SplitImageDataModule
from flowmatch.data.scenes.captions import original_caption, synthetic_caption
from flowmatch.data.scenes.graph import Scene
from flowmatch.data.scenes.render import MAX_OBJECTS, MIN_OBJECTS, check_image_size, make_scenes
from flowmatch.data.source_base import Record, Source, SourceError

#: the built-in source's name (flowmatch.data.sources.open_source)
NAME = "scenes"
#: scenes prepare draws unless told otherwise (--num), and their side (--size)
DEFAULT_NUM, DEFAULT_SIZE = 6000, 32
#: the field of a sample's json that holds its scene graph
SCENE_FIELD = "scene"
#: tokens per caption (prepare's default for the scenes; MiniLM's own is 32): a fifth of the synthetic captions are
#: longer than 32 MiniLM tokens, the longest of 16,000 (seeds 0 and 1) 47, so 32 would cut off their last objects
MAX_LENGTH = 64
SPLITS = ("train", "val", "test")


def check_num(num) -> int:
    """``num`` if it is a positive whole number of scenes, else a SourceError naming it."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise SourceError(f"--num {num!r}: the scenes source needs a positive number of scenes (default {DEFAULT_NUM})")
    return int(num)


def check_size(size) -> int:
    """``size`` if the renderer can draw every scene (up to four objects) at that side, else a SourceError naming it."""
    try:
        return check_image_size(size, MAX_OBJECTS)
    except ValueError as err:
        raise SourceError(f"--size {size!r} for the scenes source: {err} (the scenes are made at 32 or 64)") from err


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) -> float32 (n, 3, H, W) in [-1, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """float (n, 3, H, W) in [-1, 1] -> uint8 (n, H, W, 3), rounding to the nearest level (inverse of :func:`to_float`)."""
    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float64)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


class SceneSource(Source):
    """``num`` procedural scenes at ``size`` x ``size``, deterministic for ``seed`` (see the module docstring)."""

    name = NAME
    max_length = MAX_LENGTH
    # its short original captions recur in every shard, and its captions sorted by length pad little in small
    # batches: on a CPU, 32 a batch encodes them about twice as fast as 256
    text_batch_size = 32
    encode_distinct_captions = True

    def __init__(self, size: int | None = None, num: int | None = None, seed: int = 0):
        self.size = check_size(DEFAULT_SIZE if size is None else size)
        self.num, self.seed, self.channels = check_num(DEFAULT_NUM if num is None else num), int(seed), 3
        images, self.records = [], []
        for i, (image, scene) in enumerate(make_scenes(self.num, self.seed, self.size, (MIN_OBJECTS, MAX_OBJECTS))):
            rng = np.random.default_rng([self.seed, i])
            original = original_caption(scene, rng)
            self.records.append(Record(original, synthetic_caption(scene, rng), f"{NAME}:{i}", len(scene.objects),
                                       meta={SCENE_FIELD: scene.to_dict()}))
            images.append(image)
        self._images = np.stack(images)  # uint8 (num, size, size, 3): 3 KB a scene at 32x32

    def index(self, record: Record) -> int:
        prefix, _, index = record.source.partition(":")
        if prefix != NAME or not index.isdigit() or int(index) >= self.num:
            raise SourceError(f"scenes source: no scene {record.source!r} (this source has {self.num})")
        return int(index)

    def load_images(self, records: list[Record]) -> np.ndarray:
        if not records:
            return np.zeros((0, 3, self.size, self.size), np.float32)
        return to_float(self._images[[self.index(r) for r in records]])

    def uint8_images(self, records: list[Record]) -> np.ndarray:
        """The records' images as rendered: uint8 (n, size, size, 3)."""
        return self._images[[self.index(r) for r in records]]

    def manifest_entry(self) -> dict:
        return {"name": NAME, "num": self.num, "size": self.size, "seed": self.seed, "objects": [MIN_OBJECTS, MAX_OBJECTS],
                "label": "number of objects", "sample_field": SCENE_FIELD,
                "scene_graph": "flowmatch.data.scenes.graph.Scene.to_dict (docs/scenes.md)"}


def scene_of(sample: dict) -> Scene:
    """The scene graph of a sample decoded by flowmatch.data.shard_format.SampleSpec (or of its json), as a Scene."""
    scene = sample.get(SCENE_FIELD)
    if scene is None and isinstance(sample.get("meta"), dict):
        scene = sample["meta"].get(SCENE_FIELD)
    if scene is None:
        raise KeyError(f"sample {sample.get('key', '?')} has no scene graph (was it written by prepare --source scenes?)")
    return Scene.from_dict(scene)


class ScenesImageDataModule(SplitImageDataModule):
    """The scenes as images: batches ``{"x0": float32 (B, 3, size, size) in [-1, 1], "label": int64 (B,)}`` (label: the
    number of objects), for training the autoencoder (configs/autoencoder/ae_scenes_d16.yaml).

    The scenes and the split are those ``prepare --source scenes`` writes with the same ``size``, ``num``, ``seed`` and
    fractions, so an autoencoder trained here never sees the flow model's held-out scenes.
    """

    def __init__(self, size: int = DEFAULT_SIZE, num: int = DEFAULT_NUM, batch_size: int = 64, seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, num_workers: int = 0):
        """
        Args:
            size: image side (32 or 64; at least 32, the renderer's minimum).
            num: scenes drawn (as prepare's --num).
            batch_size: images per batch.
            seed: seed of the scenes and of the train / val / test partition (prepare's --seed), and of the shuffle.
            val_fraction: share of the scenes held out for validation.
            test_fraction: share held out for testing.
            num_workers: DataLoader workers (the images are in memory: 0 is fine).
        """
        super().__init__()
        self.save_hyperparameters()
        self.size, self.num = check_size(size), check_num(num)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._splits: dict[str, TensorDataset] | None = None

    @property
    def sample_shape(self) -> list[int]:
        return [3, self.size, self.size]

    def _split(self, split: str) -> TensorDataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")
        if self._splits is None:  # drawn once, on first use (not in the constructor: parsing a config draws nothing)
            source = SceneSource(self.size, self.num, self.seed)
            parts = source.splits(self.seed, self.val_fraction, self.test_fraction, None)
            self._splits = {s: TensorDataset(torch.from_numpy(source.uint8_images(recs)),
                                             torch.tensor([r.label for r in recs], dtype=torch.int64)) for s, recs in parts.items()}
        return self._splits[split]

    @staticmethod
    def _collate(items) -> dict:
        return _collate_images(items)

    def reference_images(self, n: int, split: str = "val") -> torch.Tensor:
        """The first ``n`` images of a split (float32 (n, 3, size, size) in [-1, 1])."""
        return torch.from_numpy(to_float(self._split(split).tensors[0][:n].numpy()))


def _collate_images(items):
    images, labels = zip(*items)
    return {"x0": torch.from_numpy(to_float(torch.stack(images).numpy())), "label": torch.stack(labels)}


__all__ = ["DEFAULT_NUM", "DEFAULT_SIZE", "MAX_LENGTH", "NAME", "SCENE_FIELD", "SceneSource", "ScenesImageDataModule", "check_num", "check_size",
           "scene_of", "to_float", "to_uint8"]
