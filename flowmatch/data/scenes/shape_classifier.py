"""The small learned shape reader of the scene detector: a tiny MLP on a component's normalised alpha crop.

The detector (flowmatch.data.scenes.detector) cuts each object out as a CROP x CROP alpha map (its coverage,
scaled so its box fills the crop). :class:`ShapeNet` reads that map:

    alpha crop (B, 16, 16) -> flatten -> Linear(256, 64) -> SiLU -> Linear(64, len(SHAPES)) = logits

:func:`train_shape_classifier` trains it on crops of rendered single-object scenes, cut by the detector itself
(so training crops are exactly what it will read), at both image sizes the data uses (32 and 64), with random
colours, sizes, positions, backgrounds and textures, half of them blurred and noised a little as a generator's
images may be (the held-out crops are clean renders). Training examples come from the random stream
``(seed, 1)`` and held-out ones from ``(seed, 2)``; numpy reads those as the integer seeds seed + 2**32 and
seed + 2 * 2**32, so no ``make_scenes(n, s)`` with s < 2**32 draws the same scenes. A few seconds on one CPU
core; deterministic for a seed on a given machine and thread count. The state dict is saved with safetensors,
with the shapes, the training settings (seed, example counts, epochs ...) and the held-out accuracies as
metadata, to a path the caller gives; a later call with the same settings loads it instead of training.

On clean renders the closed-form rule of the detector (fill ratio) is as accurate as this network (both
100% on held-out crops, docs/scenes.md); the learned reader is the one to judge generated images with: it
reads the whole silhouette rather than one number, and has seen blurred and noisy shapes, so it holds up
where the rule breaks (blurred 32x32 renders: docs/scenes.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from flowmatch.atomic_io import atomic_write
from flowmatch.data.scenes.detector import CROP, Component, fill_ratio_shapes, find_components
from flowmatch.data.scenes.graph import SHAPES
from flowmatch.data.scenes.render import degrade, random_scene, render

#: crops per shape for training and for the held-out accuracy
TRAIN_PER_SHAPE, HELD_OUT_PER_SHAPE = 400, 200
#: image sides the examples are rendered at (the data's two sizes)
IMAGE_SIZES = (32, 64)
#: training only: the share of examples degraded, and their largest blur (pixels at 32x32) and noise (levels)
DEGRADED, MAX_BLUR, MAX_NOISE = 0.5, 1.2, 10.0
HIDDEN, EPOCHS, BATCH, LR = 64, 60, 64, 3e-3


class ShapeNet(nn.Module):
    """A tiny MLP: alpha crops (B, CROP, CROP) in [0, 1] -> shape logits (B, len(shapes))."""

    def __init__(self, num_shapes: int = len(SHAPES), hidden: int = HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(CROP * CROP, hidden), nn.SiLU(), nn.Linear(hidden, num_shapes))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.net(crops)


class ShapeClassifier:
    """A trained :class:`ShapeNet` as the detector's shape reader (``detect(image, classifier)``)."""

    def __init__(self, net: ShapeNet, shapes: tuple[str, ...] = SHAPES, settings: dict | None = None,
                 held_out_accuracy: float | None = None, rule_accuracy: float | None = None):
        """``settings``: how it was trained (seed, example counts, epochs: the cache's key); ``held_out_accuracy``: its
        accuracy on held-out crops; ``rule_accuracy``: the closed-form rule's on the same crops."""
        self.net, self.shapes, self.settings = net.eval(), tuple(shapes), dict(settings or {})
        self.held_out_accuracy, self.rule_accuracy = held_out_accuracy, rule_accuracy

    @torch.no_grad()
    def predict(self, crops: np.ndarray) -> np.ndarray:
        """Class indices for float crops (N, CROP, CROP)."""
        if len(crops) == 0:
            return np.zeros(0, np.int64)
        return self.net(torch.from_numpy(np.asarray(crops, np.float32))).argmax(1).numpy()

    def classify(self, components: list[Component]) -> list[str]:
        """The shape names of detector components."""
        crops = np.stack([c.crop for c in components]) if components else np.zeros((0, CROP, CROP))
        return [self.shapes[i] for i in self.predict(crops)]

    def save(self, path: str | Path) -> None:
        """The state dict as safetensors, with shapes, settings and accuracies as metadata (written atomically)."""
        meta = {"shapes": list(self.shapes), "settings": self.settings, "held_out_accuracy": self.held_out_accuracy,
                "rule_accuracy": self.rule_accuracy, "crop": CROP, "hidden": self.net.net[1].out_features}
        data = save({k: v.contiguous() for k, v in self.net.state_dict().items()}, metadata={"shape_classifier": json.dumps(meta)})
        with atomic_write(path) as f:
            f.write(data)

    @classmethod
    def load(cls, path: str | Path) -> "ShapeClassifier":
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("shape_classifier", "{}"))
        if meta.get("crop") != CROP:
            raise ValueError(f"{path} is not a shape classifier for the detector's {CROP}-pixel crops (metadata: {meta})")
        net = ShapeNet(len(meta["shapes"]), int(meta["hidden"]))
        net.load_state_dict(load_file(str(path)))
        return cls(net, tuple(meta["shapes"]), meta["settings"], meta["held_out_accuracy"], meta["rule_accuracy"])


