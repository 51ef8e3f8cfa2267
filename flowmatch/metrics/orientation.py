"""Adherence to the LoRA demo's new concept ("a sideways 7": the digit turned 90 degrees counter-clockwise)
and to the old captions ("a 7"), judged by two small classifiers.

- **orientation classifier**: the demo's :class:`~flowmatch.classifiers.DigitClassifier` CNN with 2 classes,
  upright (0) vs turned 90 degrees counter-clockwise (1), trained on the real TRAIN-split demo digits (each
  digit in both orientations, random shifts of up to 2 pixels) by :func:`train_orientation_classifier`;
  stored at :data:`DEFAULT_PATH` (:func:`ensure_orientation_classifier` trains it when missing, ~7 s on one
  CPU thread) and read back like the digit classifier (flowmatch.metrics.frechet.load_feature_network).
  Held-out accuracy (the 180 test digits, both orientations) is recorded in the checkpoint.
- **digit classifier**: the demo's own (runs/feature_networks/digits_classifier/last.ckpt), as the
  ImageSampleMetrics callback uses it.

:func:`concept_adherence` of images generated for "a sideways k" gives

- ``sideways_rate``: the share the orientation classifier judges turned;
- ``digit_rate``: the share showing digit k once turned back (90 degrees clockwise);
- ``new_caption_adherence``: the share that is both: turned AND digit k when turned back.

:func:`caption_adherence` of images generated for "a k" is the callback's ``caption_acc``: the share the
digit classifier assigns to class k. The orientation classifier knows only upright vs counter-clockwise: a
digit turned clockwise or upside down is outside what it was taught (for symmetric digits such as 0, 1
and 8 a clockwise turn looks like a counter-clockwise one, and counts as sideways).
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowmatch.metrics.frechet import FeatureNetwork, load_feature_network

#: where the orientation classifier lives (relative to the working directory)
DEFAULT_PATH = "runs/feature_networks/orientation_classifier/last.ckpt"
#: class index -> meaning
CLASSES = ("upright", "sideways (90 degrees counter-clockwise)")
UPRIGHT, SIDEWAYS = 0, 1


def rotate_images(images: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Images (B, C, H, W) turned k x 90 degrees counter-clockwise on screen (k = -1: clockwise); exact."""
    return torch.rot90(images, k=k, dims=(-2, -1))


