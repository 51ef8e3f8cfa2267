"""Reflow (Rectified Flow, Liu et al. 2022; SPEC §5): couplings drawn from a trained flow, and training on them.

- flowmatch.reflow.format: the coupling shard format (webdataset tars of (noise, sample, label) + manifest.json)
- flowmatch.reflow.couplings: ``generate_couplings`` integrates fresh noise through a model into a coupling set
- flowmatch.reflow.datamodule: ``CouplingDataModule`` serves the pairs as ``{"x0", "eps", "cond"}`` batches

``python -m flowmatch reflow --ckpt CKPT --num-pairs N --out DIR`` draws a set; a k-rectified flow is
then a RectifiedFlow fitted on it (experiments/toy2d_reflow.yaml), a one-step student an
OneStepDistillation (flowmatch.objectives.distillation, experiments/toy2d_distill.yaml).
"""

from flowmatch.reflow.couplings import CouplingRunError, generate_couplings
from flowmatch.reflow.datamodule import CouplingDataModule
from flowmatch.reflow.format import (
    CouplingFormatError,
    CouplingRecord,
    iter_records,
    read_couplings,
    read_manifest,
    write_shard,
)

__all__ = [
    "CouplingDataModule",
    "CouplingFormatError",
    "CouplingRecord",
    "CouplingRunError",
    "generate_couplings",
    "iter_records",
    "read_couplings",
    "read_manifest",
    "write_shard",
]
