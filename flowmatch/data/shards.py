"""Streaming latent/caption shards with webdataset: the data module of image-generation runs.

    shards (local paths, brace patterns, any URL webdataset opens, pipe: commands)
      train: resampled shards (with replacement, seeded per rank / worker / epoch) -> tar samples
             -> shuffle buffer -> decode + check -> caption mixing -> batches (in the workers)
             -> a fixed number of batches per epoch on every rank (no rank waits for another)
      val / test: every shard once, in order; rank r keeps the samples with index % world == r,
             so no sample is seen twice and the ranks' batch counts are equal; batched in the main process
    -> batch {"x0": (B, C, h, w) normalised latents, "cond": {"pooled", "tokens", "mask"}, "caption": [...],
              "synthetic": bool (B,), "key": [...], "label": int64 (B,) when known}

The data module only streams: it splits the shards over nodes, ranks and workers, mixes captions and
counts bad samples. What the data *is* (manifest, text encoders, autoencoder, the normalisation
(z - shift) * scale) is its ``facts`` (flowmatch.data.facts), read from the manifest on first use;
``prepare_data`` writes the built-in demo when asked. Shards without text encodings (or a data module
given its own ``text_encoders``) get the captions encoded by the facts' encoders on the batch's device
after transfer (in the main process, once, not in every worker). Reference batches for sample metrics
come from flowmatch.data.reference; the check that the model fits the data is
flowmatch.callbacks.data_match.MatchModelToData (added by the CLI).

Bad data (see flowmatch.data.health): a truncated / corrupt tar, a sample with a missing key or a
latent of the wrong shape is skipped with a warning naming shard and key, counted, logged as
``data/skipped`` / ``data/shard_errors`` (by DataHealthLogger, added by the CLI); more than
``max_bad_fraction`` bad stops the run with DataQualityError.
"""

from __future__ import annotations

import math
import random
import zlib
from pathlib import Path

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flowmatch.data import reference
from flowmatch.data.captions import use_synthetic
from flowmatch.data.facts import LatentDataFacts
from flowmatch.data.health import DataHealth, DataQualityError, SkipLog
from flowmatch.data.tar_reader import tar_samples
from flowmatch.networks.conditioning import ConditioningSpec
from flowmatch.data.shard_format import (
    MANIFEST_NAME,
    SPLITS,
    ManifestMismatchError,
    SampleSpec,
    ShardFormatError,
    read_manifest,
)

__all__ = ["LatentShardDataModule", "ManifestMismatchError", "ShardFormatError", "DataQualityError", "collate"]


# ---------------------------------------------------------------------------------------------
# Worker side: one rank's stream of samples
# ---------------------------------------------------------------------------------------------


def _is_url(u: str) -> bool:
    return "://" in u or u.startswith("pipe:")


