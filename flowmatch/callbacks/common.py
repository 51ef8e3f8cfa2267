"""Helpers the sample callbacks share: reference data from the data module and model samples."""

import torch

from flowmatch.sampling import SOLVERS, SamplerConfig


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
