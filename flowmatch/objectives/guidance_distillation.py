"""Guidance distillation: a guidance-embedded student learns its teacher's classifier-free-guided velocity.

How FLUX.1-dev was made from a CFG-trained teacher (Black Forest Labs describe it as "guidance-distilled";
the recipe is unpublished; the idea is Meng et al. 2023, "On distillation of guided diffusion models",
stage one). The student is the teacher's network plus a guidance embedding: FLUX with
``guidance_embed=True`` adds MLP(sinusoid(1000 g)) of ``cond["guidance"]`` to its modulation vector. Per
training example, with x0 from the data, eps ~ N(0, I), t from the time sampler and g ~ U(guidance_range):

    z_t    = a_t x0 + b_t eps                                  (the teacher's path: rectified flow)
    target = v_u + g (v_c - v_u)                               v_c, v_u: the teacher's conditional and
                                                               unconditional velocities at (z_t, t), from one
                                                               doubled-batch call without gradient
    loss   = w_t * mean_i (v_student(z_t, t, c, g) - target)_i^2      (w_t: ``weighting``, "native" = 1)

Sampling the student at guidance g is then one network call per step instead of CFG's two (its doubled
batch): flowmatch.sampling.guidance gives a guidance-embedded network ``cond["guidance"] = g`` and no null
condition, so "euler25:cfg=3" means embedded guidance 3 for it.

* The teacher is a checkpoint of a text-conditioned, CFG-trained objective on the rectified-flow path. It is
  loaded when training, validation or test first needs it (``load_objective``: EMA weights when it has them),
  frozen, in eval mode and float32 (under bf16-mixed its matmuls run in the run's autocast). It is not a
  submodule: it never enters the student's checkpoint, the optimizer or the EMA. The checkpoint keeps its
  path as a hyper-parameter only, so the student loads (``load_objective``, ``python -m flowmatch sample``)
  without the teacher file.
* ``init_from_teacher``: when ``fit`` starts, the student's network takes the teacher's network weights where
  names and shapes match; the guidance embedder is the only tensor the teacher lacks and its last linear
  starts at zero, so the student starts equal to the teacher's conditional velocity (any other mismatch is
  an error naming the tensor). On resume the checkpoint's weights then replace them.
* The student trains without text dropout: its target is the teacher's guided velocity for the real caption,
  which a dropped caption would contradict. A student network that drops its condition in training
  (``cond_drop_prob`` > 0) is refused, with the fix (``cond_drop_prob: 0``) named.
* Validation / test loss: the same loss at fixed guidance scales (``val_guidances``), fixed times (the
  midpoints of ``val_levels`` equal bins) and seeded noise: ``{stage}/loss`` (mean over scales) and
  ``{stage}/loss_g{scale}``.

``GuidanceDistillationLoss`` is the maths in plain torch (any student / teacher objects with the methods
used); ``GuidanceDistillation`` the LightningModule that trains it (a FlowGenerator, like
flowmatch.objectives.distillation.FewStepDistillation: it regresses no path target of its own).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torchmetrics import MeanMetric

from flowmatch.objectives.generator import FlowGenerator, unpack_batch
from flowmatch.objectives.loss import FlowLoss, VelocityField
from flowmatch.parametrisation import VelocityPrediction
from flowmatch.paths.linear import RectifiedFlowPath
from flowmatch.sampling.guidance import cfg_velocity, embeds_guidance
from flowmatch.time_samplers import LogitNormalTime, TimeSampler
from flowmatch.time_shift import TimeShift
from flowmatch.training.divergence import stop_if_not_finite

#: the student's tensors that its teacher does not have (FLUX's guidance embedding)
GUIDANCE_PREFIX = "guidance_embedder."
#: the guidance embedder's last linear (TimestepEmbedder.mlp = Linear, SiLU, Linear), zero at the start
GUIDANCE_OUT = ("guidance_embedder.mlp.2.weight", "guidance_embedder.mlp.2.bias")


def _tag(g: float) -> str:
    return f"{float(g):g}".replace(".", "p").replace("-", "m")


def _condition_dropouts(net: nn.Module) -> dict[str, float]:
    """Name -> probability of every condition dropout of ``net`` that drops anything in training."""
    from flowmatch.networks.layers import ConditionDropout

    return {name: m.prob for name, m in net.named_modules() if isinstance(m, ConditionDropout) and m.prob > 0}


class GuidanceDistillationLoss:
    """The distillation loss in plain torch: ``flow`` (a FlowLoss: path, parametrisation, time sampler, shift,
    weighting) gives the student's velocity, the draws of t and eps and the weighting; the teacher gives the target.

    ``teacher`` is anything with ``velocity(z, t, cond)`` and ``null_condition(cond)`` (a FlowGenerator)."""

    def __init__(self, flow: FlowLoss, guidance_range: tuple[float, float] = (1.0, 5.0)):
        self.flow = flow
        self.guidance_range = (float(guidance_range[0]), float(guidance_range[1]))

    def draw_guidance(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """n guidance scales ~ U(guidance_range), float32 (drawn on the CPU generator, then moved)."""
        lo, hi = self.guidance_range
        return (lo + (hi - lo) * torch.rand(n, dtype=torch.float32)).to(device or "cpu")

    @staticmethod
    @torch.no_grad()
    def teacher_target(teacher, z: torch.Tensor, t: torch.Tensor, cond: Any, g: torch.Tensor) -> torch.Tensor:
        """v_u + g (v_c - v_u) of the teacher at (z, t): one doubled-batch call, no gradient, float32."""
        return cfg_velocity(teacher.velocity, z, t, cond, teacher.null_condition(cond), g).float()

    def loss_per_sample(self, student: nn.Module, teacher, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                        cond: dict, g: torch.Tensor) -> torch.Tensor:
        """The weighted squared error (B,) of the student's velocity at guidance g against the teacher's guided velocity (float32).

        Both networks see z_t in the data's dtype (bf16 data: a bf16 input), as in FlowLoss."""
        path = self.flow.path
        z = path.sample(x0.float(), eps.float(), t.float()).z.to(x0.dtype)
        target = self.teacher_target(teacher, z, t, cond, g)
        v = VelocityField(path, self.flow.parametrisation).velocity(student, z, t, {**cond, "guidance": g})
        mse = (v - target).pow(2).flatten(1).mean(1)
        multiplier = self.flow.weighting.multiplier(t.float(), path, self.flow.parametrisation)
        return mse if multiplier is None else mse * multiplier

    def training_loss(self, student: nn.Module, teacher, x0: torch.Tensor, cond: dict) -> torch.Tensor:
        """The per-sample loss (B,) of one training batch; draws t, then eps, then g."""
        t = self.flow.draw_times(x0.shape[0], device=x0.device, sample_shape=x0.shape)
        eps = self.flow.draw_noise(x0)
        g = self.draw_guidance(x0.shape[0], device=x0.device)
        return self.loss_per_sample(student, teacher, x0, t, eps, cond, g)