def _expand(shards: str | list[str] | None) -> list[str]:
    if shards is None:
        return []
    import webdataset as wds

    items = [shards] if isinstance(shards, str) else list(shards)
    out: list[str] = []
    for item in items:
        out += wds.shardlists.expand_urls(item)
    return out


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _RankWorkerSeed:
    """webdataset's worker_seed callable for one rank: distinct per (rank, worker); picklable."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self) -> int:
        return self.rank * 1000 + _worker()[0]


def collate(items: list[dict]) -> dict:
    """Items (one per sample) -> the batch dict; the ``_read`` / ``_skipped`` / ``_shard_errors`` counts are summed.

    The health counts travel inside the batches because loader workers are separate processes: a
    worker's counts reach the main process only with what it yields. The data module takes them out
    (``on_before_batch_transfer``) before the model sees the batch."""
    batch = {
        "x0": torch.stack([it["x0"] for it in items]),
        "caption": [it["caption"] for it in items],
        "synthetic": torch.tensor([it["synthetic"] for it in items], dtype=torch.bool),
        "key": [it["key"] for it in items],
        "_read": torch.tensor(sum(it["_read"] for it in items), dtype=torch.int64),
        "_skipped": torch.tensor(sum(it["_skipped"] for it in items), dtype=torch.int64),
        "_shard_errors": torch.tensor(sum(it["_shard_errors"] for it in items), dtype=torch.int64),
    }
    if "tokens" in items[0]:
        batch["cond"] = {
            "pooled": torch.stack([it["pooled"] for it in items]),
            "tokens": torch.stack([it["tokens"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items]),
        }
    labels = [it["label"] for it in items]
    if all(label is not None for label in labels):
        batch["label"] = torch.tensor(labels, dtype=torch.int64)
    return batch


class ShardStream(IterableDataset):
    """The samples one rank reads from a list of shard URLs, decoded into items (runs inside loader workers).

    mode "train": endless; resampled shards (or, with resampled=False, this rank's and worker's
    share of the shards in a reshuffled cycle), a shuffle buffer, batches of ``batch_size`` built
    in the worker. mode "eval": every shard once, in order, split over workers by shard and over
    ranks by sample index, single items (the main process batches them), then one end marker.
    """

    def __init__(self, urls: list[str], spec: SampleSpec, shift: float, scale: float, mode: str, rank: int, world_size: int,
                 seed: int, synthetic_prob: float, use_encodings: bool, shuffle_buffer: int = 1000, batch_size: int = 1,
                 resampled: bool = True, index_of: dict[str, int] | None = None):
        super().__init__()
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.urls, self.spec, self.shift, self.scale = list(urls), spec, float(shift), float(scale)
        self.mode, self.rank, self.world_size, self.seed = mode, rank, world_size, seed
        self.synthetic_prob, self.use_encodings = synthetic_prob, use_encodings
        self.shuffle_buffer, self.batch_size, self.resampled = shuffle_buffer, batch_size, resampled
        self.epoch = 0  # set by the main process before each pass; copied into the workers when they start
        if use_encodings and not spec.encodings:
            raise ShardFormatError("these shards hold no text encodings")

    # ---- shard order ----
    def _shard_source(self):
        import webdataset as wds

        worker, num_workers = _worker()
        if self.mode == "eval":
            return (dict(url=u) for u in self.urls[worker::num_workers])
        if self.resampled:
            return iter(wds.ResampledShards(self.urls, seed=_derive_seed(self.seed, self.epoch), worker_seed=_RankWorkerSeed(self.rank), deterministic=True))
        mine = self.urls[self.rank :: self.world_size][worker::num_workers]
        if not mine:
            raise ValueError(
                f"{len(self.urls)} training shards cannot feed {self.world_size} ranks x {num_workers} workers without resampling: "
                f"use resampled=True or fewer workers"
            )
        rng = random.Random(_derive_seed(self.seed, self.epoch, self.rank, worker))

        def cycle():
            while True:
                order = list(mine)
                rng.shuffle(order)
                yield from (dict(url=u) for u in order)

        return cycle()

    # ---- samples ----
    def _item(self, s: dict, mix_epoch: int, log: SkipLog) -> dict:
        synthetic = use_synthetic(self.synthetic_prob, self.seed, mix_epoch, s["key"])
        # numpy, then one from_numpy each: per-sample torch ops cost far more than the arithmetic here
        x0 = (s["latent"].astype(np.float32) - np.float32(self.shift)) * np.float32(self.scale)
        item = {"x0": torch.from_numpy(x0), "caption": s["caption_syn"] if synthetic else s["caption"], "synthetic": synthetic,
                "key": s["key"], "label": s["label"]}
        if self.use_encodings:
            tokens, mask, pooled = s["syn" if synthetic else "orig"]
            full = np.zeros((self.spec.context_length, self.spec.context_dim), np.float32)
            full[mask] = tokens
            item.update(tokens=torch.from_numpy(full), mask=torch.from_numpy(mask.copy()), pooled=torch.from_numpy(pooled.astype(np.float32)))
        log.good()
        # eval items carry the counts since the previous item; train batches take them when they leave the worker
        item["_read"], item["_skipped"], item["_shard_errors"] = log.drain() if self.mode == "eval" else (0, 0, 0)
        return item

    def _keep(self, raw: dict) -> bool:
        """Eval mode: does this rank own the sample? (by its index in the split, from the key, else a hash of the key)."""
        if self.world_size == 1:
            return True
        key = str(raw.get("__key__", ""))
        tail = key.rsplit("_", 1)[-1]
        index = int(tail) if tail.isdigit() else zlib.crc32(key.encode())
        return index % self.world_size == self.rank

    def _items(self, log: SkipLog):
        samples = tar_samples(self._shard_source(), handler=log.shard)
        mix_epoch = self.epoch if self.mode == "train" else 0
        spec = self.spec if self.use_encodings or not self.spec.encodings else _without_encodings(self.spec)
        for raw in samples:
            if self.mode == "eval" and not self._keep(raw):
                continue
            try:
                s = spec.decode(raw)
            except ShardFormatError as err:
                log.sample(err)
                continue
            yield self._item(s, mix_epoch, log)

    def __iter__(self):
        log = SkipLog()
        if self.mode == "eval":
            yield from self._items(log)
            read, skipped, errors = log.drain()
            yield {"_end": True, "_read": read, "_skipped": skipped, "_shard_errors": errors}
            return
        worker, _ = _worker()
        rng = random.Random(_derive_seed(self.seed, self.epoch, self.rank, worker, 1))
        import webdataset as wds

        items = self._items(log)
        if self.shuffle_buffer > 1:
            items = wds.filters._shuffle(items, bufsize=self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)
        for batch in wds.filters._batched(items, self.batch_size, collation_fn=collate, partial=False):
            read, skipped, errors = log.drain()  # counted when read, even while the samples wait in the shuffle buffer
            batch["_read"] += read
            batch["_skipped"] += skipped
            batch["_shard_errors"] += errors
            yield batch


def _without_encodings(spec: SampleSpec) -> SampleSpec:
    import copy

    out = copy.copy(spec)
    out.encodings = False
    return out


# ---------------------------------------------------------------------------------------------
# Main-process loaders
# ---------------------------------------------------------------------------------------------


class TrainLoader:
    """Exactly ``steps`` batches per epoch from an endless stream (webdataset's with_epoch, plus a new seed every epoch)."""

    def __init__(self, stream: ShardStream, steps: int, num_workers: int, pin_memory: bool, prefetch_factor: int = 4):
        self.stream, self.steps = stream, steps
        kwargs = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        self.stream.epoch = self.epoch
        self.epoch += 1
        it = iter(self.loader)
        try:
            for _ in range(self.steps):
                yield next(it)
        finally:
            del it  # shuts the workers down


def plan_batches(n: int, batch_size: int, num_batches: int) -> list[int]:
    """Sizes of ``num_batches`` batches holding ``n`` samples: full batches first, then what is left spread so none is empty."""
    sizes = []
    left = n
    for i in range(num_batches):
        size = min(batch_size, left - (num_batches - i - 1))
        sizes.append(size)
        left -= size
    return sizes


class EvalLoader:
    """Validation / test batches: the stream's items batched in the main process to a fixed plan (equal batch counts on all ranks)."""

    def __init__(self, stream: ShardStream, batch_size: int, sizes: list[int] | None, num_workers: int, pin_memory: bool):
        self.stream, self.batch_size, self.sizes = stream, batch_size, sizes
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=False)
        self.pin_memory = pin_memory
        self.trailing = (0, 0, 0)  # counts that arrived after the last batch

    def __len__(self) -> int:
        if self.sizes is None:
            raise TypeError("the size of this evaluation set is unknown (its shards are not in the manifest)")
        return len(self.sizes)

    def __iter__(self):
        sizes = list(self.sizes) if self.sizes is not None else None
        pending: list[dict] = []
        extra = [0, 0, 0]
        target = lambda: sizes[0] if sizes else self.batch_size  # noqa: E731
        for item in self.loader:
            if item.get("_end"):
                extra[0] += item["_read"]
                extra[1] += item["_skipped"]
                extra[2] += item["_shard_errors"]
                continue
            pending.append(item)
            if len(pending) == target():
                yield self._batch(pending, extra)
                pending = []
                if sizes:
                    sizes.pop(0)
        if pending:
            yield self._batch(pending, extra)
        self.trailing = tuple(extra)

    def _batch(self, items: list[dict], extra: list[int]) -> dict:
        batch = collate(items)
        for i, name in enumerate(("_read", "_skipped", "_shard_errors")):
            batch[name] += extra[i]
            extra[i] = 0
        if self.pin_memory:
            batch = _pin(batch)
        return batch


