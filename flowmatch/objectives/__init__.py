"""The training objectives.

- loss: the maths in plain torch (``FlowLoss``: path + parametrisation + time sampler + weighting), no Lightning
- generator: ``FlowGenerator``, the LightningModule base of everything that trains a network and generates
- base: ``FlowObjective``, the LightningModule that trains with a FlowLoss (and logs SD3's validation loss);
  RectifiedFlow, FlowMatching, VPDiffusion and EpsDDPM only choose its path and parametrisation
- distillation: ``FewStepDistillation``, a student that lands on a teacher's samples in N Euler steps
- guidance_distillation: ``GuidanceDistillation``, a guidance-embedded student (FLUX.1-dev's recipe) that
  matches a teacher's classifier-free-guided velocity at a scale drawn per example
- loading: ``load_objective``, a trained objective back from its checkpoint
"""

from flowmatch.objectives.base import FlowObjective
from flowmatch.objectives.diffusion import EpsDDPM, VPDiffusion
from flowmatch.objectives.distillation import FewStepDistillation, OneStepDistillation
from flowmatch.objectives.flow_matching import FlowMatching
from flowmatch.objectives.guidance_distillation import GuidanceDistillation, GuidanceDistillationLoss
from flowmatch.objectives.generator import FlowGenerator
from flowmatch.objectives.loss import FlowLoss, VelocityField
from flowmatch.objectives.rectified_flow import RectifiedFlow
from flowmatch.training.divergence import NonFiniteLossError

__all__ = ["FlowGenerator", "FlowObjective", "FlowLoss", "VelocityField", "NonFiniteLossError", "FlowMatching", "RectifiedFlow",
           "EpsDDPM", "VPDiffusion", "FewStepDistillation", "OneStepDistillation",
           "GuidanceDistillation", "GuidanceDistillationLoss"]