class GuidanceDistillation(FlowGenerator):
    """A guidance-embedded student trained on its teacher's CFG velocity at a guidance scale drawn per example (module doc).

    Args:
        network: the student network (a factory, as for the other objectives, or a module); it must embed
            guidance (FLUX with ``guidance_embed: true``) and drop no condition in training (``cond_drop_prob: 0``).
        teacher: checkpoint of the teacher objective (``python -m flowmatch fit``): text-conditioned, trained with
            condition dropout, on the rectified-flow path. Needed to train / validate / test only.
        init_from_teacher: start the student from the teacher's network weights when ``fit`` starts (module doc).
        guidance_range: (low, high) of the uniform distribution of training guidance scales (FLUX.1-dev's
            default guidance in diffusers is 3.5).
        time_sampler: density of training times (default logit-normal(0, 1), the teacher recipe's).
        weighting: loss weighting by name (flowmatch.weighting; "native" = plain velocity MSE).
        time_shift: a shift of the drawn times towards noise (flowmatch.time_shift), None = none.
        val_guidances: the guidance scales of the validation / test loss.
        val_levels: validation times t = (k - 1/2) / val_levels, k = 1..val_levels.
        val_seed: seed of the fixed validation noise.
        (lr, weight_decay, betas, warmup_steps, lr_decay_steps, lr_final_ratio, sample_shape as in FlowGenerator.)
    """

    def __init__(
        self,
        network: Callable[[], nn.Module] | nn.Module,
        teacher: str | None = None,
        init_from_teacher: bool = True,
        guidance_range: tuple[float, float] = (1.0, 5.0),
        time_sampler: TimeSampler | None = None,
        weighting: str = "native",
        time_shift: TimeShift | None = None,
        val_guidances: Sequence[float] = (1.5, 3.0, 4.5),
        val_levels: int = 8,
        val_seed: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_decay_steps: int = 0,
        lr_final_ratio: float = 0.1,
        sample_shape: list[int] | None = None,
    ):
        lo, hi = (float(v) for v in guidance_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi):
            raise ValueError(f"guidance_range must be (low, high) with 0 <= low <= high, got {tuple(guidance_range)}")
        val_guidances = [float(g) for g in val_guidances]
        if not val_guidances or not all(math.isfinite(g) and g >= 0 for g in val_guidances):
            raise ValueError(f"val_guidances must be one or more finite scales >= 0, got {val_guidances}")
        if val_levels < 1:
            raise ValueError(f"val_levels must be >= 1, got {val_levels}")
        super().__init__(network, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         lr_decay_steps=lr_decay_steps, lr_final_ratio=lr_final_ratio, sample_shape=sample_shape)
        self.teacher_path = teacher
        self.start_from_teacher = bool(init_from_teacher)
        self._teacher: FlowGenerator | None = None
        self._initialised_from_teacher = False
        self.path = RectifiedFlowPath()
        self.parametrisation = VelocityPrediction()
        self.time_sampler = time_sampler if time_sampler is not None else LogitNormalTime(0.0, 1.0)
        self.objective = GuidanceDistillationLoss(
            FlowLoss(self.path, self.parametrisation, self.time_sampler, weighting, time_shift=time_shift), (lo, hi))
        self.val_guidances, self.val_seed = val_guidances, int(val_seed)
        self.val_times = [(k - 0.5) / val_levels for k in range(1, val_levels + 1)]
        self.val_metrics = nn.ModuleList(MeanMetric() for _ in self.val_guidances)
        if self.network_built:
            self._check_student(self._modules["net"])

    # --- the student network ----------------------------------------------------------------------------
    @staticmethod
    def _check_student(net: nn.Module) -> None:
        if not embeds_guidance(net):
            raise ValueError(f"GuidanceDistillation needs a student network that embeds the guidance scale (FLUX with "
                             f"guidance_embed: true); got {type(net).__name__} without guidance_embed")
        drops = _condition_dropouts(net)
        if drops:
            raise ValueError(f"the student network drops its text condition in training ({drops}): guidance distillation "
                             "regresses the teacher's guided velocity for the real caption, which a dropped caption "
                             "contradicts; build the student with cond_drop_prob: 0")

    def configure_model(self) -> None:
        """Build the student (checked), and start it from the teacher when ``fit`` runs (not when a checkpoint is loaded)."""
        built = self.network_built
        super().configure_model()
        if not built and self.network_built:
            self._check_student(self._modules["net"])
        trainer = self._trainer
        fitting = trainer is not None and getattr(trainer.state.fn, "value", trainer.state.fn) == "fit"
        if fitting and self.start_from_teacher and not self._initialised_from_teacher:
            self.init_from_teacher()

    def init_from_teacher(self) -> None:
        """Copy the teacher's network weights into the student (names and shapes must match); the guidance
        embedder, which the teacher lacks, keeps its initialisation but for its last linear, set to zero, so that
        the student's velocity equals the teacher's conditional velocity at every guidance scale."""
        from flowmatch.checkpoints import CheckpointError
        from flowmatch.strategies.zero3 import gathered

        teacher = self.teacher
        teacher_state = teacher.net.state_dict()
        net = self.net
        student_state = net.state_dict()
        lacking = [k for k in teacher_state if k not in student_state]
        extra = [k for k in student_state if k not in teacher_state and not k.startswith(GUIDANCE_PREFIX)]
        shapes = [f"{k}: teacher {tuple(v.shape)}, student {tuple(student_state[k].shape)}"
                  for k, v in teacher_state.items() if k in student_state and v.shape != student_state[k].shape]
        if lacking or extra or shapes:
            raise CheckpointError(
                f"the student network does not fit the teacher {self.teacher_path or type(teacher).__name__}: it must be "
                f"the teacher's architecture plus a guidance embedding ({GUIDANCE_PREFIX}*)."
                + (f" Tensors of the teacher the student lacks: {lacking[:5]}." if lacking else "")
                + (f" Tensors of the student the teacher lacks: {extra[:5]}." if extra else "")
                + (f" Shapes differ: {shapes[:5]}." if shapes else ""))
        with gathered(net.parameters(), modifier_rank=0), torch.no_grad():  # ZeRO-3: write the full tensors
            net.load_state_dict(teacher_state, strict=False)
            params = dict(net.named_parameters())
            for name in GUIDANCE_OUT:
                params[name].zero_()
        self._initialised_from_teacher = True

    # --- the teacher: loaded when first needed, never a submodule ---------------------------------------------
    @property
    def teacher(self) -> FlowGenerator:
        """The frozen teacher objective, loaded from ``teacher_path`` on first use (or given by ``set_teacher``)."""
        if self._teacher is None:
            path = self.teacher_path
            if not path:
                raise ValueError("GuidanceDistillation needs its teacher to train, validate or test: give teacher=PATH "
                                 "(--model.init_args.teacher PATH) of the CFG-trained checkpoint to distil")
            from flowmatch.objectives.loading import load_objective

            self.set_teacher(load_objective(path, map_location="cpu", weights="auto"))
        teacher = self._teacher
        device = next(self.net.parameters()).device
        if next(teacher.net.parameters()).device != device:
            teacher.to(device)
        return teacher

    def set_teacher(self, teacher: FlowGenerator) -> None:
        """Use this (loaded) objective as the teacher: checked, frozen, in eval mode, float32, kept outside the module tree."""
        net = teacher.net
        where = self.teacher_path or type(teacher).__name__
        if not isinstance(teacher.path, type(self.path)):
            raise ValueError(f"teacher {where} samples on {type(teacher.path).__name__}; the guidance-distilled student samples on "
                             f"{type(self.path).__name__}: distil a rectified-flow teacher")
        if self.start_from_teacher and not isinstance(teacher.parametrisation, type(self.parametrisation)):
            raise ValueError(f"teacher {where} predicts with {type(teacher.parametrisation).__name__}, the student with "
                             f"{type(self.parametrisation).__name__}: its weights cannot start the student (init_from_teacher: false)")
        spec = getattr(net, "conditioning", None)
        if spec is None or not spec.is_text:
            raise ValueError(f"teacher {where} ({type(net).__name__}) is not text-conditioned: guidance distillation needs "
                             "its conditional and unconditional (null-text) velocities")
        if embeds_guidance(net):
            raise ValueError(f"teacher {where} embeds guidance itself (guidance_embed=True): distil a CFG-trained teacher")
        if spec != self.net.conditioning:
            raise ValueError(f"teacher {where} takes the condition {spec}, the student {self.net.conditioning}: "
                             "they must read the same text")
        if teacher.sample_shape and self.sample_shape and tuple(teacher.sample_shape) != tuple(self.sample_shape):
            raise ValueError(f"teacher {where} generates samples of shape {tuple(teacher.sample_shape)}, "
                             f"the student {tuple(self.sample_shape)}")
        if not _condition_dropouts(net):
            warnings.warn(f"teacher {where} was built without condition dropout: unless it was trained with some, its "
                          "unconditional velocity (and so its guided one) is untrained", UserWarning, stacklevel=2)
        teacher.eval().float().requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)  # not a submodule: outside state_dict, parameters() and .to()

    # --- training and evaluation ----------------------------------------------------------------------
    def _batch(self, batch) -> tuple[torch.Tensor, dict]:
        x0, cond = unpack_batch(batch)
        if not isinstance(cond, dict):
            raise ValueError(f"GuidanceDistillation trains on text-conditioned data (cond a dict of 'pooled', 'tokens', ...), "
                             f"got cond of type {type(cond).__name__}")
        if "guidance" in cond:
            raise ValueError("the data's condition already holds 'guidance': the scale is drawn by the distillation, not read from data")
        self._remember_sample_shape(x0)
        return x0, cond

    def training_step(self, batch, batch_idx):
        x0, cond = self._batch(batch)
        loss = self.objective.training_loss(self.net, self.teacher, x0, cond).mean()
        stop_if_not_finite(self, loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def _fixed_losses(self, batch, batch_idx: int) -> None:
        """The loss at each validation guidance scale, averaged over the fixed times, seeded noise."""
        x0, cond = self._batch(batch)
        gen = torch.Generator().manual_seed(self.val_seed * 1_000_003 + batch_idx)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device)
        teacher, n = self.teacher, x0.shape[0]
        for g_value, metric in zip(self.val_guidances, self.val_metrics):
            g = torch.full((n,), g_value, device=x0.device, dtype=torch.float32)
            for t_value in self.val_times:
                t = torch.full((n,), t_value, device=x0.device, dtype=torch.float32)
                metric.update(self.objective.loss_per_sample(self.net, teacher, x0, t, eps, cond, g))

    def _log_fixed_losses(self, stage: str) -> None:
        values = [m.compute() for m in self.val_metrics]
        for g_value, v in zip(self.val_guidances, values):
            self.log(f"{stage}/loss_g{_tag(g_value)}", v, sync_dist=True)
        self.log(f"{stage}/loss", torch.stack(values).mean(), prog_bar=True, sync_dist=True)
        for m in self.val_metrics:
            m.reset()

    def validation_step(self, batch, batch_idx):
        self._fixed_losses(batch, batch_idx)

    def on_validation_epoch_end(self):
        self._log_fixed_losses("val")

    def test_step(self, batch, batch_idx):
        self._fixed_losses(batch, batch_idx)

    def on_test_epoch_end(self):
        self._log_fixed_losses("test")

    # --- generation: guidance is the network's input ------------------------------------------------------------
    def null_condition(self, cond: Any) -> None:
        """None: the student has no unconditional branch; sampling gives it the guidance scale instead
        (flowmatch.sampling.guidance), one network call per evaluation."""
        return None
