"""ODE solvers for the probability-flow ODE dz/dt = v(z, t) (docs/spec.md §4).

Every solver integrates along a given *descending* time grid (t = 1 noise -> t = 0 data) and
returns ``(z_final, nfe)``, nfe being the number of calls of ``v``, the honest cost measure for
comparing solvers. ``v(z, t)`` gets ``t`` as a tensor of shape (B,) with z's dtype and device.

All solvers share one keyword signature so they can be swapped by name; options a solver has no
use for (``rtol``/``atol`` for the fixed-step ones, ``progress`` for dopri5) are ignored.
Gradients are not disabled here: wrapping in ``torch.no_grad()`` is the caller's choice.
DDIM also needs the model's affine path (``path=``): it steps in the path's own coordinates.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from tqdm.auto import tqdm

from flowmatch.paths.base import expand_like

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Solver = Callable[..., Tuple[torch.Tensor, int]]


def _batch_time(t: float, z: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar time to the (B,) tensor that velocity fields expect."""
    return torch.full((z.shape[0],), float(t), dtype=z.dtype, device=z.device)


def _steps(grid: torch.Tensor, progress: bool, desc: str):
    """Yield consecutive (t, t_next) pairs of the grid as Python floats (float64 precision)."""
    times = [float(x) for x in grid]
    if len(times) < 2:
        raise ValueError(f"time grid needs at least 2 points, got {len(times)}")
    for i in tqdm(range(len(times) - 1), disable=not progress, desc=desc, leave=False):
        yield times[i], times[i + 1]


def euler(v: Velocity, z: torch.Tensor, grid: torch.Tensor, *, progress: bool = False, **_) -> Tuple[torch.Tensor, int]:
    """Explicit Euler: first order, 1 NFE per step."""
    nfe = 0
    for t, t_next in _steps(grid, progress, "euler"):
        z = z + (t_next - t) * v(z, _batch_time(t, z))
        nfe += 1
    return z, nfe


def heun(v: Velocity, z: torch.Tensor, grid: torch.Tensor, *, progress: bool = False, **_) -> Tuple[torch.Tensor, int]:
    """Heun's method (explicit trapezoid): second order, 2 NFE per step.

    Flow-matching velocities are defined at t = 0, so the last step needs no Euler fallback
    (unlike EDM's sampler, whose denoiser form is singular at sigma = 0).
    """
    nfe = 0
    for t, t_next in _steps(grid, progress, "heun"):
        dt = t_next - t
        d0 = v(z, _batch_time(t, z))
        d1 = v(z + dt * d0, _batch_time(t_next, z))
        z = z + dt * 0.5 * (d0 + d1)
        nfe += 2
    return z, nfe


def midpoint(v: Velocity, z: torch.Tensor, grid: torch.Tensor, *, progress: bool = False, **_) -> Tuple[torch.Tensor, int]:
    """Explicit midpoint rule: second order, 2 NFE per step."""
    nfe = 0
    for t, t_next in _steps(grid, progress, "midpoint"):
        dt = t_next - t
        d0 = v(z, _batch_time(t, z))
        z = z + dt * v(z + 0.5 * dt * d0, _batch_time(t + 0.5 * dt, z))
        nfe += 2
    return z, nfe


def dopri5(
    v: Velocity,
    z: torch.Tensor,
    grid: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = False,
    **_,
) -> Tuple[torch.Tensor, int]:
    """Adaptive Dormand-Prince 5(4) via torchdiffeq from grid[0] to grid[-1].

    Only the grid's endpoints matter: the step sizes are chosen by the error control, so the NFE
    (counted by wrapping v) is an output, not an input. ``progress`` is ignored (steps unknown).
    """
    from torchdiffeq import odeint  # imported lazily: only this solver needs it

    nfe = 0

    def func(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return v(y, _batch_time(t, y))

    span = torch.tensor([float(grid[0]), float(grid[-1])], dtype=z.dtype, device=z.device)
    # step_t makes the solver land exactly on the end time instead of stepping past it and
    # interpolating back: the field is never evaluated outside [grid[-1], grid[0]] (a VP path's
    # velocity is singular just below its t_min).
    traj = odeint(func, z, span, rtol=rtol, atol=atol, method="dopri5", options={"step_t": span[1:]})
    return traj[-1], nfe


def ddim(v: Velocity, z: torch.Tensor, grid: torch.Tensor, *, path=None, progress: bool = False, **_) -> Tuple[torch.Tensor, int]:
    """Deterministic DDIM (Song et al. 2021, eta = 0): first order, 1 NFE per step, exact for a constant (x0, eps) prediction.

    At each grid time the velocity is turned into the model's predictions of the data and the noise,
    (x0, eps) = path.x0_eps_from_velocity(v, z, t), and the next point is put on the path through them:
    z_next = a(t_next) x0 + b(t_next) eps. On a VP path this is the DDIM update of an eps-prediction model
    (the natural first-order solver of eps- and v-prediction); on the rectified-flow path a_t = 1 - t,
    b_t = t it is exactly Euler. Guidance combines velocities, which are affine in (x0, eps) at fixed z,
    so guided DDIM here is DDIM on the guided eps as diffusers does it.
    """
    if path is None:
        raise ValueError("the ddim solver needs the model's affine path (sample(..., path=model.path))")
    nfe = 0
    for t, t_next in _steps(grid, progress, "ddim"):
        tb = _batch_time(t, z)
        x0, eps = path.x0_eps_from_velocity(v(z, tb), z, tb)
        nb = _batch_time(t_next, z)
        z = expand_like(path.a(nb), z) * x0 + expand_like(path.b(nb), z) * eps
        nfe += 1
    return z, nfe


SOLVERS: Dict[str, Solver] = {"euler": euler, "heun": heun, "midpoint": midpoint, "ddim": ddim, "dopri5": dopri5}

# Solvers whose step count is decided by error control (their `steps` setting is meaningless).
ADAPTIVE_SOLVERS = frozenset({"dopri5"})


def get_solver(name: str) -> Solver:
    """Look a solver up by name, with an error that lists the valid names."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(SOLVERS)}") from None
