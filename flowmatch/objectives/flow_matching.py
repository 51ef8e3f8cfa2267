"""Flow Matching (Lipman et al. 2022) on the conditional optimal-transport path."""

from typing import Callable

from torch import nn

from flowmatch.objectives.base import FlowObjective
from flowmatch.parametrisation import VelocityPrediction
from flowmatch.paths.linear import OTPath
from flowmatch.time_samplers import TimeSampler


class FlowMatching(FlowObjective):
    """Velocity regression on z_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps.

    Args:
        sigma_min: the noise left at the data end of the path (the paper uses 1e-4 .. 1e-5).
        (the rest as in FlowObjective)
    """

    def __init__(self, network: Callable[[], nn.Module] | nn.Module, sigma_min: float = 1e-4, time_sampler: TimeSampler | None = None, weighting: str = "native", **kwargs):
        super().__init__(network, time_sampler=time_sampler, weighting=weighting, **kwargs)
        self.path = OTPath(sigma_min)
        self.parametrisation = VelocityPrediction()
