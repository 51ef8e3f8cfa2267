"""Classic 2-D toy targets (8 Gaussians, two moons, checkerboard, Swiss roll) and their data module.

The samplers follow the FFJORD toy-data conventions (Grathwohl et al. 2019, ``lib/toy_data.py``),
which torchcfm and most flow-matching tutorials reuse, so plots and numbers are comparable with
theirs. Every target lies roughly within [-4, 4]^2 with a spread of order 1..3:

================  ==========================================================  =============
target            definition                                                  labels
================  ==========================================================  =============
``8gaussians``    8 modes at angles k*pi/4 on a circle of radius 4/sqrt(2)    mode index 0..7
                  ~ 2.83, isotropic std 0.5/sqrt(2) ~ 0.354 (FFJORD: centres
                  scaled by 4, noise std 0.5, everything divided by 1.414)
``moons``         sklearn ``make_moons(noise=0.1)``, centred ((x - (0.5,      moon 0 / 1
                  0.25)) and scaled by 2: about [-3, 3] x [-1.7, 1.7]
``checkerboard``  FFJORD's 4x4 checkerboard on [-4, 4]^2, 8 filled squares    square 0..7
``swissroll``     sklearn ``make_swiss_roll(noise=1.0)``, coordinates (x, z)  always 0
                  divided by 5 (FFJORD): about [-2.5, 3]^2
================  ==========================================================  =============

Each sampler draws from a ``numpy.random.Generator``; :func:`sample_target` seeds it, so a
(name, n, seed) triple always gives the same points. The time convention of the platform
(t = 0 data, t = 1 noise, docs/spec.md §1) means these points are the ``x0`` of a batch.
"""

from __future__ import annotations

from typing import Callable

import lightning
import numpy as np
import torch
from sklearn.datasets import make_moons, make_swiss_roll
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from flowmatch.networks.conditioning import ConditioningSpec
from flowmatch.lightning_compat import training_position

# A sampler maps (n, rng) to (points float (n, 2), integer labels (n,)) as numpy arrays.
Sampler = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------

# FFJORD's 8 centres: the four axis directions then the four diagonals, scaled by 4, and the
# whole sample divided by 1.414 afterwards; the centre order defines the label.
_S = 1.0 / np.sqrt(2.0)
_EIGHT_DIRECTIONS = np.array(
    [(1, 0), (-1, 0), (0, 1), (0, -1), (_S, _S), (_S, -_S), (-_S, _S), (-_S, -_S)], dtype=np.float64
)
EIGHT_GAUSSIANS_RADIUS = 4.0 / 1.414
EIGHT_GAUSSIANS_STD = 0.5 / 1.414
EIGHT_GAUSSIANS_CENTERS = _EIGHT_DIRECTIONS * EIGHT_GAUSSIANS_RADIUS  # (8, 2)


def _sklearn_seed(rng: np.random.Generator) -> int:
    """An int seed for sklearn's RandomState-based generators, drawn from ``rng``."""
    return int(rng.integers(0, 2**31 - 1))


