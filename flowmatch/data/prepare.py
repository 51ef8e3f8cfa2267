"""Images + captions -> latent/caption shards (the format of flowmatch.data.shard_format).

    source (demo | sideways | demo_buckets | scenes | image folder | jsonl) -> fixed train / val / test split
        [-> each image to its aspect-ratio bucket (flowmatch.data.buckets); val / test sorted by bucket]
        -> images (one square size, or fitted to their buckets) -> autoencoder.encode -> float16 latents
        -> original and synthetic captions -> text encoders -> token states, masks, pooled vectors
           (each distinct caption of a shard encoded once)
        -> webdataset ShardWriter: OUT/{split}-{shard:06d}.tar, ``shard_size`` samples each
    -> OUT/manifest.json (counts, latent shape, normalisation measured on the train split, encoders)

Resumable: every finished shard is recorded in OUT/.prepare-state.json (with the latent sums its
normalisation needs); a re-run with the same settings skips finished shards and redoes only an
unfinished one (written as NAME.partial and renamed when complete). A re-run with other settings
refuses to mix them into the same folder unless ``overwrite``. The manifest is written last, so
a training run never sees a half-written shard set.

Buckets (``buckets`` given, ``bucket_pixels`` to make them, or the source's own, as demo_buckets has): every
image goes to the bucket nearest its aspect ratio and is resized and centre-cropped to it; the autoencoder
encodes each bucket's images as one batch shape. An image below every bucket in both sides is skipped (and
counted) or, with ``small_images="upscale"``, enlarged. The manifest's "buckets" entry (names, pixel and latent
sizes, sample counts per split and bucket) tells the loader which shapes to expect; val and test samples
are written sorted by bucket, so each bucket's are one run of consecutive indices; train keeps the source's
order, so its shards mix buckets. Without buckets the set holds one square size, exactly as before.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowmatch.autoencoders.base import load_autoencoder
from flowmatch.data.buckets import Bucket, bucket_name, check_buckets, fit_to_bucket, is_small, make_buckets, nearest_bucket
from flowmatch.data.shard_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    encode_sample,
    sample_key,
    shard_name,
    write_manifest,
)
from flowmatch.data.sources import BUILT_IN_SOURCES, SCENES, Record, Source, SourceError, open_source

STATE_NAME = ".prepare-state.json"


class PrepareError(ValueError):
    """Settings or an output folder that prepare cannot work with; the message says what to do."""


@dataclass
class PrepareConfig:
    """Settings of one shard set (see ``python -m flowmatch prepare --help``)."""

    source: str = "demo"
    out: str = "data/demo"
    autoencoder: str = "space_to_depth:4"
    text_encoders: list[str] = field(default_factory=lambda: ["minilm"])
    max_length: list[int] | None = None
    store_encodings: bool = True
    size: int | None = None
    channels: int | None = None
    num: int | None = None
    shard_size: int = 256
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    limit: int | None = None
    shift: float | None = None
    scale: float | None = None
    buckets: list[list[int]] | None = None
    bucket_pixels: int | None = None
    bucket_multiple: int | None = None
    bucket_max_ratio: float = 2.0
    small_images: str = "skip"
    batch_size: int = 128
    text_batch_size: int | None = None  # None: the source's (flowmatch.data.sources.Source.text_batch_size)
    device: str = "cpu"
    overwrite: bool = False
    progress: bool = True

    def fingerprint(self) -> dict:
        """The settings that decide the shards' content (a re-run must match them to resume)."""
        keys = ("source", "autoencoder", "text_encoders", "max_length", "store_encodings", "size", "channels",
                "shard_size", "seed", "val_fraction", "test_fraction", "limit")
        out = {k: getattr(self, k) for k in keys}
        bucket_keys = ("buckets", "bucket_pixels", "bucket_multiple", "bucket_max_ratio", "small_images")
        if any(getattr(self, k) != PrepareConfig.__dataclass_fields__[k].default for k in bucket_keys):
            out.update({k: getattr(self, k) for k in bucket_keys})  # only then: the settings of older sets stay as they were
            if self.buckets is not None:
                out["buckets"] = [[int(v) for v in b] for b in self.buckets]  # as JSON gives them back on resume
        if self.num is not None or self.source == SCENES:  # only then: the settings of older sets stay as they were
            from flowmatch.data.scenes.source import DEFAULT_NUM

            out["num"] = DEFAULT_NUM if self.num is None else self.num
        if self.source not in BUILT_IN_SOURCES:  # a folder or file: its identity is its absolute path
            out["source"] = str(Path(self.source).resolve())
        ae = Path(self.autoencoder)
        if ae.exists():  # a checkpoint or directory: its identity is its path and modification time
            out["autoencoder"] = f"{ae.resolve()}@{int(ae.stat().st_mtime)}"
        return out