def _pin(obj):
    if isinstance(obj, torch.Tensor):
        return obj.pin_memory()
    if isinstance(obj, dict):
        return {k: _pin(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------
# The data module
# ---------------------------------------------------------------------------------------------


class LatentShardDataModule(lightning.LightningDataModule):
    """Latent/caption shards written by ``python -m flowmatch prepare``, streamed with webdataset (see the module docstring).

    Batches: ``{"x0": float32 (B, C, h, w) normalised latents, "cond": {"pooled": (B, P), "tokens": (B, L, D),
    "mask": bool (B, L)}, "caption": list[str], "synthetic": bool (B,), "key": list[str], "label": int64 (B,)}``
    ("label" only when every sample has one).

    The constructor reads nothing: ``prepare_data`` writes the built-in demo when asked (``prepare_source``),
    and the manifest is read on first use (``facts``, at ``setup`` at the latest).
    """

    def __init__(
        self,
        shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        data_dir: str | None = None,
        manifest: str | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        steps_per_epoch: int | None = None,
        resampled: bool = True,
        synthetic_caption_prob: float = 0.5,
        seed: int = 0,
        text_encoders: list[str] | None = None,
        max_bad_fraction: float = 0.01,
        bad_check_after: int = 256,
        pin_memory: bool = True,
        autoencoder: str | None = None,
        prepare_source: str | None = None,
    ):
        """
        Args:
            shards: training shards: a path, a brace pattern ("train-{000000..000099}.tar"), any URL webdataset
                opens ("s3://...", "pipe:curl -s ..."), or a list of them. Default: the manifest's train split.
            val_shards: validation shards (read once per validation, never resampled); default: the manifest's val split.
            test_shards: test shards; default: the manifest's test split.
            data_dir: a directory holding manifest.json and the shards it names (e.g. data/demo).
            manifest: the manifest's path or URL, when it is not data_dir/manifest.json or beside the shards.
            batch_size: samples per training batch (per rank).
            val_batch_size: samples per validation / test batch (default batch_size).
            num_workers: loader worker processes per rank (0 = read in the main process).
            shuffle_buffer: samples in each worker's shuffle buffer (1 = no shuffling).
            steps_per_epoch: training batches per epoch on every rank; default one pass over the train split's samples.
            resampled: draw training shards with replacement (each rank and worker independently; recommended
                for multi-node runs); False cycles over each rank's and worker's own share of the shards.
            synthetic_caption_prob: probability that a sample takes its synthetic caption (SD3: 0.5).
            seed: seed of shard resampling, shuffling and caption mixing (reproducible whatever the workers).
            text_encoders: encode captions on the fly with these (local directories or "minilm"), whether or not
                the shards hold encodings; default: the shards' stored encodings, else the manifest's encoders.
            max_bad_fraction: stop with DataQualityError when more than this share of the read samples was bad.
            bad_check_after: samples to read before the share is judged (a few early bad samples do not stop a run).
            pin_memory: pin batches in page-locked memory (only when CUDA is available).
            autoencoder: the autoencoder that decodes the latents (a spec of flowmatch.autoencoders); default: the manifest's.
            prepare_source: write the shards first (``prepare --source SOURCE --out data_dir``) in ``prepare_data``
                when data_dir has no manifest, e.g. "demo"; the first process to get there writes, the others wait.
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= synthetic_caption_prob <= 1.0:
            raise ValueError(f"synthetic_caption_prob must be in [0, 1], got {synthetic_caption_prob}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer, self.steps_per_epoch = num_workers, shuffle_buffer, steps_per_epoch
        self.resampled, self.synthetic_prob, self.seed = resampled, synthetic_caption_prob, seed
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.health = DataHealth(max_bad_fraction, bad_check_after)
        self.manifest_location = self._locate_manifest(shards, data_dir, manifest)
        self._facts: LatentDataFacts | None = None
        self._urls: dict[str, list[str]] | None = None

    # ---- preparation and the facts of the data ----
    def prepare_data(self) -> None:
        """Write the shard set from ``prepare_source`` into ``data_dir`` if it has no manifest yet (Lightning calls
        this once per node, before ``setup``)."""
        hp = self.hparams
        if hp.data_dir is not None and hp.prepare_source is not None and hp.manifest is None:
            from flowmatch.data.prepare import prepare_once

            prepare_once(hp.data_dir, hp.prepare_source)

    @property
    def facts(self) -> LatentDataFacts:
        """Manifest, sample shape, text encoders, autoencoder and normalisation of the shards (read on first use)."""
        if self._facts is None:
            self._facts = self._read_facts()
        return self._facts

    def _read_facts(self) -> LatentDataFacts:
        hp = self.hparams
        try:
            manifest, base = read_manifest(self.manifest_location)
        except ShardFormatError as err:
            if hp.prepare_source is not None and hp.manifest is None:
                raise ShardFormatError(f"{err} (or call prepare_data(), which writes it from {hp.prepare_source!r}; "
                                       "Lightning calls it before setup)") from None
            raise
        facts = LatentDataFacts.from_manifest(manifest, self.manifest_location, base, hp.text_encoders, hp.autoencoder)
        if not facts.stores_encodings and hp.text_encoders is None and not (manifest.get("text") or {}).get("encoders"):
            raise ShardFormatError(f"{self.manifest_location}: the shards hold no text encodings and name no encoders: give text_encoders=[...]")
        return facts

    @property
    def manifest(self) -> dict:
        return self.facts.manifest

    @property
    def spec(self) -> SampleSpec:
        """What every sample must look like (from the manifest)."""
        return SampleSpec(self.manifest)

    @property
    def conditioning(self) -> ConditioningSpec:
        """What the batches' "cond" is: the text encodings (pooled vector and tokens) the facts describe."""
        return self.facts.conditioning

    @property
    def sample_shape(self) -> list[int]:
        """(C, h, w) of one latent."""
        return self.facts.sample_shape

    # ---- shard lists ----
    @staticmethod
    def _locate_manifest(shards, data_dir, manifest) -> str:
        if manifest is not None:
            return manifest
        if data_dir is not None:
            return str(Path(data_dir) / MANIFEST_NAME)
        urls = _expand(shards)
        if not urls:
            raise ShardFormatError("give data_dir (a folder with manifest.json), manifest=..., or shards=...")
        first = urls[0]
        if not _is_url(first):
            return str(Path(first).parent / MANIFEST_NAME)
        if first.startswith("pipe:"):
            raise ShardFormatError(f"cannot guess the manifest of {first!r}: give manifest=PATH_OR_URL")
        return first.rsplit("/", 1)[0] + "/" + MANIFEST_NAME

    def urls(self, split: str) -> list[str]:
        """The shard URLs of a split: those given (shards=, val_shards=, test_shards=), else the manifest's."""
        if self._urls is None:
            given = {"train": self.hparams.shards, "val": self.hparams.val_shards, "test": self.hparams.test_shards}
            self._urls = {s: _expand(given[s]) or self._manifest_urls(s) for s in SPLITS}
            if not self._urls["train"]:
                raise ShardFormatError(f"no training shards: give shards=... or a manifest with a train split ({self.manifest_location})")
        return self._urls[split]

    def _join(self, name: str) -> str:
        base = self.facts.base
        if _is_url(base):
            return base.rstrip("/") + "/" + name
        return str(Path(base) / name)

    def _manifest_urls(self, split: str) -> list[str]:
        return [self._join(n) for n in self.manifest["splits"].get(split, {}).get("shards", [])]

    def _shard_counts(self) -> dict[str, int]:
        """Samples per shard file name, from the manifest; shards it does not name are left out."""
        counts: dict[str, int] = {}
        for split in SPLITS:
            info = self.manifest["splits"].get(split, {})
            for name, n in zip(info.get("shards", []), info.get("counts", [])):
                counts[name] = int(n)
        return counts

    def num_samples(self, split: str) -> int | None:
        """Samples in a split's shards, from the manifest (None if a shard is not in it)."""
        counts = self._shard_counts()
        total = 0
        for url in self.urls(split):
            name = url.rsplit("/", 1)[-1]
            if name not in counts:
                return None
            total += counts[name]
        return total

    def _check_local_shards(self, split: str) -> None:
        missing = [u for u in self.urls(split) if not _is_url(u) and not Path(u.removeprefix("file:")).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} {split} shard(s) missing, e.g. {missing[0]} (manifest {self.manifest_location})")

    # ---- Lightning hooks ----
    def setup(self, stage: str | None = None) -> None:
        """Read the manifest and check that the stage's local shards exist (and that on-the-fly encoders load)."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", SPLITS)
        for split in splits:
            self._check_local_shards(split)
        if self.facts.encodes_on_the_fly:
            self.facts.text_encoders  # noqa: B018 - load them now: a bad encoder path fails before the first step

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def _rank(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def dataloader(self, split: str, rank: int | None = None, world_size: int | None = None, num_workers: int | None = None):
        """The loader of a split for one rank (default: this process's rank). Train: TrainLoader; val / test: EvalLoader."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits are: {', '.join(SPLITS)}")
        r, w = self._rank()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
        workers = self.num_workers if num_workers is None else num_workers
        urls = self.urls(split)
        if not urls:
            raise ShardFormatError(f"no {split} shards (manifest {self.manifest_location})")
        facts = self.facts
        common = dict(spec=self.spec, shift=facts.shift, scale=facts.scale, rank=rank, world_size=world_size, seed=self.seed,
                      synthetic_prob=self.synthetic_prob, use_encodings=facts.stores_encodings)
        if split == "train":
            n = self.num_samples("train")
            steps = self.steps_per_epoch
            if steps is None:
                if n is None:
                    raise ShardFormatError("the training shards are not in the manifest: give steps_per_epoch")
                steps = max(1, math.ceil(n / (self.batch_size * world_size)))
            stream = ShardStream(urls, mode="train", shuffle_buffer=self.shuffle_buffer, batch_size=self.batch_size,
                                 resampled=self.resampled, **common)
            return TrainLoader(stream, steps, workers, self.pin_memory)
        stream = ShardStream(urls, mode="eval", **common)
        sizes = self._eval_plan(split, rank, world_size)
        return EvalLoader(stream, self.val_batch_size, sizes, workers, self.pin_memory)

    def _eval_plan(self, split: str, rank: int, world_size: int) -> list[int] | None:
        """Batch sizes for this rank: its share of the split (index % world == rank), in the same number of batches on every rank."""
        n = self.num_samples(split)
        if n is None:
            return None
        if world_size == 1:
            return [min(self.val_batch_size, n - lo) for lo in range(0, n, self.val_batch_size)]
        per_rank = [len(range(r, n, world_size)) for r in range(world_size)]
        if min(per_rank) == 0:
            raise ShardFormatError(f"the {split} split has {n} samples, fewer than the {world_size} ranks")
        num_batches = math.ceil(max(per_rank) / self.val_batch_size)
        return plan_batches(per_rank[rank], self.val_batch_size, num_batches)

    def train_dataloader(self):
        return self.dataloader("train")

    def val_dataloader(self):
        return self.dataloader("val")

    def test_dataloader(self):
        return self.dataloader("test")

    def _stage(self) -> str:
        trainer = self._trainer_or_none()
        if trainer is None or trainer.training:
            return "train"
        return "test" if trainer.testing else "val"

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Take the skip counts out of the batch, add them up, stop if too much was bad (flowmatch.data.health)."""
        if isinstance(batch, dict) and "_skipped" in batch:
            stage = self._stage()
            read, skipped, errors = (int(batch.pop(k)) for k in ("_read", "_skipped", "_shard_errors"))
            self.health.update(stage, read, skipped, errors)
            bad = self.health.too_bad(stage)
            trainer = self._trainer_or_none()
            if trainer is not None and trainer.world_size > 1 and stage == "train":
                bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # every rank stops together
            if bad:
                raise self.health.error(stage, f"data ({stage} shards of {self.manifest_location})")
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Encode the captions on the batch's device when the shards' encodings are not used."""
        if self.facts.encodes_on_the_fly and isinstance(batch, dict) and "caption" in batch:
            batch["cond"] = self.facts.encode(batch["caption"], device=batch["x0"].device)
        return batch

    # ---- what sample metrics ask of any data module (the same methods as Toy2DDataModule's and
    # CouplingDataModule's); the work is done by flowmatch.data.reference and the facts ----
    def reference_batch(self, n: int, split: str = "val") -> dict:
        return reference.reference_batch(self, n, split)

    def reference_samples(self, n: int, split: str = "val", return_labels: bool = False):
        return reference.reference_samples(self, n, split, return_labels)

    def reference_images(self, n: int, split: str = "val") -> torch.Tensor:
        return reference.reference_images(self, n, split)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.facts.decode(latents)

    def encode_captions(self, captions: list[str], device: torch.device | str = "cpu") -> dict:
        return self.facts.encode(captions, device)
