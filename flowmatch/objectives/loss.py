"""The objectives' maths in plain torch: no Lightning, usable with any network ``net(z, t, cond)``.

In the spirit of EDM's loss callables and flow_matching's ``AffineProbPath``:

* :class:`VelocityField` = a path + a parametrisation: turns the network's output into the velocity
  dz/dt of the probability-flow ODE (what sampling integrates);
* :class:`FlowLoss` = a VelocityField + a time sampler (optionally shifted, flowmatch.time_shift) + a loss
  weighting: the per-sample training loss, and the draws of t and noise that training makes.

Time convention (docs/spec.md §1): t = 0 is data, t = 1 is noise, z_t = a_t x0 + b_t eps. The loss is
computed in float32 whatever the network's precision::

    loss = FlowLoss(RectifiedFlowPath(), VelocityPrediction(), LogitNormalTime(0, 1))
    per_sample = loss.training_loss(net, x0, cond)      # draws t, then eps
    per_sample.mean().backward()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flowmatch.parametrisation import Parametrisation
from flowmatch.paths.base import AffinePath
from flowmatch.time_samplers import _EPS, TimeSampler, UniformTime
from flowmatch.time_shift import TimeShift
from flowmatch.weighting import Weighting, get_weighting


class VelocityField:
    """A network's output read as a velocity: ``parametrisation.to_velocity`` on ``path``."""

    def __init__(self, path: AffinePath, parametrisation: Parametrisation):
        self.path = path
        self.parametrisation = parametrisation

    def velocity(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """dz/dt of the learned flow at (z, t): the network output converted by the parametrisation (float32)."""
        out = net(z, t, cond)
        return self.parametrisation.to_velocity(out.float(), z.float(), t.float(), self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, parametrisation={self.parametrisation!r})"


class FlowLoss(VelocityField):
    """The training objective: regression of the parametrisation's target on the path, at times from
    ``time_sampler``, weighted by ``weighting`` (a name of flowmatch.weighting, or a Weighting).

    ``weighting="native"`` is the plain MSE of the prediction; the others multiply it by w_t over the
    parametrisation's own weight (docs/spec.md §2). ``time_shift`` (flowmatch.time_shift; None: none)
    maps each drawn time towards the noise end, e.g. FLUX's resolution-dependent shift."""

    def __init__(self, path: AffinePath, parametrisation: Parametrisation, time_sampler: TimeSampler | None = None,
                 weighting: str | Weighting = "native", time_shift: TimeShift | None = None):
        super().__init__(path, parametrisation)
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.weighting = get_weighting(weighting) if isinstance(weighting, str) else weighting
        self.time_shift = time_shift

    def loss_per_sample(self, net: nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The weighted regression loss of each sample (B,), computed in float32.

        The network sees z_t in the data's dtype (bf16 data: a bf16 input)."""
        s = self.path.sample(x0.float(), eps.float(), t.float())
        out = net(s.z.to(x0.dtype), t, cond).float()
        mse = (out - self.parametrisation.target(s, self.path)).pow(2).flatten(1).mean(1)
        multiplier = self.weighting.multiplier(t.float(), self.path, self.parametrisation)
        return mse if multiplier is None else mse * multiplier

    # --- the draws of training: first the times, then the noise (this order keeps runs reproducible) ------------
    def draw_times(self, n: int, device: torch.device | str | None = None, sample_shape: torch.Size | None = None) -> torch.Tensor:
        """n training times from the time sampler, in float32 (drawn on the CPU generator, then moved).

        With a time shift the draws are then shifted (the random stream is the same as without one);
        ``sample_shape`` is the data batch's shape, from which a resolution-dependent shift reads its alpha.
        Shifted times stay inside the samplers' (1e-6, 1 - 1e-6)."""
        t = self.time_sampler.sample(n, device=device)
        if self.time_shift is None:
            return t
        return self.time_shift.apply(t, sample_shape).clamp(_EPS, 1.0 - _EPS)

    @staticmethod
    def draw_noise(x0: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x0``, in float32 even when the batch is bf16."""
        return torch.randn(x0.shape, device=x0.device, dtype=torch.float32)

    def training_loss(self, net: nn.Module, x0: torch.Tensor, cond: Any = None, eps: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample loss (B,) of one training batch: draws t, then eps unless the batch brings its own
        (fixed (noise, data) couplings, e.g. for reflow)."""
        t = self.draw_times(x0.shape[0], device=x0.device, sample_shape=x0.shape)
        eps = self.draw_noise(x0) if eps is None else eps.float()
        return self.loss_per_sample(net, x0, t, eps, cond)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, parametrisation={self.parametrisation!r}, "
                f"time_sampler={self.time_sampler!r}, weighting={self.weighting!r}"
                + (f", time_shift={self.time_shift!r})" if self.time_shift is not None else ")"))