def _shards_of(records: list[Record], shard_size: int) -> list[list[Record]]:
    return [records[i : i + shard_size] for i in range(0, len(records), shard_size)]


class _State:
    """OUT/.prepare-state.json: the settings fingerprint and the finished shards with their latent sums."""

    def __init__(self, out: Path, fingerprint: dict, overwrite: bool):
        self.path = out / STATE_NAME
        self.fingerprint = fingerprint
        old = json.loads(self.path.read_text()) if self.path.is_file() else None
        if old is not None and old.get("fingerprint") != fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(old.get("fingerprint", {})) if fingerprint.get(k) != old.get("fingerprint", {}).get(k))
            if not overwrite:
                raise PrepareError(
                    f"{out} already holds shards written with other settings (they differ in: {', '.join(diff)}); "
                    f"use another --out, or --overwrite to delete them"
                )
            old = None
            for f in list(out.glob("*.tar")) + list(out.glob("*.tar.partial")) + [out / MANIFEST_NAME]:
                f.unlink(missing_ok=True)
        elif old is None and overwrite:
            for f in list(out.glob("*.tar")) + list(out.glob("*.tar.partial")) + [out / MANIFEST_NAME]:
                f.unlink(missing_ok=True)
        elif old is None and any(out.glob("*.tar")):
            raise PrepareError(f"{out} holds .tar files that prepare did not record; use another --out, or --overwrite to delete them")
        self.done: dict[str, dict] = (old or {}).get("done", {})
        # a shard recorded as done must still be there
        self.done = {name: info for name, info in self.done.items() if (out / name).is_file()}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done}, indent=1))
        tmp.replace(self.path)


def _to_autoencoder_channels(images: np.ndarray, channels: int, source: str) -> np.ndarray:
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return np.repeat(images, channels, axis=1)
    raise PrepareError(f"{source}: images have {images.shape[1]} channels but the autoencoder takes {channels}")


def prepare_shards(cfg: PrepareConfig, log=print) -> dict:
    """Write (or finish writing) the shard set ``cfg.out``; returns the manifest (with a "summary" of this run)."""
    run = _start(cfg)
    if run.todo == 0 and (run.out / MANIFEST_NAME).is_file():
        return _finish(run, json.loads((run.out / MANIFEST_NAME).read_text()), log)
    autoencoder = run.autoencoder or _load_autoencoder(cfg, run.source)
    text = _load_text_encoders(cfg, run.source)
    encode_text = cfg.store_encodings and text is not None
    _write_shards(run, autoencoder, text if encode_text else None)
    manifest = _manifest(run, autoencoder, text, encode_text)
    write_manifest(manifest, run.out)
    return _finish(run, manifest, log)


def prepare_once(data_dir: str, source: str) -> None:
    """Write the shard set in data_dir from ``source`` unless its manifest exists; one process writes, the others wait."""
    import fcntl

    out = Path(data_dir)
    if (out / MANIFEST_NAME).is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / MANIFEST_NAME).is_file():
                print(f"no shards in {out}: writing them from {source!r} (python -m flowmatch prepare --source {source} --out {out})")
                prepare_shards(PrepareConfig(source=source, out=str(out), progress=os.environ.get("CI") is None))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- the steps of prepare_shards --------------------------------------------------------------------------


@dataclass
class _Buckets:
    """The buckets of a run and each record's bucket (prepare's plan when it buckets images)."""

    sizes: list[Bucket]
    target_pixels: int | None
    index: dict[str, list[int]]  # split -> the bucket (index into sizes) of each record of run.splits[split]
    skipped: dict[str, int]  # split -> small images left out
    small_examples: list[str]  # the first few small images (skipped or upscaled), for the summary
    upscaled: int = 0

    def latent_sizes(self, autoencoder) -> list[list[int]]:
        return [list(autoencoder.latent_shape(b)[1:]) for b in self.sizes]

    def counts(self, split: str) -> list[int]:
        return np.bincount(np.asarray(self.index[split], dtype=np.int64), minlength=len(self.sizes)).tolist()