def orientation_data(split: str, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real demo digits of ``split`` (the split of ``prepare --source demo``), each upright and turned:
    (images float32 (2N, 1, size, size) in [-1, 1], orientation labels (2N,) 0 / 1, digit labels (2N,))."""
    from flowmatch.data.digits import load_digit_images, split_indices

    images, labels = load_digit_images(size)
    idx = split_indices(len(labels), seed)[split]
    x = torch.from_numpy(images[idx])
    digits = torch.from_numpy(labels[idx])
    both = torch.cat([x, rotate_images(x, 1)])
    orient = torch.cat([torch.full((len(idx),), UPRIGHT), torch.full((len(idx),), SIDEWAYS)]).long()
    return both, orient, torch.cat([digits, digits])


@torch.no_grad()
def accuracy(network: FeatureNetwork, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((network.predict(images) == labels).float().mean())


def train_orientation_classifier(out: str | Path = DEFAULT_PATH, epochs: int = 4, batch_size: int = 64, lr: float = 3e-3,
                                 seed: int = 0, log=print) -> dict:
    """Train the 2-class orientation classifier on the train split and write it to ``out`` (atomically), with
    its held-out (test split) and val accuracy in the checkpoint's ``orientation`` entry; returns that entry.
    Leaves the global random state as it was."""
    from flowmatch.atomic_io import atomic_write
    from flowmatch.classifiers.digits import DigitClassifier, random_shift

    start = time.time()
    x, y, _ = orientation_data("train", seed)
    hparams = {"image_channels": 1, "num_classes": 2, "num_features": 64, "width": 16, "lr": lr, "weight_decay": 1e-4,
               "max_shift": 2, "sample_shape": [1, int(x.shape[-2]), int(x.shape[-1])]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DigitClassifier(**hparams)
        steps_per_epoch = (len(y) + batch_size - 1) // batch_size
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=hparams["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            for lo in range(0, len(y), batch_size):
                b = order[lo : lo + batch_size]
                loss = F.cross_entropy(model(random_shift(x[b], hparams["max_shift"], gen)), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    net = FeatureNetwork(model, source=str(out))
    info = {"classes": list(CLASSES), "trained_on": f"demo digits, train split (seed {seed}), both orientations: {len(y)} images",
            "epochs": epochs, "val_acc": accuracy(net, *orientation_data("val", seed)[:2]),
            "test_acc": accuracy(net, *orientation_data("test", seed)[:2]), "seconds": round(time.time() - start, 1)}
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": {"_class_path": "flowmatch.classifiers.DigitClassifier", **hparams},
            "orientation": info}
    with atomic_write(out) as f:
        torch.save(ckpt, f)
    log(f"orientation classifier: held-out accuracy {100 * info['test_acc']:.1f}% (val {100 * info['val_acc']:.1f}%), "
        f"{info['seconds']} s -> {out}")
    return info


def ensure_orientation_classifier(path: str | Path = DEFAULT_PATH, log=print) -> str:
    """``path`` if it exists, else train the orientation classifier into it (one process trains, the others wait)."""
    out = Path(path)
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not out.exists():
                log(f"orientation classifier {out} not found: training it on the demo's train split")
                train_orientation_classifier(out, log=log)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(out)


def load_orientation_classifier(path: str | Path = DEFAULT_PATH, train_if_missing: bool = True) -> FeatureNetwork:
    """The orientation classifier as a frozen FeatureNetwork (``predict``: 0 upright, 1 sideways)."""
    if train_if_missing:
        path = ensure_orientation_classifier(path)
    net = load_feature_network(str(path))
    if net.num_classes != 2:
        raise ValueError(f"{path} is a classifier of {net.num_classes} classes, not the 2-class orientation classifier "
                         f"(upright / sideways); train one with flowmatch.metrics.orientation.train_orientation_classifier")
    return net


def _check(images: torch.Tensor, digits) -> torch.Tensor:
    digits = torch.as_tensor(np.asarray(digits), dtype=torch.long)
    if images.ndim != 4 or images.shape[0] != digits.shape[0]:
        raise ValueError(f"expected images (N, C, H, W) and N digits, got images {tuple(images.shape)} and {tuple(digits.shape)} digits")
    return digits


@torch.no_grad()
def caption_adherence(images: torch.Tensor, digits, digit_classifier: FeatureNetwork) -> float:
    """Share of images (N, 1, H, W) in [-1, 1] the digit classifier assigns to the captioned digit (the
    ImageSampleMetrics callback's ``caption_acc``)."""
    digits = _check(images, digits)
    return float((digit_classifier.predict(images.float()) == digits).float().mean())


@torch.no_grad()
def concept_adherence(images: torch.Tensor, digits, orientation: FeatureNetwork, digit_classifier: FeatureNetwork) -> dict[str, float]:
    """For images generated for "a sideways k" (N, 1, H, W) in [-1, 1] and the digits k asked for:
    ``sideways_rate``, ``digit_rate`` (right digit once turned back clockwise) and ``new_caption_adherence``
    (both), each a share in [0, 1]."""
    digits = _check(images, digits)
    images = images.float()
    turned = orientation.predict(images) == SIDEWAYS
    right = digit_classifier.predict(rotate_images(images, -1)) == digits
    return {"sideways_rate": float(turned.float().mean()), "digit_rate": float(right.float().mean()),
            "new_caption_adherence": float((turned & right).float().mean())}


@torch.no_grad()
def sideways_rate(images: torch.Tensor, orientation: FeatureNetwork) -> float:
    """Share of images the orientation classifier judges turned (for old captions: how far the concept leaks)."""
    return float((orientation.predict(images.float()) == SIDEWAYS).float().mean())


__all__ = ["CLASSES", "DEFAULT_PATH", "caption_adherence", "concept_adherence", "ensure_orientation_classifier",
           "load_orientation_classifier", "orientation_data", "rotate_images", "sideways_rate", "train_orientation_classifier"]
