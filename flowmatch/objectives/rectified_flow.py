"""Rectified flow (Liu et al. 2022; SD3's "rf"): velocity regression on the straight path."""

from typing import Callable

from torch import nn

from flowmatch.objectives.base import FlowObjective
from flowmatch.parametrisation import VelocityPrediction
from flowmatch.paths.linear import RectifiedFlowPath
from flowmatch.time_samplers import TimeSampler


class RectifiedFlow(FlowObjective):
    """Velocity regression on z_t = (1 - t) x0 + t eps, target eps - x0.

    With the default uniform time sampler this is SD3's plain "rf"; give a LogitNormalTime(0, 1)
    for SD3's best "rf/lognorm(0.00, 1.00)". (Arguments as in FlowObjective.)
    """

    def __init__(self, network: Callable[[], nn.Module] | nn.Module, time_sampler: TimeSampler | None = None, weighting: str = "native", **kwargs):
        super().__init__(network, time_sampler=time_sampler, weighting=weighting, **kwargs)
        self.path = RectifiedFlowPath()
        self.parametrisation = VelocityPrediction()
