"""Drawing couplings from a trained flow: fresh noise eps, integrated from t = 1 to t = 0 (SPEC §5).

``generate_couplings(model, out, num_pairs, ...)`` writes the pairs (eps, Z_0(eps)) (and the class
label, or for a text-to-image model the caption and its stored encodings, each was generated with) as
coupling shards (flowmatch.reflow.format). A text model's conditions are captions of its training split
(flowmatch.reflow.captions.TrainingCaptions: SD3's original / synthetic mixing, seeded), and guidance
uses the network's own null condition for the unconditional pass. The run is atomic and resumable:

* everything is written into ``OUT.partial/``; only when every shard and the manifest are on disk is
  it renamed to ``OUT`` (a finished set is never half-written; ``overwrite`` replaces an old one);
* shard i's noise (and uniform labels) come from a generator seeded by (seed, i) alone, pair j's
  caption from (seed, j) alone, and a shard
  file appears under its final name only once complete, so a run that was interrupted continues
  with the next missing shard when started again with the same settings (``OUT.partial/settings.json``
  holds them; a run with other settings refuses to mix into it).

Fixed-step solvers give the same pairs whatever the batch size. dopri5 chooses its steps from the
error of the whole batch, so its pairs depend (within the tolerance) on ``batch_size`` too, which is
therefore part of the settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from flowmatch.atomic_io import fsync_dir
from tqdm.auto import tqdm

from flowmatch.reflow.captions import TrainingCaptions
from flowmatch.reflow.format import (
    DTYPE,
    CouplingRecord,
    shard_name,
    write_manifest,
    write_shard,
)
from flowmatch.sampling import SamplerConfig

SETTINGS_NAME = "settings.json"
PROGRESS_NAME = "progress.json"
LabelSpec = str | Sequence[int] | np.ndarray


class CouplingRunError(RuntimeError):
    """The output directory or an unfinished run's state is in the way (names it and what to do)."""


def _shard_seed(seed: int, shard: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(shard)]).generate_state(1)[0])


