"""Probability paths z_t = a_t x0 + b_t eps (t = 0 data, t = 1 noise), with their derivatives."""

from flowmatch.paths.base import AffinePath, PathSample, expand_like
from flowmatch.paths.linear import OTPath, RectifiedFlowPath
from flowmatch.paths.vp import CosineVPPath, LinearVPPath

__all__ = [
    "AffinePath",
    "PathSample",
    "expand_like",
    "OTPath",
    "RectifiedFlowPath",
    "LinearVPPath",
    "CosineVPPath",
]