@dataclass
class _Run:
    """One prepare run: its settings, output folder, record of finished shards, source and plan of shards."""

    cfg: PrepareConfig
    out: Path
    state: _State
    source: Source
    splits: dict[str, list[Record]]
    plan: dict[str, list[list[Record]]]  # split -> shards -> records
    start: float
    buckets: _Buckets | None = None
    autoencoder: object = None  # loaded early when the buckets' default multiple needs its downsampling
    written: dict[str, int] = field(default_factory=lambda: {split: 0 for split in SPLITS})
    no_synthetic: int = 0

    @property
    def total(self) -> int:
        return sum(len(r) for r in self.splits.values())

    @property
    def todo(self) -> int:
        """Samples in shards not finished yet."""
        return sum(len(recs) for split in SPLITS for k, recs in enumerate(self.plan[split]) if shard_name(split, k) not in self.state.done)


def _start(cfg: PrepareConfig) -> _Run:
    """Check the settings, open the output folder (and its record of finished shards) and plan the shards."""
    start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.shard_size < 1:
        raise PrepareError(f"shard_size must be >= 1, got {cfg.shard_size}")
    state = _State(out, cfg.fingerprint(), cfg.overwrite)
    source: Source = open_source(cfg.source, cfg.size, cfg.channels, cfg.num, cfg.seed)
    splits = source.splits(cfg.seed, cfg.val_fraction, cfg.test_fraction, cfg.limit)
    autoencoder, buckets = None, None
    if cfg.buckets is not None or cfg.bucket_pixels is not None or source.buckets is not None:
        autoencoder = _load_autoencoder(cfg, source)
        splits, buckets = _assign_buckets(cfg, source, splits, autoencoder.downsample)
    plan = {split: _shards_of(splits[split], cfg.shard_size) for split in SPLITS}
    return _Run(cfg, out, state, source, splits, plan, start, buckets, autoencoder)


def _bucket_sizes(cfg: PrepareConfig, source: Source, downsample: int) -> tuple[list[Bucket], int | None]:
    """The run's buckets (given, made from bucket_pixels, or the source's own) and the target area they were made for."""
    if cfg.buckets is not None and cfg.bucket_pixels is not None:
        raise PrepareError("give either buckets (the sizes) or bucket_pixels (to make them), not both")
    if cfg.size is not None:
        raise PrepareError(f"size {cfg.size} sets one square size; with buckets each image takes its bucket's size: leave size out")
    if cfg.small_images not in ("skip", "upscale"):
        raise PrepareError(f"small_images must be 'skip' or 'upscale', got {cfg.small_images!r}")
    multiple = cfg.bucket_multiple or 2 * downsample  # whole 2x2 patches of latent pixels
    try:
        if cfg.buckets is not None:
            return check_buckets(cfg.buckets, multiple), None
        if cfg.bucket_pixels is not None:
            return check_buckets(make_buckets(cfg.bucket_pixels, multiple, cfg.bucket_max_ratio), multiple), cfg.bucket_pixels
        return check_buckets(source.buckets, multiple), None
    except ValueError as err:
        raise PrepareError(str(err)) from err


def _assign_buckets(cfg: PrepareConfig, source: Source, splits: dict[str, list[Record]], downsample: int):
    """Each record's bucket (from its native size; no image is loaded), small images left out unless upscaled, and val /
    test sorted by bucket (stable) so each bucket's samples there are consecutive. Returns (splits, _Buckets)."""
    sizes, target = _bucket_sizes(cfg, source, downsample)
    out, buckets = {}, _Buckets(sizes, target, {}, {split: 0 for split in SPLITS}, [])
    for split in SPLITS:
        kept, index = [], []
        for rec in splits[split]:
            h, w = source.image_size(rec)
            if is_small(h, w, sizes):
                if len(buckets.small_examples) < 5:
                    buckets.small_examples.append(f"{rec.source} ({h}x{w})")
                if cfg.small_images == "skip":
                    buckets.skipped[split] += 1
                    continue
                buckets.upscaled += 1
            kept.append(rec)
            index.append(sizes.index(nearest_bucket(h, w, sizes)))
        if split != "train":
            order = sorted(range(len(kept)), key=index.__getitem__)  # sorted() is stable
            kept, index = [kept[i] for i in order], [index[i] for i in order]
        out[split], buckets.index[split] = kept, index
    return out, buckets


