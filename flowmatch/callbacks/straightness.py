"""Log the straightness of the model's sampling paths (SPEC §5) at each validation / test epoch."""

import lightning as L
import torch

from flowmatch.metrics.straightness import straightness


class Straightness(L.Callback):
    """Logs ``{stage}/straightness`` (the RF paper's S), ``{stage}/straightness_normalized`` (S / E|z_1 - z_0|^2),
    ``{stage}/path_length_ratio`` (arc / chord) and ``{stage}/path_curvature`` (total turning, radians).

    Paths start from fixed noise (``seed``), so the numbers are comparable across steps and runs.
    A class-conditional data module's reference labels (``reference_samples(..., return_labels=True)``)
    condition the paths, with classifier-free ``guidance``.

    Args:
        num_samples: paths per estimate.
        steps: Euler steps per path (the estimate converges as O(1 / steps)).
        seed: seed of the starting noise.
        guidance: classifier-free guidance scale of the field whose paths are measured (1 = none).
    """

    def __init__(self, num_samples: int = 1000, steps: int = 100, seed: int = 4321, guidance: float = 1.0):
        if num_samples < 1 or steps < 2:
            raise ValueError(f"Straightness needs num_samples >= 1 and steps >= 2, got {num_samples} and {steps}")
        self.num_samples, self.steps, self.seed, self.guidance = num_samples, steps, seed, guidance
        self.last: dict[str, float] = {}

    def _labels(self, trainer) -> torch.Tensor | None:
        dm = trainer.datamodule
        if dm is None or not getattr(dm, "conditional", False) or not hasattr(dm, "reference_samples"):
            return None
        _, labels = dm.reference_samples(self.num_samples, split="val", return_labels=True)
        return labels

    def _evaluate(self, trainer, pl_module, stage: str) -> None:
        if trainer.sanity_checking:
            return
        result = straightness(pl_module, self.num_samples, steps=self.steps, seed=self.seed, cond=self._labels(trainer), guidance=self.guidance)
        values = {
            f"{stage}/straightness": result.straightness,
            f"{stage}/straightness_normalized": result.normalized,
            f"{stage}/path_length_ratio": result.length_ratio,
            f"{stage}/path_curvature": result.curvature,
        }
        for key, value in values.items():
            pl_module.log(key, value)
        self.last.update(values)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module, "test")
