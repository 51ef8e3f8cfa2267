"""Sampling: time grids, ODE solvers, classifier-free guidance and the `sample` entry point.

Time runs from t = 1 (noise) down to t = 0 (data), docs/spec.md §1 and §4.
"""

from .guidance import guided_velocity
from .sampler import SamplerConfig, sample
from .solvers import ADAPTIVE_SOLVERS, SOLVERS, ddim, dopri5, euler, get_solver, heun, midpoint
from .time_grid import GRID_KINDS, flux_mu, flux_time_shift, shift_time, time_grid

__all__ = [
    "ADAPTIVE_SOLVERS",
    "GRID_KINDS",
    "SOLVERS",
    "SamplerConfig",
    "ddim",
    "dopri5",
    "euler",
    "flux_mu",
    "flux_time_shift",
    "get_solver",
    "guided_velocity",
    "heun",
    "midpoint",
    "sample",
    "shift_time",
    "time_grid",
]
