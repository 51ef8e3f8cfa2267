"""One entry point for drawing samples: grid + guidance (classifier-free or embedded) + solver (docs/spec.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Tuple

import torch

from .guidance import guided_velocity, network_passes
from .solvers import ADAPTIVE_SOLVERS, get_solver
from .time_grid import time_grid


def _num_tag(x: float) -> str:
    """Short metric-safe rendering of a number: 3.0 -> '3', 1.5 -> '1p5', -0.5 -> 'm0p5'."""
    return f"{float(x):g}".replace(".", "p").replace("-", "m").replace("+", "")


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample: solver, steps, time-grid shift and kind, CFG scale, dopri5 tolerances.

    ``steps`` is ignored by adaptive solvers (dopri5), which choose their own steps.
    """

    solver: str = "euler"
    steps: int = 25
    shift: float = 1.0
    grid: str = "plain"
    guidance: float = 1.0
    rtol: float = 1e-5
    atol: float = 1e-5

    def __post_init__(self):
        # Fail at configuration time rather than at the first sampling call.
        get_solver(self.solver)
        time_grid(self.steps, shift=self.shift, kind=self.grid)  # validates steps, shift and grid kind

    @property
    def name(self) -> str:
        """Short stable lowercase tag for metric names, e.g. 'euler25', 'heun8_cfg4_shift3', 'dopri5'.

        Only settings that differ from the defaults appear: '_cfg<w>' when guidance != 1,
        '_shift<a>' when shift != 1, '_sd3grid' for the SD3 reference grid. Dots become 'p'.
        """
        tag = self.solver if self.solver in ADAPTIVE_SOLVERS else f"{self.solver}{self.steps}"
        if self.guidance != 1:
            tag += f"_cfg{_num_tag(self.guidance)}"
        if self.shift != 1:
            tag += f"_shift{_num_tag(self.shift)}"
        if self.grid != "plain":
            tag += f"_{self.grid}grid"
        return tag.lower()


def sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    noise: torch.Tensor,
    cond: Any = None,
    uncond: Any = None,
    config: SamplerConfig = SamplerConfig(),
    t_max: float = 1.0,
    progress: bool = False,
    t_min: float = 0.0,
    embedded_guidance: bool | None = None,
    path: Any = None,
) -> Tuple[torch.Tensor, int]:
    """Integrate dz/dt = v(z, t) from t_max (noise) to t_min (0: data); returns (x, nfe).

    ``velocity_fn(z, t, cond)`` is the model's velocity with t of shape (B,) in z's dtype.
    ``nfe`` counts network evaluations per sample: the solver's evaluations of the (guided) field, times 2
    with classifier-free guidance (each is one call on the doubled batch [cond; uncond]: a conditional and
    an unconditional pass per sample). With embedded guidance (a guidance-distilled network, which gets
    ``config.guidance`` as cond["guidance"]; ``embedded_guidance`` None = read from the network behind
    ``velocity_fn``, see flowmatch.sampling.guidance) each field evaluation is one call on the plain batch.
    ``path`` is the model's affine path, which the ddim solver steps along (the others ignore it).
    Runs with whatever grad mode the caller set (wrap in torch.no_grad() for inference).
    """
    grid = time_grid(config.steps, shift=config.shift, kind=config.grid, t_max=t_max, t_min=t_min)
    v = guided_velocity(velocity_fn, cond, uncond, config.guidance, embedded=embedded_guidance)
    solver = get_solver(config.solver)
    x, field_evaluations = solver(v, noise, grid, rtol=config.rtol, atol=config.atol, progress=progress, path=path)
    return x, field_evaluations * network_passes(velocity_fn, cond, uncond, config.guidance, embedded=embedded_guidance)
