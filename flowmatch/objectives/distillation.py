"""Few-step distillation of a (k-)rectified flow on its couplings (Rectified Flow, Liu et al. 2022, docs/spec.md §5).

The teacher's couplings (eps, x_hat = Z_0(eps)) are fixed pairs (``python -m flowmatch reflow``).
A student with the teacher's architecture, initialised from its weights (``init_weights``), learns
to land on x_hat in ``student_steps`` Euler steps of its own velocity field. With one step, in the
platform's time (t = 1 noise, t = 0 data, z_0 = z_1 + (0 - 1) v):

    x_student = eps - v_theta(eps, t = 1),      loss = || eps - v_theta(eps, 1) - x_hat ||^2

(the paper's one-step distillation, L2 / MSE; ``loss: pseudo_huber`` is the robust alternative of
consistency training, no LPIPS here). With N steps the student is unrolled through the N-step Euler
map on the plain grid 1, (N-1)/N, ..., 0 and trained end to end.

The student is a FlowGenerator, not a FlowObjective: it draws no training times, weights nothing and
has no per-level validation loss; its validation / test loss is the distillation loss itself.

Generation (``generate`` / the sample command / PointSampleMetrics) with ``sampler=None`` uses the
student's own N Euler steps; give e.g. ``samplers: [euler1]`` to the metrics for the one-step student.
Guidance belongs to the couplings (the teacher sampled with it): sample the student with guidance 1.

``OneStepDistillation`` is this class's former name (it always trained N-step students); it still
works, with a FutureWarning (shown to users by default), and checkpoints written under either name load into both.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torchmetrics import MeanMetric

from flowmatch.objectives.generator import FlowGenerator, unpack_batch
from flowmatch.parametrisation import VelocityPrediction
from flowmatch.paths.linear import RectifiedFlowPath
from flowmatch.sampling import SamplerConfig, time_grid
from flowmatch.time_samplers import TimeSampler
from flowmatch.training.divergence import stop_if_not_finite

LOSSES = ("mse", "pseudo_huber")


class FewStepDistillation(FlowGenerator):
    """A student velocity field trained so that ``student_steps`` Euler steps map eps to the teacher's sample.

    Args:
        network: the student network (the teacher's architecture, to start from its weights).
        student_steps: Euler steps the student takes from t = 1 to t = 0 (1 = one-step generation).
        loss: "mse" (the paper's L2) or "pseudo_huber" (sqrt(|d|^2 + c^2) - c, c = 0.00054 sqrt(dim)).
        init_weights: the teacher's checkpoint (its network weights start the student).
        (lr, weight_decay, betas, warmup_steps, sample_shape as in FlowGenerator.)
    """

    former_names = ("OneStepDistillation",)

    def __init__(
        self,
        network: Callable[[], nn.Module] | nn.Module,
        student_steps: int = 1,
        loss: str = "mse",
        **kwargs,
    ):
        super().__init__(network, **kwargs)  # lr, weight_decay, betas, warmup_steps, sample_shape, init_weights
        if student_steps < 1:
            raise ValueError(f"student_steps must be >= 1, got {student_steps}")
        if loss not in LOSSES:
            raise ValueError(f"unknown distillation loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.path = RectifiedFlowPath()
        self.parametrisation = VelocityPrediction()
        self.student_steps = int(student_steps)
        self.loss_kind = loss
        self.grid = [float(t) for t in time_grid(self.student_steps)]
        self.eval_metric = MeanMetric()

    # --- the student map -------------------------------------------------------------------------------
    def student_map(self, eps: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The student's N Euler steps from eps at t = 1 to t = 0 (differentiable)."""
        z = eps
        for t, t_next in zip(self.grid[:-1], self.grid[1:]):
            v = self.velocity(z, torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype), cond)
            z = z + (t_next - t) * v.to(z.dtype)
        return z

    def distillation_loss(self, batch) -> torch.Tensor:
        """Per-sample loss between the student's output from the batch's eps and the teacher's sample x0."""
        x0, cond = unpack_batch(batch)
        if not isinstance(batch, dict) or "eps" not in batch:
            raise KeyError(f"{type(self).__name__} trains on couplings: a batch needs 'eps' (the noise) beside 'x0' (the teacher's "
                           "sample for it); use flowmatch.reflow.CouplingDataModule on a set from `python -m flowmatch reflow`")
        self._remember_sample_shape(x0)
        eps = batch["eps"].float()
        diff = (self.student_map(eps.to(x0.dtype), cond).float() - x0.float()).flatten(1)
        if self.loss_kind == "mse":
            return diff.pow(2).mean(1)
        c = 0.00054 * math.sqrt(diff.shape[1])
        return (diff.pow(2).sum(1) + c * c).sqrt() - c

    # --- training and evaluation ----------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss = self.distillation_loss(batch).mean()
        stop_if_not_finite(self, loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x0"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        self.eval_metric.update(self.distillation_loss(batch))

    def on_validation_epoch_end(self):
        self.log("val/loss", self.eval_metric.compute(), prog_bar=True)
        self.eval_metric.reset()

    def test_step(self, batch, batch_idx):
        self.eval_metric.update(self.distillation_loss(batch))

    def on_test_epoch_end(self):
        self.log("test/loss", self.eval_metric.compute())
        self.eval_metric.reset()

    # --- generation: the student's own steps by default ----------------------------------------------------
    @torch.no_grad()
    def generate(self, num: int, sampler: SamplerConfig | None = None, cond: Any = None, seed: int | None = 0,
                 noise: torch.Tensor | None = None, progress: bool = False) -> tuple[torch.Tensor, int]:
        sampler = sampler or SamplerConfig(solver="euler", steps=self.student_steps)
        return super().generate(num, sampler, cond=cond, seed=seed, noise=noise, progress=progress)


class OneStepDistillation(FewStepDistillation):
    """Deprecated name of :class:`FewStepDistillation` (which trains students of any number of steps).

    Also takes the arguments the old class inherited and never used (``time_sampler``, ``weighting``,
    ``val_levels``, ``val_seed``), so configs and checkpoints written with it still load; they are ignored.
    """

    former_names = ("FewStepDistillation",)

    def __init__(
        self,
        network: Callable[[], nn.Module] | nn.Module,
        student_steps: int = 1,
        loss: str = "mse",
        time_sampler: TimeSampler | None = None,
        weighting: str = "native",
        val_levels: int = 8,
        val_seed: int = 0,
        **kwargs,
    ):
        warnings.warn("flowmatch.objectives.distillation.OneStepDistillation is deprecated: it is now "
                      "flowmatch.objectives.distillation.FewStepDistillation (same arguments, less time_sampler, "
                      "weighting, val_levels and val_seed, which it never used)", FutureWarning, stacklevel=2)  # FutureWarning: shown to CLI users, unlike DeprecationWarning
        super().__init__(network, student_steps=student_steps, loss=loss, **kwargs)