def shape_examples(rng: np.random.Generator, per_shape: int, shapes: tuple[str, ...] = SHAPES,
                   degraded: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Crops (N, CROP, CROP) and labels (N,) of ``per_shape`` single-object scenes per shape, cut by the detector,
    and what the detector's closed-form rule (fill ratio) calls each of them. A share ``degraded`` of the images is
    blurred and noised first (flowmatch.data.scenes.render.degrade, up to :data:`MAX_BLUR` and :data:`MAX_NOISE`)."""
    crops, labels, rule = [], [], []
    for label, shape in enumerate(shapes):
        made = 0
        while made < per_shape:
            size = IMAGE_SIZES[made % len(IMAGE_SIZES)]
            image = render(random_scene(rng, 1, image_size=size, shapes=(shape,)), size)
            worse = rng.random() < degraded
            if worse:
                image = degrade(image, rng, rng.uniform(0, MAX_BLUR) * size / 32, rng.uniform(0, MAX_NOISE))
            components = find_components(image)
            if len(components) != 1:
                if not worse:  # cannot happen on a clean render: the detector would be broken
                    raise RuntimeError(f"the detector found {len(components)} objects in a rendered single {shape}")
                continue
            crops.append(components[0].crop)
            labels.append(label)
            rule += fill_ratio_shapes(components)
            made += 1
    return np.stack(crops).astype(np.float32), np.array(labels, np.int64), rule


def train_shape_classifier(seed: int = 0, path: str | Path | None = None, *, shapes: tuple[str, ...] = SHAPES,
                           per_shape: int = TRAIN_PER_SHAPE, held_out_per_shape: int = HELD_OUT_PER_SHAPE,
                           epochs: int = EPOCHS) -> ShapeClassifier:
    """A :class:`ShapeClassifier` trained from ``seed`` (see the module docstring); cached at ``path`` when given."""
    settings = {"seed": seed, "per_shape": per_shape, "held_out_per_shape": held_out_per_shape, "epochs": epochs,
                "degraded": DEGRADED, "max_blur": MAX_BLUR, "max_noise": MAX_NOISE, "hidden": HIDDEN, "lr": LR, "batch": BATCH}
    if path is not None and Path(path).is_file():
        cached = ShapeClassifier.load(path)
        if cached.settings == settings and cached.shapes == tuple(shapes):
            return cached
    x, y = (torch.from_numpy(a) for a in shape_examples(np.random.default_rng([seed, 1]), per_shape, shapes, DEGRADED)[:2])
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the initial weights come from the seed, without touching the caller's torch RNG
        torch.manual_seed(seed)
        net = ShapeNet(len(shapes))
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(net(x[batch]), y[batch]).backward()
            opt.step()
    classifier = ShapeClassifier(net, shapes, settings)
    held_x, held_y, rule = shape_examples(np.random.default_rng([seed, 2]), held_out_per_shape, shapes)
    classifier.held_out_accuracy = float((classifier.predict(held_x) == held_y).mean())
    classifier.rule_accuracy = float(np.mean([shapes[label] == name for label, name in zip(held_y, rule)]))
    if path is not None:
        classifier.save(path)
    return classifier


__all__ = ["DEGRADED", "EPOCHS", "IMAGE_SIZES", "ShapeClassifier", "ShapeNet", "shape_examples", "train_shape_classifier"]
