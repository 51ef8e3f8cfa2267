"""Streaming latent/caption shards with webdataset: the data module of image-generation runs.

    shards (local paths, brace patterns, any URL webdataset opens, pipe: commands)
      train: an endless sequence of *passes* in every (rank, worker) slot: a pass reads the slot's share
             of the shards once in a fresh order (resampled: its chunk of the whole shard list reshuffled
             each pass, so any number of ranks x workers can read any number of shards)
             -> tar samples -> shuffle buffer -> decode + check -> caption mixing
             -> one bounded buffer per latent shape (bucket): a full buffer is a batch; at the end of
                a pass the partial buffers are yielded too, so every sample is used exactly once a pass
             -> a fixed number of batches per epoch on every rank (no rank waits for another); the
                stream goes on across epochs (passes and epochs are independent)
      val / test: every shard once, in order; rank r keeps the samples with index % world == r,
             so no sample is seen twice and the ranks' batch counts are equal; batched in the main process
             (one shape a batch: bucketed splits are batched per bucket to a plan made from the manifest)
    -> batch {"x0": (B, C, h, w) normalised latents, "cond": {"pooled", "tokens", "mask"}, "caption": [...],
              "synthetic": bool (B,), "key": [...], "label": int64 (B,) when known,
              "bucket": "HxW" (pixels) when the shard set has aspect-ratio buckets}

Exact resume (training): a pass is a function of (seed, rank, worker, pass number) alone, and every
batch says where it came from (worker, pass, batch index in the pass). The data position kept in
checkpoints is, for every rank and worker, the pass and batch to continue with; a resumed worker
regenerates that pass and drops the batches already used. So the bucket buffers' content need not be
saved: the design makes it unnecessary (the cost is re-reading at most one pass of a worker's shards).

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
import warnings
import zlib
from collections import deque
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
    if "bucket" in items[0]:
        batch["bucket"] = items[0]["bucket"]  # one shape a batch
    labels = [it["label"] for it in items]
    if all(label is not None for label in labels):
        batch["label"] = torch.tensor(labels, dtype=torch.int64)
    return batch


class ShardStream(IterableDataset):
    """The samples one rank reads from a list of shard URLs, decoded into items (runs inside loader workers).

    mode "train": endless; pass after pass over this rank's and worker's share of the shards in a fresh
    order (resampled: its chunk of the whole shard list, reshuffled each pass), a shuffle buffer, then one buffer per
    latent shape, batches of ``batch_size`` built in the worker (module docstring). ``start`` maps a
    worker to the (pass, batch) it continues with, ``worker_offset`` says which logical worker the
    DataLoader's first worker plays (both set by TrainLoader on a resume). mode "eval": every shard once,
    in order, split over workers by shard and over ranks by sample index, single items (the main process
    batches them), then one end marker.
    """

    def __init__(self, urls: list[str], spec: SampleSpec, shift: float, scale: float, mode: str, rank: int, world_size: int,
                 seed: int, synthetic_prob: float, use_encodings: bool, shuffle_buffer: int = 1000, batch_size: int = 1,
                 resampled: bool = True, bucket_names: dict[tuple[int, int], str] | None = None,
                 bucket_repeats: dict[str, int] | None = None):
        super().__init__()
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.urls, self.spec, self.shift, self.scale = list(urls), spec, float(shift), float(scale)
        self.mode, self.rank, self.world_size, self.seed = mode, rank, world_size, seed
        self.synthetic_prob, self.use_encodings = synthetic_prob, use_encodings
        self.shuffle_buffer, self.batch_size, self.resampled = shuffle_buffer, batch_size, resampled
        self.bucket_names = dict(bucket_names or {})  # latent (h, w) -> bucket name, for sets with buckets
        self.bucket_repeats = dict(bucket_repeats or {})  # bucket name -> uses of each of its samples a training pass
        self.start: dict[int, tuple[int, int]] = {}  # worker -> (pass, batch index) to continue with
        self.worker_offset = 0
        if use_encodings and not spec.encodings:
            raise ShardFormatError("these shards hold no text encodings")

    # ---- shard order ----
    def _pass_shards(self, worker: int, num_workers: int, pass_index: int) -> list[str]:
        """The shards one training pass of this rank's ``worker`` reads, in order (a function of the seed and the pass)."""
        if self.resampled:
            # every slot cuts its chunk from the same reshuffled list of all shards (seeded by the pass alone): the
            # slots together read every shard in each pass, and any number of slots works (chunks wrap around)
            slots, slot = self.world_size * num_workers, self.rank * num_workers + worker
            order = list(self.urls)
            random.Random(_derive_seed(self.seed, pass_index)).shuffle(order)
            count = max(1, math.ceil(len(order) / slots))
            return [order[(slot * count + j) % len(order)] for j in range(count)]
        rng = random.Random(_derive_seed(self.seed, pass_index, self.rank, worker))
        mine = self.urls[self.rank :: self.world_size][worker::num_workers]
        if not mine:
            raise ValueError(
                f"{len(self.urls)} training shards cannot feed {self.world_size} ranks x {num_workers} workers without resampling: "
                f"use resampled=True or fewer workers"
            )
        rng.shuffle(mine)
        return mine

    # ---- samples ----
    def _item(self, s: dict, mix_epoch: int, log: SkipLog, repeat: int = 0) -> dict:
        # a repeated sample draws its caption afresh for each use (its key with the repeat number)
        synthetic = use_synthetic(self.synthetic_prob, self.seed, mix_epoch, s["key"] if repeat == 0 else f"{s['key']}#{repeat}")
        # numpy, then one from_numpy each: per-sample torch ops cost far more than the arithmetic here
        x0 = (s["latent"].astype(np.float32) - np.float32(self.shift)) * np.float32(self.scale)
        item = {"x0": torch.from_numpy(x0), "caption": s["caption_syn"] if synthetic else s["caption"], "synthetic": synthetic,
                "key": s["key"], "label": s["label"]}
        if self.bucket_names:
            item["bucket"] = self.bucket_names[tuple(x0.shape[1:])]
        if self.use_encodings:
            tokens, mask, pooled = s["syn" if synthetic else "orig"]
            full = np.zeros((self.spec.context_length, self.spec.context_dim), np.float32)
            full[mask] = tokens
            item.update(tokens=torch.from_numpy(full), mask=torch.from_numpy(mask.copy()), pooled=torch.from_numpy(pooled.astype(np.float32)))
        if repeat == 0:
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

    def _items(self, shards, mix_epoch: int, log: SkipLog):
        samples = tar_samples(shards, handler=log.shard)
        spec = self.spec if self.use_encodings or not self.spec.encodings else _without_encodings(self.spec)
        for raw in samples:
            if self.mode == "eval" and not self._keep(raw):
                continue
            try:
                s = spec.decode(raw)
            except ShardFormatError as err:
                log.sample(err)
                continue
            repeats = 1
            if self.mode == "train" and self.bucket_repeats:
                repeats = self.bucket_repeats.get(self.bucket_names[tuple(s["latent"].shape[1:])], 1)
                if repeats == 0:  # a bucket left out of training: read and counted, not used
                    log.good()
                    continue
            for repeat in range(repeats):
                yield self._item(s, mix_epoch, log, repeat)

    def _pass(self, worker: int, num_workers: int, pass_index: int, log: SkipLog):
        """The batches of one training pass: every sample of the pass's shards exactly once, one shape a batch.

        Samples wait in the shuffle buffer, then in one buffer per latent shape (at most batch_size - 1 each);
        a full buffer is a batch; the partial buffers end the pass (in a fixed order), so nothing carries over
        and a pass can be regenerated on its own."""
        import webdataset as wds

        urls = self._pass_shards(worker, num_workers, pass_index)
        items = self._items((dict(url=u) for u in urls), pass_index, log)  # captions re-mixed every pass
        if self.shuffle_buffer > 1:
            rng = random.Random(_derive_seed(self.seed, pass_index, self.rank, worker, 1))
            items = wds.filters._shuffle(items, bufsize=self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)
        waiting: dict[tuple[int, ...], list[dict]] = {}
        for item in items:
            shape = tuple(item["x0"].shape)
            bucket = waiting.setdefault(shape, [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield collate(bucket)
                waiting[shape] = []
        for shape in sorted(waiting):
            if waiting[shape]:
                yield collate(waiting[shape])

    def __iter__(self):
        log = SkipLog()
        if self.mode == "eval":
            worker, num_workers = _worker()
            yield from self._items((dict(url=u) for u in self.urls[worker::num_workers]), 0, log)
            read, skipped, errors = log.drain()
            yield {"_end": True, "_read": read, "_skipped": skipped, "_shard_errors": errors}
            return
        physical, num_workers = _worker()
        worker = (physical + self.worker_offset) % num_workers  # the logical worker this process plays
        pass_index, skip = self.start.get(worker, (0, 0))
        while True:
            count = 0
            for index, batch in enumerate(self._pass(worker, num_workers, pass_index, log)):
                count += 1
                read, skipped, errors = log.drain()  # counted when read, even while the samples wait in the buffers
                if index < skip:  # used before the resume: regenerated only to rebuild the buffers
                    continue
                batch["_read"] += read
                batch["_skipped"] += skipped
                batch["_shard_errors"] += errors
                batch["_worker"], batch["_pass"], batch["_index"] = worker, pass_index, index
                yield batch
            if count == 0:
                raise ShardFormatError(f"pass {pass_index} of rank {self.rank}, worker {worker} read no usable sample from "
                                       f"{self._pass_shards(worker, num_workers, pass_index)}")
            skip, pass_index = 0, pass_index + 1


def _without_encodings(spec: SampleSpec) -> SampleSpec:
    import copy

    out = copy.copy(spec)
    out.encodings = False
    return out


# ---------------------------------------------------------------------------------------------
# Main-process loaders
# ---------------------------------------------------------------------------------------------


class TrainLoader:
    """``steps`` batches per epoch from the endless training stream, which goes on across epochs.

    It keeps where every worker of this rank stands: the batches carry (worker, pass, batch index), and
    :meth:`position` turns the number of batches training has consumed into each worker's next (pass,
    batch), what a checkpoint keeps. :meth:`resume` puts a new loader at such a position (module docstring).
    """

    def __init__(self, stream: ShardStream, steps: int, num_workers: int, pin_memory: bool, prefetch_factor: int = 4):
        self.stream, self.steps = stream, steps
        kwargs = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
        self.num_slots = max(1, num_workers)  # logical workers (the main process is worker 0 of 1)
        self.yielded = 0  # batches handed out since the stream started (a resumed loader starts at the position)
        self._next: dict[int, tuple[int, int]] = {}  # worker -> (pass, index) next, as of the batches folded in
        self._recent: deque = deque()  # (global index, worker, pass, index) of recent batches, maybe not consumed yet
        self._it = None
        self.last_position: tuple[int, int, int] | None = None  # (worker, pass, index) of the last batch handed out

    def __len__(self) -> int:
        return self.steps

    def resume(self, consumed: int, next_of: dict[int, tuple[int, int]]) -> None:
        """Continue after ``consumed`` batches, each worker at its (pass, batch index) ``next_of`` (before the first iteration)."""
        if self._it is not None:
            raise RuntimeError("resume() must come before the training stream starts")
        self.yielded = int(consumed)
        self._next = {int(w): (int(p), int(i)) for w, (p, i) in next_of.items()}

    def position(self, consumed: int) -> dict[int, tuple[int, int]]:
        """Every worker's next (pass, batch index) once ``consumed`` batches of the stream have been used."""
        out = dict(self._next)
        for g, worker, pass_index, index in self._recent:
            if g < consumed:
                out[worker] = (pass_index, index + 1)
        return out

    def __iter__(self):
        if self._it is None:
            self.stream.start = dict(self._next)
            # the DataLoader takes batches from its workers in turn, starting with the first: after a resume that
            # one must play the worker whose turn it was, so batch g always comes from worker g % num_slots
            self.stream.worker_offset = self.yielded % self.num_slots
            self._it = iter(self.loader)
        for _ in range(self.steps):
            batch = next(self._it)
            if "_worker" in batch:  # a ShardStream's batch; other streams (reflow's couplings) carry no position
                worker, pass_index, index = (int(batch.pop(k)) for k in ("_worker", "_pass", "_index"))
                self.last_position = (worker, pass_index, index)
                self._recent.append((self.yielded, worker, pass_index, index))
            self.yielded += 1
            while len(self._recent) > 8 + 2 * self.num_slots:  # old enough to be consumed for sure
                _, w, p, i = self._recent.popleft()
                self._next[w] = (p, i + 1)
            yield batch

    def close(self) -> None:
        """Stop the workers; the next iteration restarts the stream after the last batch handed out."""
        self._next, self._recent, self._it = self.position(self.yielded), deque(), None


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
    """Validation / test batches: the stream's items batched in the main process to a fixed plan (equal batch counts on all ranks).

    ``sizes``: the batch sizes in order (single-shape sets), or for sets with buckets {bucket: [sizes]}: items
    wait in their bucket's list until it holds the bucket's next planned size (one shape a batch)."""

    def __init__(self, stream: ShardStream, batch_size: int, sizes: list[int] | dict[str, list[int]] | None, num_workers: int,
                 pin_memory: bool):
        self.stream, self.batch_size, self.sizes = stream, batch_size, sizes
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=False)
        self.pin_memory = pin_memory
        self.trailing = (0, 0, 0)  # counts that arrived after the last batch

    def __len__(self) -> int:
        if self.sizes is None:
            raise TypeError("the size of this evaluation set is unknown (its shards are not in the manifest)")
        return sum(len(v) for v in self.sizes.values()) if isinstance(self.sizes, dict) else len(self.sizes)

    def __iter__(self):
        plan = ({b: list(v) for b, v in self.sizes.items()} if isinstance(self.sizes, dict)
                else {None: list(self.sizes)} if self.sizes is not None else {})
        pending: dict = {}
        extra = [0, 0, 0]
        for item in self.loader:
            if item.get("_end"):
                extra[0] += item["_read"]
                extra[1] += item["_skipped"]
                extra[2] += item["_shard_errors"]
                continue
            bucket = item.get("bucket") if isinstance(self.sizes, dict) else None
            waiting = pending.setdefault(bucket, [])
            waiting.append(item)
            sizes = plan.get(bucket)
            if len(waiting) == (sizes[0] if sizes else self.batch_size):
                yield self._batch(waiting, extra)
                pending[bucket] = []
                if sizes:
                    sizes.pop(0)
        for bucket in sorted(pending, key=str):  # what the plan did not foresee (a manifest that undercounts)
            if pending[bucket]:
                yield self._batch(pending[bucket], extra)
        self.trailing = tuple(extra)

    def _batch(self, items: list[dict], extra: list[int]) -> dict:
        batch = collate(items)
        for i, name in enumerate(("_read", "_skipped", "_shard_errors")):
            batch[name] += extra[i]
            extra[i] = 0
        if self.pin_memory:
            batch = _pin(batch)
        return batch


def plan_bucket_batches(counts: dict[str, int], batch_size: int, num_batches: int) -> dict[str, list[int]]:
    """Batch sizes per bucket for ``counts`` samples per bucket, in exactly ``num_batches`` batches (at least the
    ceil(n / batch_size) per bucket): the largest batches are halved until the count is reached, so ranks with
    fewer samples still run as many batches as the others (a DDP validation needs equal counts)."""
    sizes = {b: [min(batch_size, n - lo) for lo in range(0, n, batch_size)] for b, n in counts.items() if n > 0}
    while sum(len(v) for v in sizes.values()) < num_batches:
        bucket = max(sizes, key=lambda b: max(sizes[b]))
        big = max(sizes[bucket])
        if big < 2:
            raise ShardFormatError(f"{sum(counts.values())} samples cannot fill {num_batches} batches")
        sizes[bucket].remove(big)
        sizes[bucket] += [big - big // 2, big // 2]
    return sizes


def _check_repeats(repeats: dict[str, int] | None) -> dict[str, int]:
    out = {}
    for name, k in (repeats or {}).items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"bucket_repeats[{name!r}] must be a whole number >= 0, got {k!r}")
        out[str(name)] = k
    return out


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
        bucket_repeats: dict[str, int] | None = None,
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
            resampled: every pass reshuffles the whole shard list and gives each rank x worker a chunk of it
                (any number of shards feeds any number of ranks x workers; recommended for multi-node runs); False: each
                rank and worker reads only its own share (shards[rank::world][worker::workers]), needing shards >= slots.
            bucket_repeats: how often each sample of a bucket is used a training pass, by bucket name
                ({"24x40": 2, "40x24": 0}; kohya's repeats): the buckets then appear in proportion to count x repeats
                instead of their counts alone; 0 leaves a bucket out of training; unnamed buckets keep 1.
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
        self.bucket_repeats = _check_repeats(bucket_repeats)
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
        if "train" in splits:
            self._train_uses()  # bucket_repeats naming a bucket the data does not have fails here, before any step
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
        names = {tuple(b["latent_size"]): b["name"] for b in facts.buckets}
        common = dict(spec=self.spec, shift=facts.shift, scale=facts.scale, rank=rank, world_size=world_size, seed=self.seed,
                      synthetic_prob=self.synthetic_prob, use_encodings=facts.stores_encodings, bucket_names=names)
        if split == "train":
            n = self._train_uses()
            steps = self.steps_per_epoch
            if steps is None:
                if n is None:
                    raise ShardFormatError("the training shards are not in the manifest: give steps_per_epoch")
                steps = max(1, math.ceil(n / (self.batch_size * world_size)))
            stream = ShardStream(urls, mode="train", shuffle_buffer=self.shuffle_buffer, batch_size=self.batch_size,
                                 resampled=self.resampled, bucket_repeats=self.bucket_repeats, **common)
            loader = TrainLoader(stream, steps, workers, self.pin_memory)
            self._resume_train(loader, rank, world_size)
            self._train_loader = loader
            return loader
        stream = ShardStream(urls, mode="eval", **common)
        sizes = self._eval_plan(split, rank, world_size)
        return EvalLoader(stream, self.val_batch_size, sizes, workers, self.pin_memory)

    def _train_uses(self) -> int | None:
        """Samples one training pass uses: the train split's count, or with ``bucket_repeats`` the sum of count x repeats."""
        n = self.num_samples("train")
        if not self.bucket_repeats:
            return n
        buckets = self.manifest.get("buckets")
        if not buckets:
            raise ValueError(f"bucket_repeats is set but {self.manifest_location} has no aspect-ratio buckets")
        names = list(buckets["names"])
        unknown = sorted(set(self.bucket_repeats) - set(names))
        if unknown:
            raise ValueError(f"bucket_repeats names unknown bucket(s) {', '.join(unknown)}; the buckets are: {', '.join(names)}")
        counts = [int(c) for c in buckets["counts"].get("train", [])]
        uses = sum(c * self.bucket_repeats.get(name, 1) for name, c in zip(names, counts))
        if counts and uses == 0:
            raise ValueError(f"bucket_repeats {self.bucket_repeats} leaves no training sample")
        if n is None or not counts:
            return n
        return max(1, round(n * uses / sum(counts)))  # the manifest's mix, scaled to the shards given (a subset reads alike)

    def _eval_plan(self, split: str, rank: int, world_size: int) -> list[int] | dict[str, list[int]] | None:
        """Batch sizes for this rank: its share of the split (index % world == rank), in the same number of batches on every rank."""
        n = self.num_samples(split)
        if n is None:
            return None
        if self.facts.buckets:
            return self._bucket_plan(split, n, rank, world_size)
        if world_size == 1:
            return [min(self.val_batch_size, n - lo) for lo in range(0, n, self.val_batch_size)]
        per_rank = [len(range(r, n, world_size)) for r in range(world_size)]
        if min(per_rank) == 0:
            raise ShardFormatError(f"the {split} split has {n} samples, fewer than the {world_size} ranks")
        num_batches = math.ceil(max(per_rank) / self.val_batch_size)
        return plan_batches(per_rank[rank], self.val_batch_size, num_batches)

    def _bucket_plan(self, split: str, n: int, rank: int, world_size: int) -> dict[str, list[int]]:
        """Per-bucket batch sizes for this rank. prepare writes val / test sorted by bucket, so bucket b holds the
        sample indices [start_b, start_b + count_b); a rank owns the indices i with i % world_size == rank."""
        buckets = self.facts.buckets
        counts = [int(c) for c in self.manifest["buckets"]["counts"].get(split, [0] * len(buckets))]
        if sum(counts) != n:
            raise ShardFormatError(f"{self.manifest_location}: the {split} bucket counts add up to {sum(counts)}, the split has {n}")
        starts = np.cumsum([0, *counts])
        share = [{b["name"]: len(range(int(lo) + (r - int(lo)) % world_size, int(hi), world_size))
                  for b, lo, hi in zip(buckets, starts[:-1], starts[1:])} for r in range(world_size)]
        needed = max(sum(math.ceil(c / self.val_batch_size) for c in s.values()) for s in share)
        if min(sum(s.values()) for s in share) < needed:
            raise ShardFormatError(f"the {split} split has too few samples ({n}) for {world_size} ranks to run {needed} batches each")
        return plan_bucket_batches(share[rank], self.val_batch_size, needed)

    # ---- the data position in checkpoints (exact resume of the training stream) ----
    def state_dict(self) -> dict:
        """Where the training stream stands: batches consumed, and every rank's workers' next (pass, batch).

        Called on every rank when a checkpoint is written (Lightning's dump_checkpoint); the ranks' positions are
        gathered, so one file resumes them all."""
        trainer, loader = self._trainer_or_none(), getattr(self, "_train_loader", None)
        if trainer is None or loader is None or getattr(trainer.state.fn, "value", trainer.state.fn) != "fit":
            return {}
        done = trainer.fit_loop.epoch_progress.current.completed * len(loader)
        consumed = int(done + trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        mine = {str(w): list(pos) for w, pos in loader.position(consumed).items()}
        ranks = [mine]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {"train_stream": {"consumed": consumed, "workers": loader.num_slots, "ranks": ranks}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_position = state_dict.get("train_stream")

    def _resume_train(self, loader: TrainLoader, rank: int, world_size: int) -> None:
        position = getattr(self, "_resume_position", None)
        if not position:
            return
        self._resume_position = None
        if len(position["ranks"]) != world_size or int(position["workers"]) != loader.num_slots:
            warnings.warn(f"the checkpoint's data position is for {len(position['ranks'])} rank(s) x {position['workers']} worker(s), "
                          f"this run has {world_size} x {loader.num_slots}: the training stream restarts from its first pass "
                          "(the run goes on, not exactly as it would have)", stacklevel=2)
            return
        loader.resume(position["consumed"], {int(w): tuple(pos) for w, pos in position["ranks"][rank].items()})

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