def _load_autoencoder(cfg: PrepareConfig, source: Source):
    """The autoencoder (on cfg.device, eval mode)."""
    ae_spec: str | dict = cfg.autoencoder
    if isinstance(ae_spec, str) and ae_spec.split(":")[0] in ("s2d", "space_to_depth"):
        factor = int(ae_spec.split(":")[1]) if ":" in ae_spec else 4
        ae_spec = {"kind": "space_to_depth", "factor": factor, "image_channels": source.channels}
    return load_autoencoder(ae_spec).to(cfg.device).eval()


def _load_text_encoders(cfg: PrepareConfig, source: Source):
    """The text encoder stack on cfg.device (None without encoders); tokens per caption: cfg.max_length, else what the
    source's captions need (the scenes' long synthetic captions), else each encoder's default."""
    from flowmatch.text.encoders import build_text_encoders

    text = build_text_encoders(cfg.text_encoders or None, cfg.max_length if cfg.max_length is not None else source.max_length)
    return text.to(cfg.device) if text is not None else None


def _unfinished_runs(split: str, num_shards: int, done: dict) -> list[tuple[int, int]]:
    """(first, end) of each run of consecutive shards of a split that are not finished."""
    runs, k = [], 0
    while k < num_shards:
        if shard_name(split, k) in done:
            k += 1
            continue
        end = k
        while end < num_shards and shard_name(split, end) not in done:
            end += 1
        runs.append((k, end))
        k = end
    return runs


def _write_shards(run: _Run, autoencoder, text) -> None:
    """Write every unfinished shard (``text``: the encoders whose encodings are stored, or None)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=run.total, desc=f"prepare {run.out}", unit="img", disable=not run.cfg.progress, dynamic_ncols=True)
    bar.update(run.total - run.todo)
    for split in SPLITS:
        for first, end in _unfinished_runs(split, len(run.plan[split]), run.state.done):
            _write_run(run, split, first, end, autoencoder, text, bar)
    bar.close()


def _write_run(run: _Run, split: str, first: int, end: int, autoencoder, text, bar) -> None:
    """Write shards first..end-1 of a split with one ShardWriter: each as NAME.partial, renamed and recorded when complete."""
    import webdataset as wds

    files: dict[str, object] = {}
    pending: dict[str, dict] = {}

    def opener(fname: str):
        files[fname] = open(fname + ".partial", "wb")
        return files[fname]

    def post(fname: str):
        files.pop(fname).close()
        os.replace(fname + ".partial", fname)
        run.state.done[Path(fname).name] = pending.pop(fname)
        run.state.save()

    pattern = str(run.out / f"{split}-%06d.tar")
    # an integer mtime keeps tar headers plain ustar (a float one adds a pax header to every member: 2x slower to read)
    writer = wds.ShardWriter(pattern, maxcount=run.cfg.shard_size, maxsize=float("inf"), start_shard=first, verbose=0, opener=opener,
                             post=post, mtime=int(run.start))
    finished = False
    try:
        for shard in range(first, end):
            pending[str(run.out / shard_name(split, shard))] = _write_shard(run, writer, split, shard, autoencoder, text)
            bar.update(len(run.plan[split][shard]))
        finished = True
    finally:
        if not finished:  # an interrupted shard stays NAME.partial, unrecorded: the next run redoes it
            writer.post = None
        writer.close()  # finishes (and records) the last shard of the run
        for f in files.values():
            f.close()


def _write_shard(run: _Run, writer, split: str, shard: int, autoencoder, text) -> dict:
    """Encode one shard's images (and captions) and write its samples; returns its record (count and latent sums)."""
    cfg, source = run.cfg, run.source
    recs = run.plan[split][shard]
    first = shard * cfg.shard_size
    if run.buckets is None:
        latents = list(_encode_images(autoencoder, source, recs, cfg))
        sizes = [(source.size, source.size)] * len(recs)
    else:
        sizes = [run.buckets.sizes[b] for b in run.buckets.index[split][first : first + len(recs)]]
        latents = _encode_bucketed(autoencoder, source, recs, sizes, cfg)
    encodings = _encode_captions(text, recs, cfg, source) if text is not None else None
    for j, rec in enumerate(recs):
        index = first + j
        meta = {"index": index, "size": list(sizes[j]), "channels": source.channels, "source": rec.source}
        if run.buckets is not None:
            meta["bucket"] = bucket_name(sizes[j])
        if rec.label is not None:
            meta["label"] = rec.label
        if rec.meta:
            meta.update(rec.meta)
        enc = None
        if encodings is not None:
            enc = {which: tuple(None if a is None else a[j] for a in arrays) for which, arrays in encodings.items()}
        writer.write(encode_sample(sample_key(split, index), latents[j], rec.caption, rec.caption_syn, meta, enc))
        run.no_synthetic += not rec.has_synthetic
    run.written[split] += len(recs)
    lat = [z.astype(np.float64) for z in latents]  # (sums work across latent shapes)
    return {"count": len(recs), "sum": float(sum(z.sum() for z in lat)), "sumsq": float(sum((z**2).sum() for z in lat)),
            "numel": int(sum(z.size for z in lat))}


