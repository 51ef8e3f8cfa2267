"""FlowObjective: the LightningModule that trains a network with a FlowLoss, logs SD3's validation loss, and generates.

An objective is a (path, parametrisation) pair plus a time sampler and a loss weighting; the
subclasses in this package only choose the path and the parametrisation. The maths is plain torch
(flowmatch.objectives.loss.FlowLoss, usable without Lightning); this module drives it: the training
step, the validation / test loss at fixed times with fixed noise (SD3 §5.3.3), and, from its base
FlowGenerator, the network, the optimizer, generation and checkpoints. A NaN loss stops the run
before the update (flowmatch.training.divergence); runs resume exactly (flowmatch.training.resume_rng).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn
from torchmetrics import MeanMetric

from flowmatch.adapters.lora import LoraAdapter
from flowmatch.objectives.generator import FlowGenerator, unpack_batch
from flowmatch.objectives.loss import FlowLoss
from flowmatch.time_samplers import TimeSampler, UniformTime
from flowmatch.data.facts import facts_of
from flowmatch.time_shift import TimeShift
from flowmatch.training.divergence import stop_if_not_finite
from flowmatch.weighting import Weighting, get_weighting


class FlowObjective(FlowGenerator):
    """Base class of the objectives. Subclasses set ``self.path`` and ``self.parametrisation``.

    Args:
        network: the velocity / noise network, called as ``network(z, t, cond)``; or a factory
            ``() -> nn.Module`` that ``configure_model`` calls (the CLI passes one), so that a
            sharding strategy (DeepSpeed ZeRO-3) can build it sharded. ``self.net`` builds it on
            first use if nothing has yet.
        time_sampler: density of training times t (uniform, logit-normal, mode, cosmap).
        weighting: loss weighting w_t by name ("native" = plain MSE of the prediction; "eps",
            "velocity", "rf", "v": see flowmatch.weighting).
        time_shift: a shift of the drawn training times towards the noise end (flowmatch.time_shift:
            ConstantShift(alpha), or FLUX's ResolutionShift read from each batch's latent shape); None: none.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear learning-rate warm-up over this many optimizer steps (0 = none).
        lr_decay_steps, lr_final_ratio: cosine decay of the learning rate to lr * lr_final_ratio at step lr_decay_steps
            (0 = none: constant after warm-up, as SD3); see flowmatch.training.lr_schedule.
        sample_shape: shape of one data sample, e.g. [2] or [16, 8, 8]; set from the data at setup (the CLI adds flowmatch.callbacks.data_match.MatchModelToData).
        val_levels: number of equally spaced validation times t = k / val_levels, k = 1..val_levels
            (SD3 §5.3.3 uses 8); val/loss averages all but t = 1.
        val_seed: seed of the fixed validation noise.
        init_weights: a checkpoint (from `fit` or `import-sd3`) whose network weights start this run,
            e.g. to fine-tune an imported SD3 model; optimizer state is not taken from it.
        adapter, trainable, frozen_dtype: fine-tuning (a LoRA adapter, parameter-name patterns to train, the dtype of
            the frozen rest): see flowmatch.objectives.generator.FlowGenerator and docs/fine_tuning.md.
    """

    def __init__(
        self,
        network: Callable[[], nn.Module] | nn.Module,
        time_sampler: TimeSampler | None = None,
        weighting: str = "native",
        time_shift: TimeShift | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_decay_steps: int = 0,
        lr_final_ratio: float = 0.1,
        sample_shape: list[int] | None = None,
        val_levels: int = 8,
        val_seed: int = 0,
        init_weights: str | None = None,
        adapter: LoraAdapter | None = None,
        trainable: list[str] | None = None,
        frozen_dtype: str | None = None,
    ):
        super().__init__(network, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         lr_decay_steps=lr_decay_steps, lr_final_ratio=lr_final_ratio, sample_shape=sample_shape,
                         init_weights=init_weights, adapter=adapter, trainable=trainable, frozen_dtype=frozen_dtype)
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.weighting: Weighting = get_weighting(weighting)
        self.time_shift = time_shift
        if val_levels < 2:
            raise ValueError(f"val_levels must be >= 2 (t = 1 is excluded from the average), got {val_levels}")
        self.val_times = [k / val_levels for k in range(1, val_levels + 1)]
        self.val_metrics = nn.ModuleList(MeanMetric() for _ in self.val_times)
        self.bucket_metrics = nn.ModuleDict()  # per aspect-ratio bucket, made in setup from the data

    @property
    def objective(self) -> FlowLoss:
        """This module's maths as a plain-torch FlowLoss: its path, parametrisation, time sampler (and shift) and weighting."""
        return FlowLoss(self.path, self.parametrisation, self.time_sampler, self.weighting, time_shift=self.time_shift)

    def loss_per_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The weighted regression loss of each sample, computed in float32."""
        return self.objective.loss_per_sample(self.net, x0, t, eps, cond)

    # --- training ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x0, cond = unpack_batch(batch)
        self._remember_sample_shape(x0)
        eps = batch["eps"] if isinstance(batch, dict) and "eps" in batch else None  # fixed (noise, data) couplings, e.g. for reflow
        loss = self.objective.training_loss(self.net, x0, cond, eps=eps).mean()
        stop_if_not_finite(self, loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    # --- SD3 validation loss: fixed t levels, fixed noise ----------------------------------------
    def _level_losses(self, batch, batch_idx: int) -> None:
        x0, cond = unpack_batch(batch)
        if isinstance(batch, dict) and "eps" in batch:  # couplings: the loss of the fixed pairs (reflow)
            eps = batch["eps"].float()
        else:
            gen = torch.Generator().manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
            eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device)
        objective = self.objective
        levels = []
        for t_level, metric in zip(self.val_times, self.val_metrics):
            t = torch.full((x0.shape[0],), t_level, device=x0.device, dtype=torch.float32)
            levels.append(objective.loss_per_sample(self.net, x0, t, eps, cond))
            metric.update(levels[-1])
        bucket = batch.get("bucket") if isinstance(batch, dict) else None
        if bucket is not None and bucket in self.bucket_metrics:  # one shape a batch: its bucket's loss, t = 1 excluded as below
            self.bucket_metrics[bucket].update(torch.stack(levels[:-1]).mean(0))

    def setup(self, stage: str) -> None:
        """One validation-loss metric per aspect-ratio bucket of the data (none for single-shape data): made on every
        rank alike before the first evaluation, so their values reduce over ranks like the level metrics."""
        facts = facts_of(getattr(self._trainer, "datamodule", None)) if self._trainer is not None else None
        names = [b["name"] for b in facts.buckets] if facts is not None else []
        self.bucket_metrics = nn.ModuleDict({name: MeanMetric() for name in names})

    def _log_level_losses(self, stage: str) -> None:
        values = [m.compute() for m in self.val_metrics]
        for t_level, v in zip(self.val_times, values):
            self.log(f"{stage}/loss_t{t_level:.3f}", v, sync_dist=True)  # (already reduced over ranks by the metric)
        self.log(f"{stage}/loss", torch.stack(values[:-1]).mean(), prog_bar=True, sync_dist=True)  # t = 1 excluded (SD3)
        for m in self.val_metrics:
            m.reset()
        for name, m in self.bucket_metrics.items():
            with warnings.catch_warnings():  # a bucket the split lacks: compute (synced over ranks) is nan on every rank
                warnings.simplefilter("ignore")
                value = m.compute()
            if torch.isfinite(value):
                self.log(f"{stage}/loss_bucket_{name}", value, sync_dist=True)
            m.reset()

    def validation_step(self, batch, batch_idx):
        self._level_losses(batch, batch_idx)

    def on_validation_epoch_end(self):
        self._log_level_losses("val")

    def test_step(self, batch, batch_idx):
        self._level_losses(batch, batch_idx)

    def on_test_epoch_end(self):
        self._log_level_losses("test")
