"""Drawing couplings from a trained flow: fresh noise eps, integrated from t = 1 to t = 0 (docs/spec.md §5).

``generate_couplings(model, out, num_pairs, ...)`` writes the pairs (eps, Z_0(eps)) (and the class
label, or for a text-to-image model the caption and its stored encodings, each was generated with) as
coupling shards (flowmatch.reflow.format). A text model's conditions are captions of its training split
(flowmatch.reflow.captions.TrainingCaptions: SD3's original / synthetic mixing, seeded), and guidance
uses the network's own null condition for the unconditional pass. What the model takes is what its
network declares (``net.conditioning``, flowmatch.networks.conditioning), checked against the captions
with the same function that checks a network against any data. The run is atomic and resumable:

* everything is written into ``OUT.partial/``; only when every shard and the manifest are on disk is
  it renamed to ``OUT`` (a finished set is never half-written; ``overwrite`` replaces an old one;
  flowmatch.reflow.run_dir);
* shard i's noise (and uniform labels) come from a generator seeded by (seed, i) alone, pair j's
  caption from (seed, j) alone, and a shard
  file appears under its final name only once complete, so a run that was interrupted continues
  with the next missing shard when started again with the same settings (``OUT.partial/settings.json``
  holds them; a run with other settings refuses to mix into it).

Fixed-step solvers give the same pairs whatever the batch size. dopri5 chooses its steps from the
error of the whole batch, so its pairs depend (within the tolerance) on ``batch_size`` too, which is
therefore part of the settings.

The steps: check the request (:func:`plan_couplings`), draw each missing shard's inputs
(:func:`shard_inputs`), integrate them (:func:`_integrate`), write the shard, then the manifest
(:func:`_manifest`) and publish the directory.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from flowmatch.networks.conditioning import ConditioningMismatchError, ConditioningSpec, fit_problems
from flowmatch.reflow.captions import TrainingCaptions
from flowmatch.reflow.format import DTYPE, CouplingRecord, shard_name, write_shard
from flowmatch.reflow.run_dir import CouplingRunError, open_partial, publish, record_progress
from flowmatch.sampling import SamplerConfig

__all__ = ["CouplingRunError", "CouplingPlan", "generate_couplings", "model_conditioning", "model_is_text_conditioned", "plan_couplings"]

LabelSpec = str | Sequence[int] | np.ndarray


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


# --- what the model takes ---------------------------------------------------------------------------------------
def model_conditioning(model) -> ConditioningSpec:
    """The condition the model's network declares (class labels, text, or none)."""
    return model.net.conditioning


def model_is_text_conditioned(model) -> bool:
    """Does the model take a text conditioning dict ({"pooled", "tokens", "mask"})? True for a network that declares
    text, and for an unconditional network of a model that records latent/caption training data (its pairs still
    record the captions of that data)."""
    spec = model_conditioning(model)
    if spec.kind != "none":
        return spec.is_text
    info = getattr(model, "data_info", None)  # the objective's record of its data (None before it trained on shards)
    return isinstance(info, dict) and bool(info.get("text_encoders"))


def _check_captions_fit(spec: ConditioningSpec, captions: TrainingCaptions) -> None:
    problems = fit_problems(spec, captions.conditioning, "the captions' text encoder")
    if problems:
        raise ConditioningMismatchError(f"the captions of {captions.location} do not fit the model: " + "; ".join(problems))


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


