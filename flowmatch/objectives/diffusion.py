"""Diffusion on variance-preserving paths: eps-prediction DDPM (LDM linear or cosine) and v-prediction."""

from typing import Callable, Literal

from torch import nn

from flowmatch.objectives.base import FlowObjective
from flowmatch.parametrisation import get_parametrisation
from flowmatch.paths.vp import CosineVPPath, LinearVPPath
from flowmatch.time_samplers import TimeSampler

SCHEDULES = {"linear": LinearVPPath, "cosine": CosineVPPath}


class VPDiffusion(FlowObjective):
    """A VP diffusion: SD3's "eps/linear" (schedule linear, prediction eps), "eps/cos", "v/cos".

    Args:
        schedule: "linear" (LDM's 1000-step scaled-linear betas, 0.00085 .. 0.012) or "cosine".
        prediction: what the network predicts: "eps" or "v".
        weighting: loss weighting; "native" is the plain MSE of the prediction. "rf" re-weights to
            rectified flow's effective weighting, for fair comparisons (docs/spec.md §2).
        (the rest as in FlowObjective)
    """

    def __init__(
        self,
        network: Callable[[], nn.Module] | nn.Module,
        schedule: Literal["linear", "cosine"] = "linear",
        prediction: Literal["eps", "v"] = "eps",
        time_sampler: TimeSampler | None = None,
        weighting: str = "native",
        **kwargs,
    ):
        super().__init__(network, time_sampler=time_sampler, weighting=weighting, **kwargs)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r}; choose 'eps' or 'v'")
        self.path = SCHEDULES[schedule]()
        self.parametrisation = get_parametrisation(prediction)


class EpsDDPM(VPDiffusion):
    """Eps-prediction DDPM with a selectable loss weighting w_t ("native"/"eps": LDM's simple loss).

    Args:
        schedule: "linear" (LDM) or "cosine".
        (the rest as in FlowObjective)
    """

    def __init__(
        self,
        network: Callable[[], nn.Module] | nn.Module,
        schedule: Literal["linear", "cosine"] = "linear",
        time_sampler: TimeSampler | None = None,
        weighting: str = "native",
        **kwargs,
    ):
        super().__init__(network, schedule=schedule, prediction="eps", time_sampler=time_sampler, weighting=weighting, **kwargs)
