"""CouplingDataModule: trains a k-rectified flow (or a distilled student) on fixed (noise, sample) pairs.

Batches are ``{"x0": sample, "eps": noise}`` (float32) plus ``"cond"``: int64 labels for a
class-conditional coupling set, or for a text-conditional one (pairs of a text-to-image model) the
dict the model trained on, ``{"pooled": float32 (B, P), "tokens": float32 (B, L, D), "mask": bool (B, L)}``
(the stored encodings the pairs were drawn with; the network's own text dropout still applies in
training, so classifier-free guidance keeps working). Objectives use the batch's ``eps`` instead of
drawing fresh noise (FlowObjective.training_step), which is what makes reflow train on the coupling (docs/spec.md §5).

Splits: the pairs are independent draws, so the last ``num_val`` pairs (by index) are the
validation set, the ``num_test`` before them the test set, the rest the training set.

Sample-quality metrics (PointSampleMetrics) compare generated points with ``reference_samples``:
by default the held-out couplings' samples (what the teacher generates), or, with
``reference_target`` (a flowmatch.data.toy2d target such as "8gaussians"), the real data of that
split, drawn exactly as Toy2DDataModule(seed=reference_seed) draws its val / test points, so a
reflowed model is scored against the data, not against its teacher.

Text-conditional sets are scored against the real data too: the latent/caption shard set the coupling
manifest records (``data.manifest``, or ``reference_data``) serves the held-out split to the image
callbacks through the same methods a LatentShardDataModule has (``reference_batch``, ``num_samples``,
``decode``, ``encode_captions``, ``reference_images``, ``reference_samples``), with its caption mixing
seeded by ``reference_seed``. A model trained here records those data facts in its checkpoints (so
``sample`` and the next ``reflow`` know its text encoders, autoencoder and shards).

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

from flowmatch.networks.conditioning import ConditioningMismatchError, ConditioningSpec, fit_problems
from flowmatch.reflow.format import CouplingFormatError, iter_records, iter_shard, manifest_conditioning, read_manifest, shard_paths
from flowmatch.data.shards import TrainLoader


def _passthrough(batch: dict) -> dict:
    """collate_fn for datasets that build whole batches (module level: picklable for loader workers)."""
    return batch


class TextConditions:
    """The text conditions of many pairs, compact: pooled (N, P), mask (N, L) and only the real tokens
    (T, D) with per-pair offsets (N + 1); ``batch`` scatters them back into the model's padded dict."""

    def __init__(self, pooled: np.ndarray, mask: np.ndarray, real: np.ndarray, offsets: np.ndarray):
        self.pooled, self.mask, self.real, self.offsets = pooled, mask, real, offsets

    @classmethod
    def from_padded(cls, cond: dict[str, np.ndarray]) -> "TextConditions":
        mask = cond["mask"]
        offsets = np.concatenate([[0], np.cumsum(mask.sum(1), dtype=np.int64)])
        return cls(cond["pooled"], mask, cond["tokens"][mask], offsets)

    @classmethod
    def concat(cls, parts: list["TextConditions"]) -> "TextConditions":
        shifts = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
        return cls(np.concatenate([p.pooled for p in parts]), np.concatenate([p.mask for p in parts]),
                   np.concatenate([p.real for p in parts]), offsets.astype(np.int64))

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def take(self, idx) -> "TextConditions":
        """The pairs ``idx`` (any order, repeats allowed), still compact."""
        idx = np.asarray(idx, dtype=np.int64)
        starts, counts = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        total = int(counts.sum())
        begin = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(idx) else np.zeros(0, np.int64)
        positions = np.repeat(starts - begin, counts) + np.arange(total)
        return TextConditions(self.pooled[idx], self.mask[idx], self.real[positions],
                              np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def batch(self, idx=None) -> dict[str, torch.Tensor]:
        """The model's conditioning dict (float32 pooled and tokens, zeros at the padded positions; bool mask)."""
        part = self if idx is None else self.take(idx)
        mask = torch.from_numpy(np.ascontiguousarray(part.mask))
        tokens = torch.zeros((len(part), part.mask.shape[1], part.real.shape[1]), dtype=torch.float32)
        tokens[mask] = torch.from_numpy(part.real.astype(np.float32))
        return {"pooled": torch.from_numpy(part.pooled.astype(np.float32)), "tokens": tokens, "mask": mask}


def _cond_concat(parts: list):
    if not parts or parts[0] is None:
        return None
    return TextConditions.concat(parts) if isinstance(parts[0], TextConditions) else np.concatenate(parts)


def _cond_take(cond, idx):
    if cond is None:
        return None
    return cond.take(idx) if isinstance(cond, TextConditions) else cond[idx]


def _cond_batch(cond, idx=None):
    """The batch's "cond": labels as an int64 tensor, text as the model's dict."""
    if isinstance(cond, TextConditions):
        return cond.batch(idx)
    if isinstance(cond, torch.Tensor):
        return cond if idx is None else cond[torch.as_tensor(idx, dtype=torch.long)]
    return torch.from_numpy(cond if idx is None else cond[idx])


def _record_cond(rec):
    """A record's condition in the form the data module keeps it (compact text conditions; labels as they are)."""
    return TextConditions.from_padded(rec.cond) if isinstance(rec.cond, dict) else rec.cond


class _PairBatches(Dataset):
    """In-memory pairs; ``__getitems__`` builds a whole batch with one indexing op per tensor."""

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, cond: torch.Tensor | TextConditions | None):
        self.x0, self.eps, self.cond = x0, eps, cond

    def __len__(self) -> int:
        return self.x0.shape[0]

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"x0": self.x0[idx], "eps": self.eps[idx]}
        if self.cond is not None:
            batch["cond"] = _cond_batch(self.cond, idx.numpy())
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"x0": self.x0[i], "eps": self.eps[i]}
        if isinstance(self.cond, TextConditions):
            item["cond"] = {k: v[0] for k, v in self.cond.batch([i]).items()}
        elif self.cond is not None:
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
                    cond = _record_cond(rec)
                    yield rec.sample[:keep], rec.noise[:keep], _cond_take(cond, np.arange(keep)) if keep < len(rec) else cond
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
            conds = _cond_concat([p[2] for p in pool])
            perm = rng.permutation(x0s.shape[0])
            full = (len(perm) // self.batch_size) * self.batch_size
            for lo in range(0, full, self.batch_size):
                idx = perm[lo : lo + self.batch_size]
                batch = {"x0": torch.from_numpy(x0s[idx]), "eps": torch.from_numpy(epss[idx])}
                if conds is not None:
                    batch["cond"] = _cond_batch(conds, idx)
                yield batch
            rest = perm[full:]
            pool = [(x0s[rest], epss[rest], _cond_take(conds, rest))]
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
        reference_seed: the Toy2DDataModule seed whose val / test points reference_target reproduces; for
            text sets the caption-mixing seed of the reference data's held-out split (the data config's seed).
        reference_data: text sets: the latent/caption shard set (directory, manifest or URL) whose held-out
            split the image metrics compare with (default: the one the coupling manifest records).
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
        reference_data: str | None = None,
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
        # what the pairs are conditioned on (CouplingFormatError if the manifest does not say it completely)
        self.conditioning: ConditioningSpec = manifest_conditioning(self.manifest)
        if self.conditioning.is_text and reference_target is not None:
            raise ValueError(f"reference_target {reference_target!r} is a 2-D target; the couplings in {path} are of a text-to-image model "
                             "(their reference is the latent/caption data: reference_data)")
        if not self.conditioning.is_text and reference_data is not None:
            raise ValueError(f"reference_data is for text-conditional couplings; the pairs in {path} are conditioned on {self.conditioning.describe()}")
        self.batch_size, self.num_val, self.num_test = batch_size, num_val, num_test
        self.reference_target, self.reference_seed = reference_target, reference_seed
        self.reference_data = reference_data
        self.seed, self.num_workers = seed, num_workers
        pair_bytes = 2 * 4 * int(np.prod(self.manifest["sample_shape"]))
        if self.conditioning.is_text:  # pooled + mask + (about half the context as real tokens), float16
            tokens = self.conditioning.stream("tokens")
            pair_bytes += 2 * self.conditioning.pooled_dim + tokens.max_length * (1 + tokens.width)
        self.in_memory = bool(in_memory) if in_memory is not None else count * pair_bytes <= in_memory_limit
        self.shuffle_buffer = shuffle_buffer
        self._splits: dict[str, _PairBatches] = {}
        self._resume_position: tuple[int, int] | None = None
        self._latent = None  # text sets: the LatentShardDataModule of the reference data, built on first use

    # ---- facts the model and the callbacks read ----
    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["sample_shape"])

    # ``conditioning`` (set in __init__) says what the pairs are conditioned on; these read it for the callbacks
    @property
    def conditional(self) -> bool:
        """True for pairs conditioned on class labels (the batches' "cond" are labels: what the callbacks read this
        for). Text sets are conditioned too, on text: ``text_conditional``; ``conditioning`` says either."""
        return self.conditioning.kind == "labels"

    @property
    def text_conditional(self) -> bool:
        return self.conditioning.is_text

    @property
    def num_classes(self) -> int:
        return self.conditioning.num_classes

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
                    cond = _record_cond(rec)
                    parts[s].append((rec.sample[i:j], rec.noise[i:j], _cond_take(cond, np.arange(i, j)) if (i, j) != (0, len(rec)) else cond))
        shape = tuple(self.manifest["sample_shape"])
        for s, items in parts.items():
            x0 = torch.from_numpy(np.concatenate([p[0] for p in items])) if items else torch.zeros((0, *shape))
            eps = torch.from_numpy(np.concatenate([p[1] for p in items])) if items else torch.zeros((0, *shape))
            cond = None
            if self.conditioning.kind == "labels":
                cond = torch.from_numpy(np.concatenate([p[2] for p in items])) if items else torch.zeros(0, dtype=torch.long)
            elif self.conditioning.is_text:
                cond = _cond_concat([p[2] for p in items]) if items else None
            self._splits[s] = _PairBatches(x0, eps, cond)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test"))
        if not self.in_memory:
            wanted = tuple(s for s in wanted if s != "train")
        self._load(wanted)
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        if module is not None and self.conditioning.is_conditional:
            self.check_model(module)
        if module is not None and self.conditioning.is_text:
            if getattr(module, "data_info", None) is None and isinstance(self.manifest.get("data"), dict):
                module.data_info = dict(self.manifest["data"])  # its checkpoints then know the text encoders, autoencoder, shards

    def check_model(self, module) -> None:
        """Raise ConditioningMismatchError (a ValueError naming the coupling set) if the pairs do not fit the model:
        the condition its network declares (``net.conditioning``) against the couplings', and its sample shape."""
        net = getattr(module, "net", module)  # the objective, or a bare network
        problems = fit_problems(net.conditioning, self.conditioning, "the coupling set")
        shape = getattr(module, "sample_shape", None)
        if shape is not None and tuple(shape) != self.sample_shape:
            problems.append(f"the model generates samples of shape {tuple(shape)} but the couplings hold {self.sample_shape}")
        if problems:
            raise ConditioningMismatchError(f"coupling set {self.path} does not fit the model: " + "; ".join(problems))

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

    # ---- text sets: the real latent/caption data the image callbacks compare with ----
    @property
    def latent_data(self):
        """The LatentShardDataModule of the reference data (text sets only)."""
        if not self.conditioning.is_text:
            raise AttributeError(f"the couplings in {self.path} are not text-conditional: they have no latent/caption reference data")
        if self._latent is None:
            from flowmatch.data.shards import LatentShardDataModule

            location = self.reference_data or (self.manifest.get("data") or {}).get("manifest")
            if not location:
                raise CouplingFormatError(f"{self.path}: the coupling manifest records no latent/caption data (data.manifest); give reference_data")
            try:
                self._latent = LatentShardDataModule(manifest=str(location), batch_size=self.batch_size, num_workers=0, pin_memory=False,
                                                     seed=self.reference_seed)
                self._latent.facts  # reads the manifest now, so a bad location is reported as this set's error
            except (OSError, ValueError) as err:
                raise CouplingFormatError(f"{self.path}: cannot open the reference data {location} ({type(err).__name__}: {err}); "
                                          "give reference_data (the shards' directory)") from None
        return self._latent

    def num_samples(self, split: str) -> int | None:
        return self.latent_data.num_samples(split)

    def reference_batch(self, n: int, split: str = "val") -> dict:
        """The first ``n`` samples of the reference data's split as one batch (real latents, captions, conditions, labels)."""
        return self.latent_data.reference_batch(n, split)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.latent_data.decode(latents)

    def encode_captions(self, captions: list[str], device: torch.device | str = "cpu") -> dict:
        return self.latent_data.encode_captions(captions, device)

    def reference_images(self, n: int, split: str = "val") -> torch.Tensor:
        return self.latent_data.reference_images(n, split)

    # ---- what sample metrics compare with ----
    def reference_samples(self, n: int, split: str = "val", return_labels: bool = False):
        """``n`` reference points of ``split`` (the same on every call): the real data of
        ``reference_target`` (or of a text set's latent/caption data) if one is set, else the held-out
        couplings' samples (and their labels)."""
        if self.conditioning.is_text:
            return self.latent_data.reference_samples(n, split, return_labels)
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