def _finish(run: _Run, manifest: dict, log) -> dict:
    """Print the summary of the run; the manifest with it."""
    summary = {"written": run.written, "skipped_finished": run.total - sum(run.written.values()),
               "no_synthetic_caption": run.no_synthetic, "seconds": round(time.time() - run.start, 1)}
    if run.buckets is not None:
        summary.update(skipped_small=run.buckets.skipped, upscaled_small=run.buckets.upscaled, small_examples=run.buckets.small_examples)
    _print_summary(log, run.out, manifest, summary)
    return {**manifest, "summary": summary}


def _encode_images(autoencoder, source: Source, recs: list[Record], cfg: PrepareConfig) -> np.ndarray:
    return _encode_batches(autoencoder, source.load_images(recs), source.name, cfg)


def _encode_bucketed(autoencoder, source: Source, recs: list[Record], sizes: list[Bucket], cfg: PrepareConfig) -> list[np.ndarray]:
    """Latents of records of several buckets (``sizes``: each record's), in the records' order: each bucket's images are
    encoded together (the autoencoder takes one shape per batch). Images are loaded and fitted one at a time, so a
    shard of large photos never sits in memory at full size."""
    out: list[np.ndarray] = [None] * len(recs)  # type: ignore[list-item]
    for size in dict.fromkeys(sizes):
        members = [j for j, s in enumerate(sizes) if s == size]
        images = np.stack([fit_to_bucket(source.load_native([recs[j]])[0], size) for j in members])
        for j, z in zip(members, _encode_batches(autoencoder, images, source.name, cfg)):
            out[j] = z
    return out


def _encode_batches(autoencoder, images: np.ndarray, source_name: str, cfg: PrepareConfig) -> np.ndarray:
    images = _to_autoencoder_channels(images, autoencoder.image_channels, source_name)
    parts = []
    with torch.inference_mode():
        for lo in range(0, len(images), cfg.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[lo : lo + cfg.batch_size])).to(cfg.device)
            parts.append(autoencoder.encode(x).float().cpu().numpy())
    return np.concatenate(parts).astype(np.float16)


def _encode_captions(text, recs: list[Record], cfg: PrepareConfig, source: Source) -> dict:
    """The encodings of the records' original and synthetic captions. A source that asks for it (the scenes, whose
    "a red circle" recurs in every shard) has each distinct caption of a shard encoded once."""
    captions = [r.caption for r in recs] + [r.caption_syn for r in recs]
    distinct = list(dict.fromkeys(captions)) if source.encode_distinct_captions else captions
    where = {c: i for i, c in enumerate(distinct)}
    take = np.array([where[c] for c in captions], dtype=np.int64) if source.encode_distinct_captions else slice(None)
    batch = cfg.text_batch_size if cfg.text_batch_size is not None else source.text_batch_size
    enc = text.encode_many(distinct, batch_size=batch)
    n = len(recs)
    tokens, mask = enc.tokens.numpy()[take], enc.mask.numpy()[take]
    pooled = None if enc.pooled is None else enc.pooled.numpy()[take]
    return {
        "orig": (tokens[:n], mask[:n], None if pooled is None else pooled[:n]),
        "syn": (tokens[n:], mask[n:], None if pooled is None else pooled[n:]),
    }


