"""CouplingDataModule: trains a k-rectified flow (or a distilled student) on fixed (noise, sample) pairs.

Batches are ``{"x0": sample, "eps": noise}`` (float32) plus ``"cond"`` (int64 labels) for a
conditional coupling set. Objectives use the batch's ``eps`` instead of drawing fresh noise
(FlowObjective.training_step), which is what makes reflow train on the coupling (SPEC §5).

Splits: the pairs are independent draws, so the last ``num_val`` pairs (by index) are the
validation set, the ``num_test`` before them the test set, the rest the training set.

Sample-quality metrics (PointSampleMetrics) compare generated points with ``reference_samples``:
by default the held-out couplings' samples (what the teacher generates), or, with
``reference_target`` (a flowmatch.data.toy2d target such as "8gaussians"), the real data of that
split, drawn exactly as Toy2DDataModule(seed=reference_seed) draws its val / test points, so a
reflowed model is scored against the data, not against its teacher.

Small sets (up to ``in_memory_limit`` bytes, default 2 GiB) are read into memory and shuffled
per epoch with a seeded, resumable order (an interrupted run resumes at the next batch); larger
sets are streamed from the shards (records split over ranks and workers, shuffled in chunks of
``shuffle_buffer`` pairs, ``len(train) // (batch_size * world_size)`` batches per epoch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from flowmatch.reflow.format import CouplingFormatError, iter_records, iter_shard, read_manifest, shard_paths
from flowmatch.data.shards import TrainLoader


def _passthrough(batch: dict) -> dict:
    """collate_fn for datasets that build whole batches (module level: picklable for loader workers)."""
    return batch


class _PairBatches(Dataset):
    """In-memory pairs; ``__getitems__`` builds a whole batch with one indexing op per tensor."""

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, cond: torch.Tensor | None):
        self.x0, self.eps, self.cond = x0, eps, cond

    def __len__(self) -> int:
        return self.x0.shape[0]

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"x0": self.x0[idx], "eps": self.eps[idx]}
        if self.cond is not None:
            batch["cond"] = self.cond[idx]
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"x0": self.x0[i], "eps": self.eps[i]}
        if self.cond is not None:
            item["cond"] = self.cond[i]
        return item


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _CouplingStream(IterableDataset):
    """Endless training batches read from the shards: this (rank, worker)'s share of the records, in a
    per-cycle shuffled shard order, pairs beyond ``train_count`` left out, shuffled in chunks."""

    def __init__(self, manifest: dict[str, Any], train_count: int, batch_size: int, shuffle_buffer: int, seed: int, rank: int, world_size: int):
        super().__init__()
        self.manifest, self.train_count, self.batch_size = manifest, train_count, batch_size
        self.shuffle_buffer, self.seed, self.rank, self.world_size = max(shuffle_buffer, batch_size), seed, rank, world_size
        self.epoch = 0  # set in the main process before each pass, copied into the workers

    def _records(self, part: int, parts: int):
        paths = shard_paths(self.manifest)
        cycle = 0
        while True:
            order = np.random.default_rng(_seed(self.seed, self.epoch, cycle)).permutation(len(paths))  # same on every rank
            position = 0
            for s in order:
                for rec in iter_shard(paths[s], self.manifest):
                    mine = position % parts == part
                    position += 1
                    if not mine or rec.first >= self.train_count:
                        continue
                    keep = min(len(rec), self.train_count - rec.first)
                    yield rec.sample[:keep], rec.noise[:keep], None if rec.cond is None else rec.cond[:keep]
            if position == 0:
                raise CouplingFormatError(f"{self.manifest['directory']}: no records to train on")
            cycle += 1

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        part, parts = self.rank * workers + worker, self.world_size * workers
        rng = np.random.default_rng(_seed(self.seed, self.epoch, part, 1))
        pool: list[tuple] = []
        pooled = 0
        for x0, eps, cond in self._records(part, parts):
            pool.append((x0, eps, cond))
            pooled += x0.shape[0]
            if pooled < self.shuffle_buffer:
                continue
            x0s, epss = np.concatenate([p[0] for p in pool]), np.concatenate([p[1] for p in pool])
            conds = None if pool[0][2] is None else np.concatenate([p[2] for p in pool])
            perm = rng.permutation(x0s.shape[0])
            full = (len(perm) // self.batch_size) * self.batch_size
            for lo in range(0, full, self.batch_size):
                idx = perm[lo : lo + self.batch_size]
                batch = {"x0": torch.from_numpy(x0s[idx]), "eps": torch.from_numpy(epss[idx])}
                if conds is not None:
                    batch["cond"] = torch.from_numpy(conds[idx])
                yield batch
            rest = perm[full:]
            pool = [(x0s[rest], epss[rest], None if conds is None else conds[rest])]
            pooled = len(rest)


class CouplingDataModule(L.LightningDataModule):
    """Coupling shards written by ``python -m flowmatch reflow`` (see the module docstring).

    Args:
        path: the coupling directory (holding manifest.json and couplings-*.tar).
        batch_size: pairs per batch for every split.
        num_val: held-out pairs for validation (the last ones by index).
        num_test: held-out pairs for the test split (just before the validation pairs; 0 = none).
        max_pairs: use only the first this many pairs of the set (None = all).
        reference_target: a 2-D toy target name ("8gaussians", ...): sample metrics compare with its
            real held-out points instead of the held-out couplings' samples.
        reference_seed: the Toy2DDataModule seed whose val / test points reference_target reproduces.
        seed: seed of the training order.
        num_workers: DataLoader worker processes.
        in_memory: read the whole set into memory (None: when it is at most in_memory_limit bytes).
        in_memory_limit: the size limit for in_memory=None.
        shuffle_buffer: pairs shuffled together when streaming.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 256,
        num_val: int = 2000,
        num_test: int = 0,
        max_pairs: int | None = None,
        reference_target: str | None = None,
        reference_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        in_memory: bool | None = None,
        in_memory_limit: int = 2 * 1024**3,
        shuffle_buffer: int = 16384,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.manifest = read_manifest(path)
        self.path = str(path)
        count = int(self.manifest["count"])
        if max_pairs is not None:
            if max_pairs < 1:
                raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
            count = min(count, int(max_pairs))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_val < 0 or num_test < 0:
            raise ValueError(f"num_val and num_test must be >= 0, got {num_val} and {num_test}")
        self.count = count
        self.num_train = count - num_val - num_test
        if self.num_train < 1:
            raise ValueError(f"{path} holds {count} pairs (max_pairs={max_pairs}): none left for training after num_val={num_val} and num_test={num_test}")
        if reference_target is not None:
            from flowmatch.data.toy2d import TARGETS

            if reference_target not in TARGETS:
                raise ValueError(f"unknown reference_target {reference_target!r}; valid: {', '.join(sorted(TARGETS))}")
            if tuple(self.manifest["sample_shape"]) != (2,):
                raise ValueError(f"reference_target {reference_target!r} is a 2-D target but the couplings in {path} have shape {self.manifest['sample_shape']}")
        self.batch_size, self.num_val, self.num_test = batch_size, num_val, num_test
        self.reference_target, self.reference_seed = reference_target, reference_seed
        self.seed, self.num_workers = seed, num_workers
        pair_bytes = 2 * 4 * int(np.prod(self.manifest["sample_shape"]))
        self.in_memory = bool(in_memory) if in_memory is not None else count * pair_bytes <= in_memory_limit
        self.shuffle_buffer = shuffle_buffer
        self._splits: dict[str, _PairBatches] = {}
        self._resume_position: tuple[int, int] | None = None

    # ---- facts the model and the callbacks read ----
    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["sample_shape"])

    @property
    def conditional(self) -> bool:
        return bool(self.manifest["conditional"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest.get("num_classes", 0)) if self.conditional else 0

    def _range(self, split: str) -> tuple[int, int]:
        hi_test = self.count - self.num_val
        return {"train": (0, self.num_train), "test": (self.num_train, hi_test), "val": (hi_test, self.count)}[split]

    # ---- reading ----
    def _load(self, splits: tuple[str, ...]) -> None:
        """Read the pairs of the given splits into memory (one pass over the shards)."""
        todo = [s for s in splits if s not in self._splits]
        if not todo:
            return
        ranges = {s: self._range(s) for s in todo}
        lo_all, hi_all = min(r[0] for r in ranges.values()), max(r[1] for r in ranges.values())
        parts: dict[str, list] = {s: [] for s in todo}
        for rec in iter_records(self.path):
            a, b = rec.first, rec.first + len(rec)
            if b <= lo_all:
                continue
            if a >= hi_all:
                break
            for s, (lo, hi) in ranges.items():
                i, j = max(lo, a) - a, min(hi, b) - a
                if i < j:
                    parts[s].append((rec.sample[i:j], rec.noise[i:j], None if rec.cond is None else rec.cond[i:j]))
        shape = tuple(self.manifest["sample_shape"])
        for s, items in parts.items():
            x0 = torch.from_numpy(np.concatenate([p[0] for p in items])) if items else torch.zeros((0, *shape))
            eps = torch.from_numpy(np.concatenate([p[1] for p in items])) if items else torch.zeros((0, *shape))
            cond = None
            if self.conditional:
                cond = torch.from_numpy(np.concatenate([p[2] for p in items])) if items else torch.zeros(0, dtype=torch.long)
            self._splits[s] = _PairBatches(x0, eps, cond)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test"))
        if not self.in_memory:
            wanted = tuple(s for s in wanted if s != "train")
        self._load(wanted)

    def _eval_loader(self, split: str) -> DataLoader | list:
        self._load((split,))
        data = self._splits[split]
        if len(data) == 0:
            return []
        return DataLoader(data, batch_size=self.batch_size, shuffle=False, collate_fn=_passthrough, num_workers=self.num_workers)

    def train_dataloader(self):
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if not self.in_memory:
            steps = self.num_train // (self.batch_size * world)
            if steps < 1:
                raise ValueError(f"{self.num_train} training pairs make no full batch of {self.batch_size} on each of {world} ranks")
            stream = _CouplingStream(self.manifest, self.num_train, self.batch_size, self.shuffle_buffer, self.seed, rank, world)
            return TrainLoader(stream, steps, self.num_workers, pin_memory=False)
        from flowmatch.data.toy2d import ResumableShuffleSampler

        self._load(("train",))
        sampler = ResumableShuffleSampler(self._splits["train"], self.batch_size, seed=self.seed, num_replicas=world, rank=rank)
        if self._resume_position is not None:
            sampler.resume_at(*self._resume_position)
            self._resume_position = None
        return DataLoader(self._splits["train"], batch_size=self.batch_size, sampler=sampler, collate_fn=_passthrough,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test" if self.num_test > 0 else "val")

    # ---- the data position, for an exact resume (in-memory mode) ----
    def state_dict(self) -> dict:
        """Saved in checkpoints: which couplings trained the model (so `reflow` can tell the next k), and
        in memory mode where training stands in them (epoch, batches consumed), for an exact resume."""
        state = {"couplings": str(Path(self.path).resolve()), "rectified": self.manifest.get("rectified")}
        trainer = self.trainer
        if trainer is None or not self.in_memory:
            return state
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {**state, "epoch": int(trainer.fit_loop.epoch_progress.current.completed), "batches": int(progress.processed)}

    def load_state_dict(self, state_dict: dict) -> None:
        if "epoch" in state_dict and self.in_memory:
            self._resume_position = (state_dict["epoch"], state_dict["batches"])

    # ---- what sample metrics compare with ----
    def reference_samples(self, n: int, split: str = "val", return_labels: bool = False):
        """``n`` reference points of ``split`` (the same on every call): the real data of
        ``reference_target`` if one is set, else the held-out couplings' samples (and their labels)."""
        if self.reference_target is not None:
            from flowmatch.data.toy2d import sample_target, split_seed

            points, labels = sample_target(self.reference_target, n, split_seed(self.reference_seed, split))
            return (points, labels) if return_labels else points
        split = "test" if split == "test" and self.num_test > 0 else "val"
        self._load((split,))
        data = self._splits[split]
        if n > len(data):
            raise ValueError(f"reference_samples: {n} points asked of the {split} couplings of {self.path}, which hold {len(data)} "
                             f"(raise num_{split}, lower the metric's num_samples, or set reference_target)")
        x = data.x0[:n]
        if not return_labels:
            return x
        return x, (data.cond[:n] if data.cond is not None else torch.zeros(n, dtype=torch.long))