# --- step 1: the checked request ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CouplingPlan:
    """A checked request: what to draw and how. ``kind`` is how the conditions are drawn: "captions" (a text
    model), or for labels "none", "uniform", "list", "array" (``label_value``: what the manifest records of them)."""

    num_pairs: int
    shape: tuple[int, ...]
    sampler: SamplerConfig
    seed: int
    batch_size: int
    kind: str
    label_value: Any
    labels: LabelSpec
    num_classes: int
    captions: TrainingCaptions | None
    shard_size: int
    record_size: int
    source: dict[str, Any]

    @property
    def text(self) -> bool:
        return self.kind == "captions"

    @property
    def num_shards(self) -> int:
        return (self.num_pairs + self.shard_size - 1) // self.shard_size

    def shard_range(self, shard: int) -> tuple[int, int]:
        """(index of the shard's first pair, its number of pairs)."""
        first = shard * self.shard_size
        return first, min(self.shard_size, self.num_pairs - first)

    def sampler_info(self) -> dict[str, Any]:
        s = self.sampler
        return {"name": s.name, "solver": s.solver, "steps": s.steps, "shift": s.shift, "grid": s.grid, "rtol": s.rtol, "atol": s.atol}

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the unfinished one (OUT.partial/settings.json)."""
        return {"num_pairs": self.num_pairs, "sample_shape": list(self.shape), "sampler": self.sampler_info(), "guidance": self.sampler.guidance,
                "seed": self.seed, "labels": self.kind, "label_values": self.label_value, "num_classes": self.num_classes,
                "captions": self.captions.describe() if self.text else None,
                "shard_size": self.shard_size, "record_size": self.record_size,
                "batch_size": self.batch_size if self.sampler.solver == "dopri5" else None,
                "source_checkpoint": self.source.get("source_checkpoint"), "weights": self.source.get("weights"),
                "checkpoint_stamp": self.source.get("checkpoint_stamp")}


def plan_couplings(model, num_pairs: int, sampler: SamplerConfig, seed: int = 0, batch_size: int = 4096, labels: LabelSpec = "auto",
                   shard_size: int | None = None, record_size: int | None = None, source: dict[str, Any] | None = None,
                   captions: TrainingCaptions | None = None) -> CouplingPlan:
    """Check a request against the model (its sample shape and the condition its network declares); raise ValueError
    (ConditioningMismatchError for captions that do not fit the network) naming what is wrong."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape = tuple(model.sample_shape or ())
    if not shape:
        raise ValueError("the model does not know its sample shape (a checkpoint of `python -m flowmatch fit` does)")
    spec = model_conditioning(model)
    kind, label_value = _conditions_kind(model, spec, labels, captions)
    if kind == "array" and np.asarray(labels).size < num_pairs:
        raise ValueError(f"labels: an array of {np.asarray(labels).size} labels for {num_pairs} pairs (one per pair is needed)")
    _check_guidance(model, spec, sampler, kind)
    record_size = int(record_size or default_record_size(shape))
    shard_size = int(shard_size or default_shard_size(shape, record_size))
    if record_size < 1 or shard_size < 1:
        raise ValueError(f"record_size and shard_size must be >= 1, got {record_size} and {shard_size}")
    return CouplingPlan(int(num_pairs), shape, sampler, int(seed), int(batch_size), kind, label_value, labels, spec.num_classes,
                        captions, shard_size, record_size, dict(source or {}))


def _conditions_kind(model, spec: ConditioningSpec, labels: LabelSpec, captions: TrainingCaptions | None) -> tuple[str, Any]:
    """How the pairs' conditions are drawn: "captions" for a text model (whose captions must fit its network), else the labels'."""
    if model_is_text_conditioned(model):
        if captions is None:
            raise ValueError("the model is text-conditioned: its couplings need captions (captions=TrainingCaptions(shards of its "
                             "training data); the command takes them from the data the checkpoint records, or --data)")
        if not (isinstance(labels, str) and labels == "auto"):
            raise ValueError(f"labels={labels!r}: the model is text-conditioned, its pairs are conditioned on captions, not labels")
        _check_captions_fit(spec, captions)
        return "captions", None
    if captions is not None:
        raise ValueError("captions were given but the model is not text-conditioned (it takes "
                         f"{'class labels' if spec.num_classes else 'no condition'})")
    return _label_description(labels, spec.num_classes)