def default_record_size(sample_shape: Sequence[int], target_bytes: int = 64 * 1024) -> int:
    """Pairs per tar record: about 64 KiB of payload (4096 pairs of 2-D points, 8 pairs of 16x8x8 latents)."""
    pair_bytes = 2 * int(np.prod(sample_shape, dtype=np.int64)) * np.dtype(DTYPE).itemsize
    return int(max(1, min(4096, target_bytes // max(pair_bytes, 1))))


def default_shard_size(sample_shape: Sequence[int], record_size: int, target_bytes: int = 256 * 1024 * 1024) -> int:
    """Pairs per shard file: about 256 MiB, a whole number of records."""
    pair_bytes = 2 * int(np.prod(sample_shape, dtype=np.int64)) * np.dtype(DTYPE).itemsize
    records = max(1, target_bytes // max(pair_bytes * record_size, 1))
    return int(records * record_size)


def model_num_classes(model) -> int:
    return int(getattr(model.net, "num_classes", 0) or 0)


def model_is_text_conditioned(model) -> bool:
    """Does the model take a text conditioning dict ({"pooled", "tokens", "mask"})? True for a network with text
    widths (pooled_dim / context_dim) and no classes, or a model that records latent/caption training data."""
    net = model.net
    if model_num_classes(model) > 0:
        return False
    if int(getattr(net, "pooled_dim", 0) or 0) > 0 or int(getattr(net, "context_dim", 0) or 0) > 0:
        return True
    info = getattr(model, "data_info", None)
    return isinstance(info, dict) and bool(info.get("text_encoders"))


def _check_text_fits(model, captions: TrainingCaptions) -> None:
    net = model.net
    problems = [f"the network's {attr} is {getattr(net, attr)} but the captions' encodings have {have}"
                for attr, have in (("pooled_dim", captions.pooled_dim), ("context_dim", captions.context_dim))
                if isinstance(getattr(net, attr, None), int) and getattr(net, attr) and getattr(net, attr) != have]
    if problems:
        raise ValueError(f"the captions of {captions.location} do not fit the model: " + "; ".join(problems))


def _label_description(labels: LabelSpec, num_classes: int) -> tuple[str, Any]:
    """(kind, value for the manifest / settings): 'none', 'uniform', 'list' [ints], 'array' {sha256, ...}."""
    if isinstance(labels, str):
        kind = labels
        if kind == "auto":
            kind = "uniform" if num_classes > 0 else "none"
        if kind not in ("none", "uniform"):
            raise ValueError(f"labels must be 'auto', 'uniform', 'none', a list of class labels or an array of them, got {labels!r}")
        if kind == "uniform" and num_classes <= 0:
            raise ValueError("labels='uniform' needs a class-conditional model, but this one has no classes (num_classes = 0)")
        return kind, None
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D sequence of integers, got shape {arr.shape} dtype {arr.dtype}")
    if num_classes <= 0:
        raise ValueError("labels were given but the model is not class-conditional (num_classes = 0)")
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise ValueError(f"labels {sorted(set(bad.tolist()))[:5]} out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    if isinstance(labels, np.ndarray):
        return "array", {"length": int(arr.size), "sha256": hashlib.sha256(arr.astype(np.int64).tobytes()).hexdigest()}
    return "list", [int(v) for v in arr]


def _shard_inputs(shard: int, first: int, n: int, shape: tuple[int, ...], seed: int, kind: str,
                  labels: LabelSpec, num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(_shard_seed(seed, shard))
    noise = torch.randn((n, *shape), generator=gen, dtype=torch.float32)
    if kind == "none":
        return noise, None
    if kind == "uniform":
        return noise, torch.randint(0, num_classes, (n,), generator=gen, dtype=torch.int64)
    arr = np.asarray(labels, dtype=np.int64)
    if kind == "array":  # one label per pair
        if arr.size < first + n:
            raise ValueError(f"labels: {arr.size} given, {first + n} pairs need one each")
        return noise, torch.from_numpy(arr[first : first + n].copy())
    return noise, torch.from_numpy(arr[np.arange(first, first + n) % arr.size])  # a list, cycled over the pairs


def _data_facts(model, captions: TrainingCaptions) -> dict[str, Any] | None:
    """The latent/caption data facts (flowmatch.data.latent_info) that train and evaluate the next flow: the
    model's own record (with the captions' shard set as its manifest), else those of the captions' shard set."""
    info = getattr(model, "data_info", None)
    if isinstance(info, dict):
        location = captions.location
        return {**info, "manifest": location if "://" in location else str(Path(location).resolve())}  # where the captions were read
    from flowmatch.data.latent_info import read_info

    try:
        return read_info(captions.location)
    except Exception:  # noqa: BLE001 - the pairs are still valid without these facts
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prepare_partial(out: Path, settings: dict[str, Any], overwrite: bool) -> tuple[Path, list[dict[str, Any]]]:
    """Create or reopen OUT.partial/; returns it and the shards already complete in it."""
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not overwrite:
        raise CouplingRunError(f"{out} already exists; pass --overwrite to replace it (or choose another --out)")
    if partial.exists():
        old = _read_json(partial / SETTINGS_NAME)
        if old != settings:
            if not overwrite:
                diff = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != settings.get(k))
                raise CouplingRunError(f"{partial} holds an unfinished run with other settings (differs in {diff}); "
                                       "run with the same settings to finish it, or pass --overwrite to start afresh")
            shutil.rmtree(partial)
    if not partial.exists():
        partial.mkdir(parents=True)
        _write_json(partial / SETTINGS_NAME, settings)
        _write_json(partial / PROGRESS_NAME, [])
    done = _read_json(partial / PROGRESS_NAME) or []
    done = [s for s in done if (partial / s["name"]).is_file()]
    return partial, done


@torch.no_grad()
def generate_couplings(
    model,
    out: str | Path,
    num_pairs: int,
    sampler: SamplerConfig | None = None,
    seed: int = 0,
    batch_size: int = 4096,
    labels: LabelSpec = "auto",
    shard_size: int | None = None,
    record_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    captions: TrainingCaptions | None = None,
) -> dict[str, Any]:
    """Integrate ``num_pairs`` fresh noises through ``model`` (a FlowObjective) and write the couplings to ``out``.

    Args:
        model: the trained objective (eval mode; on the device to sample on).
        out: the coupling directory to create.
        num_pairs: number of (noise, sample) pairs.
        sampler: solver, steps, tolerances and guidance (default dopri5).
        seed: seed of the noise (and of uniformly drawn labels); shard i uses (seed, i).
        batch_size: pairs integrated at once.
        labels: for a class-conditional model: "auto" (= "uniform" when the model has classes, else
            "none"), "uniform" (each pair's label uniform over the classes), "none" (unconditional:
            the null class), a list of labels cycled over the pairs, or a numpy array with one label per pair.
        shard_size / record_size: pairs per shard file / per tar record (defaults: ~256 MiB / ~64 KiB).
        overwrite: replace an existing ``out`` (and discard an unfinished run with other settings).
        progress: show a progress bar (on a terminal).
        source: facts about the model for the manifest (source_checkpoint, weights, rectified, ...).
        captions: for a text-conditioned model (required there): the captions whose stored encodings condition
            the pairs (usually the model's training split); pair i's caption depends on (seed, i) only.

    Returns the manifest (also written to ``out/manifest.json``).
    """
    sampler = sampler or SamplerConfig(solver="dopri5")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape = tuple(model.sample_shape or ())
    if not shape:
        raise ValueError("the model does not know its sample shape (a checkpoint of `python -m flowmatch fit` does)")
    num_classes = model_num_classes(model)
    text = model_is_text_conditioned(model)
    if text:
        if captions is None:
            raise ValueError("the model is text-conditioned: its couplings need captions (captions=TrainingCaptions(shards of its "
                             "training data); the command takes them from the data the checkpoint records, or --data)")
        if not (isinstance(labels, str) and labels == "auto"):
            raise ValueError(f"labels={labels!r}: the model is text-conditioned, its pairs are conditioned on captions, not labels")
        _check_text_fits(model, captions)
        kind, label_value = "captions", None
    elif captions is not None:
        raise ValueError("captions were given but the model is not text-conditioned (it takes "
                         f"{'class labels' if num_classes else 'no condition'})")
    else:
        kind, label_value = _label_description(labels, num_classes)
    if kind == "array" and np.asarray(labels).size < num_pairs:
        raise ValueError(f"labels: an array of {np.asarray(labels).size} labels for {num_pairs} pairs (one per pair is needed)")
    if sampler.guidance != 1.0 and not text and (kind == "none" or model.null_condition(torch.zeros(1, dtype=torch.long)) is None):
        raise ValueError(f"guidance {sampler.guidance:g} needs class labels and a network with a null class (labels={kind!r}, "
                         f"num_classes={num_classes}); use guidance 1 for an unconditional draw")
    if sampler.guidance != 1.0 and text and not hasattr(model.net, "null_condition"):
        raise ValueError(f"guidance {sampler.guidance:g} needs a network with a null text condition ({type(model.net).__name__} has none)")
    record_size = int(record_size or default_record_size(shape))
    shard_size = int(shard_size or default_shard_size(shape, record_size))
    if record_size < 1 or shard_size < 1:
        raise ValueError(f"record_size and shard_size must be >= 1, got {record_size} and {shard_size}")
    source = dict(source or {})
    out = Path(out)
    sampler_info = {"name": sampler.name, "solver": sampler.solver, "steps": sampler.steps, "shift": sampler.shift,
                    "grid": sampler.grid, "rtol": sampler.rtol, "atol": sampler.atol}
    settings = {"num_pairs": int(num_pairs), "sample_shape": list(shape), "sampler": sampler_info, "guidance": sampler.guidance,
                "seed": int(seed), "labels": kind, "label_values": label_value, "num_classes": num_classes,
                "captions": captions.describe() if text else None,
                "shard_size": shard_size, "record_size": record_size,
                "batch_size": int(batch_size) if sampler.solver == "dopri5" else None,
                "source_checkpoint": source.get("source_checkpoint"), "weights": source.get("weights"),
                "checkpoint_stamp": source.get("checkpoint_stamp")}
    partial, done = _prepare_partial(out, settings, overwrite)
    done_names = {s["name"] for s in done}
    num_shards = (num_pairs + shard_size - 1) // shard_size
    start = time.time()
    bar = tqdm(total=num_pairs, initial=sum(s["count"] for s in done), unit="pair", desc=f"reflow {sampler.name}",
               disable=None if progress else True, dynamic_ncols=True)
    try:
        for shard in range(num_shards):
            name = shard_name(shard)
            if name in done_names:
                continue
            first = shard * shard_size
            n = min(shard_size, num_pairs - first)
            texts = None
            if text:
                noise, _ = _shard_inputs(shard, first, n, shape, seed, "none", labels, num_classes)
                cond_np, caps, srcs = captions.conditions(first, n, seed)
                texts = (cond_np, caps, srcs)
                cond = {k: torch.from_numpy(v) if v.dtype == bool else torch.from_numpy(v).float() for k, v in cond_np.items()}
            else:
                noise, cond = _shard_inputs(shard, first, n, shape, seed, kind, labels, num_classes)
            samples, nfes = [], []
            for lo in range(0, n, batch_size):
                if isinstance(cond, dict):
                    chunk_cond = {k: v[lo : lo + batch_size].to(model.device) for k, v in cond.items()}
                else:
                    chunk_cond = None if cond is None else cond[lo : lo + batch_size].to(model.device)
                x, nfe = model.generate(min(batch_size, n - lo), sampler, cond=chunk_cond, noise=noise[lo : lo + batch_size])
                x = x.float().cpu()
                if not torch.isfinite(x).all():
                    raise FloatingPointError(f"the model produced non-finite samples in shard {shard} ({sampler.name}); "
                                             f"check the checkpoint {source.get('source_checkpoint')} and the solver settings")
                samples.append(x)
                nfes.append(int(nfe))
                bar.update(x.shape[0])
            sample = torch.cat(samples).numpy()
            noise_np = noise.numpy()
            if texts is not None:
                cond_np, caps, srcs = texts
                records = (CouplingRecord(first + lo, noise_np[lo : lo + record_size], sample[lo : lo + record_size],
                                          {k: v[lo : lo + record_size] for k, v in cond_np.items()},
                                          caps[lo : lo + record_size], srcs[lo : lo + record_size]) for lo in range(0, n, record_size))
            else:
                cond_np = None if cond is None else cond.numpy()
                records = (CouplingRecord(first + lo, noise_np[lo : lo + record_size], sample[lo : lo + record_size],
                                          None if cond_np is None else cond_np[lo : lo + record_size]) for lo in range(0, n, record_size))
            count = write_shard(partial / name, records)
            done.append({"name": name, "count": count, "nfe_sum": sum(nfes), "batches": len(nfes), "nfe_max": max(nfes)})
            _write_json(partial / PROGRESS_NAME, done)
    finally:
        bar.close()
    done.sort(key=lambda s: s["name"])
    batches = sum(s["batches"] for s in done)
    manifest = {
        "count": int(num_pairs),
        "noise_shape": list(shape),
        "sample_shape": list(shape),
        "dtype": np.dtype(DTYPE).name,
        "conditional": kind != "none",
        "condition": "text" if text else ("none" if kind == "none" else "label"),
        "num_classes": num_classes,
        "labels": kind,
        "label_values": label_value,
        "guidance": sampler.guidance,
        "sampler": sampler_info,
        "nfe": sum(s["nfe_sum"] for s in done) / max(batches, 1),
        "nfe_max": max((s["nfe_max"] for s in done), default=0),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "record_size": record_size,
        "shard_size": shard_size,
        "shards": [{"name": s["name"], "count": s["count"]} for s in done],
        **({"text": captions.describe(), "data": _data_facts(model, captions)} if text else {}),
        **{k: v for k, v in source.items() if k != "checkpoint_stamp"},
        "seconds": round(time.time() - start, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for name in (SETTINGS_NAME, PROGRESS_NAME):
        (partial / name).unlink(missing_ok=True)
    write_manifest(partial, manifest)
    if out.exists():  # overwrite: the old set goes only once the new one is complete
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)
    fsync_dir(out.parent)
    manifest["directory"] = str(out)
    return manifest