def eight_gaussians(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mixture of 8 equally weighted isotropic Gaussians on a circle; label = mode index."""
    labels = rng.integers(0, 8, size=n)
    points = EIGHT_GAUSSIANS_CENTERS[labels] + EIGHT_GAUSSIANS_STD * rng.standard_normal((n, 2))
    return points, labels


def moons(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half circles (sklearn), centred near 0 and scaled by 2; label = moon."""
    points, labels = make_moons(n_samples=n, noise=0.1, shuffle=True, random_state=_sklearn_seed(rng))
    # make_moons spans x in [-1, 2], y in [-0.5, 1] with mean ~ (0.5, 0.25).
    points = (points - np.array([0.5, 0.25])) * 2.0
    return points, labels


def checkerboard(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """FFJORD's checkerboard: uniform on the 8 'black' squares of a 4x4 board on [-4, 4]^2.

    Label = square index 0..7, numbered column by column (left to right), bottom square first.
    """
    x1 = rng.random(n) * 4 - 2  # column coordinate in [-2, 2)
    x2_ = rng.random(n) - rng.integers(0, 2, n) * 2  # in [0, 1) or [-2, -1)
    x2 = x2_ + (np.floor(x1) % 2)  # odd columns shift up by one square
    col = np.floor(x1).astype(np.int64) + 2  # 0..3
    row = np.floor(x2).astype(np.int64) + 2  # 0..3; each column fills rows {0, 2} or {1, 3}
    labels = col * 2 + row // 2
    points = np.stack([x1, x2], axis=1) * 2
    return points, labels


def swissroll(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """FFJORD's Swiss roll: sklearn's 3-D roll (noise 1.0) seen from above, divided by 5; label 0."""
    points, _ = make_swiss_roll(n_samples=n, noise=1.0, random_state=_sklearn_seed(rng))
    points = points[:, [0, 2]] / 5.0
    return points, np.zeros(n, dtype=np.int64)


#: name -> sampler(n, rng) -> (points (n, 2), labels (n,)) as numpy arrays.
TARGETS: dict[str, Sampler] = {
    "8gaussians": eight_gaussians,
    "moons": moons,
    "checkerboard": checkerboard,
    "swissroll": swissroll,
}

#: name -> number of distinct label values the sampler produces.
TARGET_NUM_CLASSES: dict[str, int] = {"8gaussians": 8, "moons": 2, "checkerboard": 8, "swissroll": 1}


def _check_target(name: str) -> None:
    if name not in TARGETS:
        raise ValueError(f"unknown 2-D target {name!r}; valid targets are: {', '.join(sorted(TARGETS))}")


def sample_target(name: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` points of target ``name``: (points float32 (n, 2), labels int64 (n,)).

    Deterministic: the same (name, n, seed) always returns the same tensors.
    Raises ValueError for an unknown ``name`` (listing the valid ones) or a negative ``n``.
    """
    _check_target(name)
    if n < 0:
        raise ValueError(f"number of points must be >= 0, got n={n}")
    rng = np.random.default_rng(seed)
    points, labels = TARGETS[name](n, rng)
    return (
        torch.as_tensor(np.asarray(points), dtype=torch.float32).reshape(n, 2),
        torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(n),
    )


# --------------------------------------------------------------------------------------------
# Data module
# --------------------------------------------------------------------------------------------

_SPLITS = ("train", "val", "test")


def split_seed(seed: int, split: str) -> int:
    """The sampling seed of one split: independent streams for train / val / test from one seed."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are: {', '.join(_SPLITS)}")
    return int(np.random.SeedSequence([seed, _SPLITS.index(split)]).generate_state(1)[0])


class _PointDataset(Dataset):
    """Pre-drawn points (and labels), served as the platform's batch dicts."""

    def __init__(self, points: torch.Tensor, labels: torch.Tensor, conditional: bool):
        self.points, self.labels, self.conditional = points, labels, conditional

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"x0": self.points[i]}
        if self.conditional:
            item["cond"] = self.labels[i]
        return item


class ResumableShuffleSampler(DistributedSampler):
    """A seeded shuffle whose order is a function of (seed, epoch) alone, that can start mid-epoch.

    Each pass draws ``randperm(n)`` from a generator seeded with ``seed + epoch`` (and, over several
    processes, takes this rank's share, as DistributedSampler does, so Lightning does not wrap it).
    The epoch advances by itself on every pass, and Lightning's ``set_epoch`` sets it explicitly.
    ``resume_at(epoch, batches)`` makes the pass of that epoch skip the batches already consumed,
    which puts a resumed run exactly where the interrupted one was.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches: int) -> None:
        self._resume = (int(epoch), int(batches))

    def __iter__(self):
        epoch = self.epoch
        self.epoch = epoch + 1  # the next pass gets the next order unless set_epoch says otherwise
        g = torch.Generator().manual_seed(self.seed + epoch)
        indices = torch.randperm(len(self.dataset), generator=g).tolist()
        indices += indices[: self.total_size - len(indices)]  # pad so every rank gets the same count
        indices = indices[self.rank : self.total_size : self.num_replicas]
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = min(self._resume[1] * self.batch_size, len(indices))
        self._resume = None
        return iter(indices[skip:])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ResumableDataPosition:
    """Mixin for a LightningDataModule with a map-style training set: a ResumableShuffleSampler for
    the training loader and the data position (epoch, batches of it consumed) in checkpoints.

    ``state_dict`` reads the position from the trainer's loop when a checkpoint is written;
    ``load_state_dict`` (a resume) makes the next ``resumable_sampler`` skip what was consumed."""

    _resume_position: tuple[int, int] | None = None

    def resumable_sampler(self, dataset: Dataset, batch_size: int, seed: int) -> ResumableShuffleSampler:
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableShuffleSampler(dataset, batch_size, seed=seed, num_replicas=replicas, rank=rank)
        if self._resume_position is not None:
            sampler.resume_at(*self._resume_position)
            self._resume_position = None
        return sampler

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the data: the epoch and the batches of it consumed so far."""
        trainer = self.trainer
        if trainer is None:
            return {}
        epoch, batches = training_position(trainer)
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if "epoch" in state_dict:
            self._resume_position = (int(state_dict["epoch"]), int(state_dict["batches"]))


class Toy2DDataModule(ResumableDataPosition, lightning.LightningDataModule):
    """2-D toy targets for fast flow-matching experiments (see the table in this module's docstring).

    Batches are dicts ``{"x0": float32 (B, 2)}``, plus ``"cond": int64 (B,)`` (the target's label)
    when ``conditional``. Each split is drawn once, with its own seed derived from ``seed``, so the
    splits never share points; the training set is shuffled (an order that depends on the seed and
    the epoch only, see ResumableShuffleSampler), validation and test are not. The data position
    (epoch, batches consumed) goes into checkpoints, so a resumed run continues with the next batch.
    """

    def __init__(
        self,
        target: str = "8gaussians",
        num_train: int = 100_000,
        num_val: int = 2000,
        num_test: int = 2000,
        batch_size: int = 256,
        conditional: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ):
        """
        Args:
            target: Which 2-D distribution: 8gaussians, moons, checkerboard or swissroll.
            num_train: Number of training points (drawn once; an epoch is one pass over them).
            num_val: Number of validation points (fixed, not shuffled).
            num_test: Number of test points (fixed, not shuffled).
            batch_size: Points per batch for every split.
            conditional: If True, batches carry the target's label as "cond" (class-conditional generation).
            seed: Seed from which the train / val / test sampling seeds and the shuffling order derive.
            num_workers: DataLoader worker processes (0 = load in the main process; the data is in memory).
        """
        super().__init__()
        _check_target(target)
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.target = target
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.batch_size = batch_size
        self.conditional = conditional
        self.seed = seed
        self.num_workers = num_workers
        self._datasets: dict[str, _PointDataset] = {}

    # ---- shape information the LightningModule and the callbacks read ----

    @property
    def dim(self) -> int:
        """Dimension of a data point (2)."""
        return 2

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one data point, without the batch dimension: (2,)."""
        return (2,)

    @property
    def num_classes(self) -> int:
        """Number of label values when conditional, else 0 (an unconditional model)."""
        return TARGET_NUM_CLASSES[self.target] if self.conditional else 0

    @property
    def conditioning(self) -> ConditioningSpec:
        """What the batches' "cond" is: class labels when conditional, else nothing."""
        return ConditioningSpec(num_classes=self.num_classes)

    # ---- data ----

    def _size(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    def _dataset(self, split: str) -> _PointDataset:
        """The split's dataset, drawn on first use (cheap: a few ms for 100k points)."""
        if split not in self._datasets:
            points, labels = sample_target(self.target, self._size(split), split_seed(self.seed, split))
            self._datasets[split] = _PointDataset(points, labels, self.conditional)
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, _SPLITS)
        for split in splits:
            self._dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        sampler = self.resumable_sampler(self._dataset(split), self.batch_size, self.seed) if shuffle else None
        return DataLoader(
            self._dataset(split),
            batch_size=self.batch_size,
            sampler=sampler,
            # the loader's own generator seeds worker processes; without one, every new iterator would
            # draw from torch's global RNG, which the training step's times and noise come from
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """`predict` generates one sample per test point (with its label as the condition when conditional)."""
        return self.test_dataloader()

    def reference_samples(
        self, n: int, split: str = "val", return_labels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n`` held-out points (float32 (n, 2)) for sample-quality metrics, the same on every call.

        Drawn with the split's own seed, so with ``n`` equal to the split size they are exactly
        that split's points. ``return_labels=True`` also returns the labels (int64 (n,)).
        """
        points, labels = sample_target(self.target, n, split_seed(self.seed, split))
        return (points, labels) if return_labels else points