def _check_guidance(model, spec: ConditioningSpec, sampler: SamplerConfig, kind: str) -> None:
    """Guidance needs a condition and the network's null counterpart of it (the null class, or the null text condition)."""
    if sampler.guidance == 1.0:
        return
    if kind != "captions" and (kind == "none" or spec.kind != "labels"):
        raise ValueError(f"guidance {sampler.guidance:g} needs class labels and a network with a null class (labels={kind!r}, "
                         f"num_classes={spec.num_classes}); use guidance 1 for an unconditional draw")
    if kind == "captions" and not spec.is_text:
        raise ValueError(f"guidance {sampler.guidance:g} needs a network with a null text condition ({type(model.net).__name__} has none)")


# --- steps 2 to 4: a shard's inputs, its samples, its records ---------------------------------------------------------
@dataclass
class ShardInputs:
    """A shard's noise and conditions: labels (int64) or the text dict as the model takes it, plus for text the
    stored encodings as written (``text_np``), the captions and their sources."""

    noise: torch.Tensor
    cond: torch.Tensor | dict[str, torch.Tensor] | None
    text_np: dict[str, np.ndarray] | None = None
    captions: list[str] | None = None
    sources: list[str] | None = None


def _noise_and_labels(shard: int, first: int, n: int, plan: CouplingPlan, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The shard's noise, then (from the same generator) its labels: both depend on (seed, shard) alone."""
    gen = torch.Generator().manual_seed(_shard_seed(plan.seed, shard))
    noise = torch.randn((n, *plan.shape), generator=gen, dtype=torch.float32)
    if kind == "none":
        return noise, None
    if kind == "uniform":
        return noise, torch.randint(0, plan.num_classes, (n,), generator=gen, dtype=torch.int64)
    arr = np.asarray(plan.labels, dtype=np.int64)
    if kind == "array":  # one label per pair
        if arr.size < first + n:
            raise ValueError(f"labels: {arr.size} given, {first + n} pairs need one each")
        return noise, torch.from_numpy(arr[first : first + n].copy())
    return noise, torch.from_numpy(arr[np.arange(first, first + n) % arr.size])  # a list, cycled over the pairs


def shard_inputs(plan: CouplingPlan, shard: int) -> ShardInputs:
    """Shard ``shard``'s noise and conditions (pair j's caption depends on (seed, j) alone)."""
    first, n = plan.shard_range(shard)
    if not plan.text:
        return ShardInputs(*_noise_and_labels(shard, first, n, plan, plan.kind))
    noise, _ = _noise_and_labels(shard, first, n, plan, "none")
    text_np, captions, sources = plan.captions.conditions(first, n, plan.seed)
    cond = {k: torch.from_numpy(v) if v.dtype == bool else torch.from_numpy(v).float() for k, v in text_np.items()}
    return ShardInputs(noise, cond, text_np, captions, sources)


def _rows(cond, lo: int, size: int, device):
    """Rows lo .. lo + size of a condition (labels, text dict or None), on the model's device."""
    if isinstance(cond, dict):
        return {k: v[lo : lo + size].to(device) for k, v in cond.items()}
    return None if cond is None else cond[lo : lo + size].to(device)


def _integrate(model, plan: CouplingPlan, inputs: ShardInputs, shard: int, bar) -> tuple[np.ndarray, list[int]]:
    """The shard's samples (float32, on the CPU) integrated in batches of ``batch_size``, and each batch's NFE."""
    noise, size = inputs.noise, plan.batch_size
    n = noise.shape[0]
    samples, nfes = [], []
    for lo in range(0, n, size):
        x, nfe = model.generate(min(size, n - lo), plan.sampler, cond=_rows(inputs.cond, lo, size, model.device), noise=noise[lo : lo + size])
        x = x.float().cpu()
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"the model produced non-finite samples in shard {shard} ({plan.sampler.name}); "
                                     f"check the checkpoint {plan.source.get('source_checkpoint')} and the solver settings")
        samples.append(x)
        nfes.append(int(nfe))
        bar.update(x.shape[0])
    return torch.cat(samples).numpy(), nfes


