"""Log the straightness of the model's sampling paths (docs/spec.md §5) at each validation / test epoch."""

import lightning as L
import torch

from flowmatch.metrics.straightness import straightness


def _text_data(dm) -> bool:
    """Does the data module serve a text-to-image model (latent/caption shards, or couplings of such a model)?"""
    return dm.conditioning.is_text


class Straightness(L.Callback):
    """Logs ``{stage}/straightness`` (the RF paper's S), ``{stage}/straightness_normalized`` (S / E|z_1 - z_0|^2),
    ``{stage}/path_length_ratio`` (arc / chord) and ``{stage}/path_curvature`` (total turning, radians).

    Paths start from fixed noise (``seed``), so the numbers are comparable across steps and runs.
    A class-conditional data module's reference labels (``reference_samples(..., return_labels=True)``)
    condition the paths, with classifier-free ``guidance``. For a text-to-image model (a
    LatentShardDataModule, or a CouplingDataModule of text couplings) the conditions are those of the
    held-out split (``reference_batch``: the val split at validation, the test split at test; cycled when
    the split holds fewer than ``num_samples``), the same captions every time.

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
        self._text_cond: dict[str, dict] = {}

    def _labels(self, trainer) -> torch.Tensor | None:
        dm = trainer.datamodule
        if dm is None or dm.conditioning.kind != "labels":
            return None
        _, labels = dm.reference_samples(self.num_samples, split="val", return_labels=True)
        return labels

    def _text_conditions(self, dm, split: str) -> dict:
        """``num_samples`` conditions of the held-out split (its conditioning dicts, cycled), read once per split."""
        if split not in self._text_cond:
            available = dm.num_samples(split) if hasattr(dm, "num_samples") else None
            batch = dm.reference_batch(min(self.num_samples, available or self.num_samples), split=split)
            cond = batch.get("cond")
            if not isinstance(cond, dict):
                raise RuntimeError(f"Straightness: the {split} batches of {type(dm).__name__} carry no text conditioning dict ('cond')")
            m = next(iter(cond.values())).shape[0]
            idx = torch.arange(self.num_samples) % m
            self._text_cond[split] = {k: v[idx] for k, v in cond.items() if isinstance(v, torch.Tensor)}
        return self._text_cond[split]

    def _condition(self, trainer, stage: str):
        dm = trainer.datamodule
        if dm is not None and _text_data(dm):
            return self._text_conditions(dm, "test" if stage == "test" else "val")
        return self._labels(trainer)

    def _evaluate(self, trainer, pl_module, stage: str) -> None:
        if trainer.sanity_checking:
            return
        result = straightness(pl_module, self.num_samples, steps=self.steps, seed=self.seed, cond=self._condition(trainer, stage),
                              guidance=self.guidance)
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