def _manifest(run: _Run, autoencoder, text, encode_text) -> dict:
    cfg, source, splits, plan, state = run.cfg, run.source, run.splits, run.plan, run.state
    train = [state.done[shard_name("train", k)] for k in range(len(plan["train"]))]
    count = sum(s["numel"] for s in train)
    if count:
        mean = sum(s["sum"] for s in train) / count
        std = math.sqrt(max(sum(s["sumsq"] for s in train) / count - mean**2, 1e-12))
    else:
        mean, std = 0.0, 1.0
    if cfg.shift is not None or cfg.scale is not None:
        shift, scale, how = cfg.shift or 0.0, cfg.scale or 1.0, "given"
    elif autoencoder.default_shift is not None and autoencoder.default_scale is not None:
        shift, scale, how = autoencoder.default_shift, autoencoder.default_scale, f"{autoencoder.name} config"
    else:
        shift, scale, how = mean, 1.0 / std, "measured on the train split: shift = mean, scale = 1 / std"
    text_info: dict = {"encodings": bool(encode_text), "encoders": [], "pooled_dim": 0, "context_dim": 0, "context_length": 0}
    if text is not None:
        text_info.update(text.describe())
        text_info["encodings"] = bool(encode_text)
    image_size = (source.size, source.size)
    if run.buckets is not None:  # the shape of the bucket with the most training samples (ties: the first)
        train_counts = run.buckets.counts("train")
        image_size = run.buckets.sizes[train_counts.index(max(train_counts))]
    latent_shape = autoencoder.latent_shape(image_size)
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": cfg.source,
        "settings": cfg.fingerprint(),
        "image": {"channels": autoencoder.image_channels, "size": list(image_size)},
        "latent": {"shape": list(latent_shape), "channels": latent_shape[0], "dtype": "float16", "shift": shift, "scale": scale,
                   "normalisation": "(z - shift) * scale", "shift_scale_from": how, "train_mean": mean, "train_std": std},
        "autoencoder": {"name": autoencoder.name, "spec": autoencoder.spec(), "downsample": autoencoder.downsample},
        "text": text_info,
        "captions": {"original": "the source's caption", "synthetic": "the describer's caption (demo) or the source's synthetic caption"},
        "splits": {
            split: {"shards": [shard_name(split, k) for k in range(len(plan[split]))],
                    "counts": [len(r) for r in plan[split]], "samples": len(splits[split])}
            for split in SPLITS
        },
        "shard_size": cfg.shard_size,
        "seed": cfg.seed,
    }
    source_info = source.manifest_entry()
    if source_info is not None:  # a generated source (the scenes): what it drew
        manifest["source_info"] = source_info
    if run.buckets is not None:
        b = run.buckets
        manifest["buckets"] = {
            "names": [bucket_name(s) for s in b.sizes], "sizes": [list(s) for s in b.sizes], "latent_sizes": b.latent_sizes(autoencoder),
            "counts": {split: b.counts(split) for split in SPLITS}, "target_pixels": b.target_pixels,
            "small_images": cfg.small_images, "skipped_small": dict(b.skipped),
        }
    return manifest


def _print_summary(log, out: Path, manifest: dict, summary: dict) -> None:
    rows = [f"{'split':<6} {'shards':>6} {'samples':>8}"]
    for split in SPLITS:
        s = manifest["splits"][split]
        rows.append(f"{split:<6} {len(s['shards']):>6} {s['samples']:>8}")
    lat = manifest["latent"]
    text = manifest["text"]
    log("\n".join(rows))
    log(f"latents {tuple(lat['shape'])} float16 from {manifest['autoencoder']['name']}; normalisation (z - {lat['shift']:.4f}) * {lat['scale']:.4f}")
    if text["encoders"]:
        names = ", ".join(e["name"] for e in text["encoders"])
        log(f"text: {names} -> pooled {text['pooled_dim']}, tokens {text['context_length']} x {text['context_dim']}" + ("" if text["encodings"] else " (not stored: encoded while training)"))
    done = summary["written"]
    log(f"wrote {sum(done.values())} samples, skipped {summary['skipped_finished']} already written, in {summary['seconds']} s -> {out / MANIFEST_NAME}")
    if "buckets" in manifest:
        b = manifest["buckets"]
        log("buckets " + ", ".join(f"{name} ({n})" for name, n in zip(b["names"], b["counts"]["train"])) + " train samples")
    small = summary.get("small_examples")
    if small:
        what = (f"skipped {sum(summary['skipped_small'].values())} images smaller than every bucket" if not summary.get("upscaled_small")
                else f"upscaled {summary['upscaled_small']} images smaller than every bucket")
        log(f"{what}, e.g. {', '.join(small)}")
    if summary["no_synthetic_caption"]:
        log(f"note: {summary['no_synthetic_caption']} samples had no synthetic caption; their original caption stands in for it")


__all__ = ["PrepareConfig", "PrepareError", "SourceError", "prepare_once", "prepare_shards"]
