"""Straight paths: rectified flow (a = 1 - t, b = t) and Lipman's optimal-transport path with sigma_min."""

import torch

from flowmatch.paths.base import AffinePath


class RectifiedFlowPath(AffinePath):
    """Rectified flow / SD3 "rf": z_t = (1 - t) x0 + t eps, velocity target eps - x0."""

    def a(self, t):
        return 1.0 - t

    def b(self, t):
        return t

    def da(self, t):
        return -torch.ones_like(t)

    def db(self, t):
        return torch.ones_like(t)


class OTPath(AffinePath):
    """Flow Matching's conditional OT path (Lipman et al. 2022) in the platform's time t = 1 - t'.

    z_t = (1 - t) x0 + (sigma_min + (1 - sigma_min) t) eps, so the target is (1 - sigma_min) eps - x0.
    In Lipman's own time t' (t' = 1 data) this is mu = t' x1, sigma = 1 - (1 - sigma_min) t'.
    """

    def __init__(self, sigma_min: float = 1e-4):
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must lie in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)

    def a(self, t):
        return 1.0 - t

    def b(self, t):
        return self.sigma_min + (1.0 - self.sigma_min) * t

    def da(self, t):
        return -torch.ones_like(t)

    def db(self, t):
        return torch.full_like(t, 1.0 - self.sigma_min)
