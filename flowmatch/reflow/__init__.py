"""Reflow (Rectified Flow, Liu et al. 2022; docs/spec.md §5): couplings drawn from a trained flow, and training on them.

- flowmatch.reflow.format: the coupling shard format (webdataset tars of (noise, sample, condition) + manifest.json;
  the condition a class label, or a caption with its stored text encodings)
- flowmatch.reflow.captions: ``TrainingCaptions``, the captions (and encodings) that condition a text model's pairs
- flowmatch.reflow.couplings: ``generate_couplings`` integrates fresh noise through a model into a coupling set
- flowmatch.reflow.run_dir: the run's OUT.partial/ directory (resumable; renamed to OUT once complete)
- flowmatch.reflow.datamodule: ``CouplingDataModule`` serves the pairs as ``{"x0", "eps", "cond"}`` batches

``python -m flowmatch reflow --ckpt CKPT --num-pairs N --out DIR`` draws a set; a k-rectified flow is
then a RectifiedFlow fitted on it (experiments/toy2d_reflow.yaml, experiments/digits_reflow.yaml), a
one-step student an FewStepDistillation (flowmatch.objectives.distillation, experiments/toy2d_distill.yaml,
experiments/digits_distill.yaml).
"""

from flowmatch.reflow.captions import CaptionSourceError, TrainingCaptions
from flowmatch.reflow.couplings import CouplingRunError, generate_couplings
from flowmatch.reflow.datamodule import CouplingDataModule, TextConditions
from flowmatch.reflow.format import (
    CouplingFormatError,
    CouplingRecord,
    iter_records,
    read_couplings,
    read_manifest,
    write_shard,
)

__all__ = [
    "CaptionSourceError",
    "CouplingDataModule",
    "CouplingFormatError",
    "CouplingRecord",
    "CouplingRunError",
    "TextConditions",
    "TrainingCaptions",
    "generate_couplings",
    "iter_records",
    "read_couplings",
    "read_manifest",
    "write_shard",
]