def _records(plan: CouplingPlan, first: int, inputs: ShardInputs, sample: np.ndarray) -> Iterator[CouplingRecord]:
    """The shard's pairs as tar records of ``record_size`` pairs."""
    noise, r = inputs.noise.numpy(), plan.record_size
    if inputs.text_np is not None:
        text, caps, srcs = inputs.text_np, inputs.captions, inputs.sources
        return (CouplingRecord(first + lo, noise[lo : lo + r], sample[lo : lo + r], {k: v[lo : lo + r] for k, v in text.items()},
                               caps[lo : lo + r], srcs[lo : lo + r]) for lo in range(0, len(noise), r))
    labels = None if inputs.cond is None else inputs.cond.numpy()
    return (CouplingRecord(first + lo, noise[lo : lo + r], sample[lo : lo + r], None if labels is None else labels[lo : lo + r])
            for lo in range(0, len(noise), r))


def _draw_missing_shards(model, plan: CouplingPlan, partial: Path, done: list[dict[str, Any]], progress: bool) -> None:
    """Draw and write every shard not yet in ``done`` (appending each to it and to the run's progress file)."""
    done_names = {s["name"] for s in done}
    bar = tqdm(total=plan.num_pairs, initial=sum(s["count"] for s in done), unit="pair", desc=f"reflow {plan.sampler.name}",
               disable=None if progress else True, dynamic_ncols=True)
    try:
        for shard in range(plan.num_shards):
            name = shard_name(shard)
            if name in done_names:
                continue
            inputs = shard_inputs(plan, shard)
            sample, nfes = _integrate(model, plan, inputs, shard, bar)
            count = write_shard(partial / name, _records(plan, plan.shard_range(shard)[0], inputs, sample))
            done.append({"name": name, "count": count, "nfe_sum": sum(nfes), "batches": len(nfes), "nfe_max": max(nfes)})
            record_progress(partial, done)
    finally:
        bar.close()


# --- step 5: the manifest ---------------------------------------------------------------------------------------------
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


def _manifest(model, plan: CouplingPlan, done: list[dict[str, Any]], start: float) -> dict[str, Any]:
    """The coupling set's manifest (flowmatch.reflow.format) from the plan and the shards written."""
    done.sort(key=lambda s: s["name"])
    batches = sum(s["batches"] for s in done)
    kind = plan.kind
    return {
        "count": plan.num_pairs,
        "noise_shape": list(plan.shape),
        "sample_shape": list(plan.shape),
        "dtype": np.dtype(DTYPE).name,
        "conditional": kind != "none",
        "condition": "text" if plan.text else ("none" if kind == "none" else "label"),
        "num_classes": plan.num_classes,
        "labels": kind,
        "label_values": plan.label_value,
        "guidance": plan.sampler.guidance,
        "sampler": plan.sampler_info(),
        "nfe": sum(s["nfe_sum"] for s in done) / max(batches, 1),
        "nfe_max": max((s["nfe_max"] for s in done), default=0),
        "seed": plan.seed,
        "batch_size": plan.batch_size,
        "record_size": plan.record_size,
        "shard_size": plan.shard_size,
        "shards": [{"name": s["name"], "count": s["count"]} for s in done],
        **({"text": plan.captions.describe(), "data": _data_facts(model, plan.captions)} if plan.text else {}),
        **{k: v for k, v in plan.source.items() if k != "checkpoint_stamp"},
        "seconds": round(time.time() - start, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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
    plan = plan_couplings(model, num_pairs, sampler or SamplerConfig(solver="dopri5"), seed, batch_size, labels, shard_size, record_size,
                          source, captions)
    out = Path(out)
    partial, done = open_partial(out, plan.settings(), overwrite)
    start = time.time()
    _draw_missing_shards(model, plan, partial, done, progress)
    manifest = _manifest(model, plan, done, start)
    publish(partial, out, manifest)
    manifest["directory"] = str(out)
    return manifest
