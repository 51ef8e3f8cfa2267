"""Helpers the sample callbacks share: reference data from the data module and model samples."""

import dataclasses
from contextlib import nullcontext

import torch

from flowmatch.sampling import ADAPTIVE_SOLVERS, SOLVERS, SamplerConfig


def parse_samplers(specs: list[str] | list[SamplerConfig]) -> list[SamplerConfig]:
    """"euler8", "heun4", "dopri5", "euler25:cfg=3" -> SamplerConfig (a compact spelling for configs)."""
    out = []
    for spec in specs:
        if isinstance(spec, SamplerConfig):
            out.append(spec)
            continue
        head, *opts = str(spec).split(":")
        solver = next((name for name in sorted(SOLVERS, key=len, reverse=True) if head.startswith(name)), None)
        if solver is None or not head[len(solver):].isdigit() and head[len(solver):] != "":
            raise ValueError(f"sampler spec {spec!r}: expected SOLVER[STEPS][:cfg=W][:shift=A][:grid=sd3], solvers {sorted(SOLVERS)}")
        steps = int(head[len(solver):]) if head[len(solver):] and solver != "dopri5" else 25
        kwargs = {"solver": solver, "steps": steps}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key not in ("cfg", "shift", "grid"):
                raise ValueError(f"sampler spec {spec!r}: unknown option {key!r} (use cfg=, shift=, grid=)")
            kwargs["guidance" if key == "cfg" else key] = value if key == "grid" else float(value)
        out.append(SamplerConfig(**kwargs))
    return out


def sampling_precision(trainer, sampler: SamplerConfig):
    """The context a callback samples in: the run's precision (bf16 autocast in a bf16-mixed run, as its training
    and validation steps) for fixed-step solvers, float32 for adaptive ones, whose error control bf16 rounding
    defeats (dopri5 with guidance on the main job: 796 network passes a sample under autocast, 364 in float32)."""
    if trainer is None or sampler.solver in ADAPTIVE_SOLVERS:
        return nullcontext()
    return trainer.precision_plugin.forward_context()


def reference_batch(trainer, num: int, stage: str):
    """Held-out points (and labels) from the data module, for the stage's split."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "reference_samples"):
        raise RuntimeError("sample metrics need a data module with reference_samples(n, split)")
    split = "test" if stage == "test" else "val"
    x, labels = dm.reference_samples(num, split=split, return_labels=True)
    return x, labels if dm.conditioning.kind == "labels" else None


def generate(pl_module, num: int, sampler: SamplerConfig, cond, seed: int) -> tuple[torch.Tensor, int]:
    if cond is not None:
        cond = cond.to(pl_module.device)
    x, nfe = pl_module.generate(num, sampler, cond=cond, seed=seed)
    return x.float().cpu(), nfe


def generate_as_trained(pl_module, num: int, sampler: SamplerConfig, cond, seed: int, shape) -> tuple[torch.Tensor, int]:
    """A callback's samples at ``shape``: the model's training time shift at that size unless the spec sets one
    (flowmatch.time_shift.sampling_shift, as `sample` does), in the run's sampling precision (:func:`sampling_precision`)."""
    from flowmatch.time_shift import sampling_shift

    if sampler.shift == 1.0 and getattr(pl_module, "time_shift", None) is not None:
        sampler = dataclasses.replace(sampler, shift=sampling_shift(pl_module.time_shift, shape))
    with sampling_precision(pl_module.trainer, sampler):
        return pl_module.generate(num, sampler, cond=cond, seed=seed, shape=shape)
