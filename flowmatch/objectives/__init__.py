"""The training objectives as LightningModules, all on one base class (``FlowObjective``)."""

from flowmatch.objectives.base import FlowObjective, NonFiniteLossError
from flowmatch.objectives.diffusion import EpsDDPM, VPDiffusion
from flowmatch.objectives.distillation import OneStepDistillation
from flowmatch.objectives.flow_matching import FlowMatching
from flowmatch.objectives.rectified_flow import RectifiedFlow

__all__ = ["FlowObjective", "NonFiniteLossError", "FlowMatching", "RectifiedFlow", "EpsDDPM", "VPDiffusion", "OneStepDistillation"]
