"""Time grids for sampling (docs/spec.md §4).

Convention (docs/spec.md §1): t = 0 is data, t = 1 is noise; samplers walk a *descending* grid from
t_max (usually 1) down to exactly 0.
"""

from __future__ import annotations

import math
import numbers
from typing import Union

import torch

Number = Union[float, torch.Tensor]

GRID_KINDS = ("plain", "sd3")

# SD3 was trained on 1000 discrete timesteps; its reference grid stops at the shifted smallest one.
_SD3_MIN_TIME = 1.0 / 1000.0


def shift_time(t: Number, alpha: float) -> Number:
    """SD3 resolution shift s(t) = alpha t / (1 + (alpha - 1) t).

    alpha > 1 pushes times towards the noise end (t = 1), which higher resolutions need because
    more pixels keep more signal at the same noise level. Fixes 0 and 1; works on floats and tensors.
    """
    if alpha <= 0:
        raise ValueError(f"shift alpha must be > 0, got {alpha}")
    return alpha * t / (1 + (alpha - 1) * t)


def flux_mu(
    num_tokens: float,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's shift parameter mu, linear in the image token count.

    mu = base_shift at base_tokens and max_shift at max_tokens (extrapolated linearly outside).
    """
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (num_tokens - base_tokens)


def flux_time_shift(mu: float, t: Number) -> Number:
    """FLUX time shift e^mu / (e^mu + (1/t - 1)), written as in the FLUX reference code.

    It equals ``shift_time(t, alpha=math.exp(mu))`` (multiply top and bottom by t). The limit at
    t = 0 is 0, returned exactly rather than via 1/0.
    """
    e = math.exp(mu)
    if isinstance(t, torch.Tensor):
        safe_t = torch.where(t > 0, t, torch.ones_like(t))  # avoid 1/0; masked out below
        return torch.where(t > 0, e / (e + (1 / safe_t - 1)), torch.zeros_like(t))
    if t == 0:
        return 0.0
    return e / (e + (1 / t - 1))


def time_grid(steps: int, shift: float = 1.0, kind: str = "plain", t_max: float = 1.0, t_min: float = 0.0) -> torch.Tensor:
    """Descending float64 grid of ``steps + 1`` times from ``t_max`` to exactly ``t_min`` (default 0).

    kind="plain": steps + 1 evenly spaced points from 1 to 0, then the shift s(t) applied. With
                  ``shift=math.exp(flux_mu(tokens))`` this is FLUX's grid (black-forest-labs/flux
                  get_schedule; diffusers' FluxPipeline: the shifted linspace(1, 1/steps, steps), then 0).
    kind="sd3":   the SD3 reference grid: ``steps`` points evenly from 1 down to s(1/1000),
                  s applied to each (so the low end is shifted twice), then 0 appended. Needed to
                  reproduce SD3's outputs with imported weights.
    t_max (0 < t_max <= 1) rescales the grid to start at t_max, for paths that cannot start
    exactly at t = 1 (e.g. eps-prediction on the cosine VP path, where b_1 / a_1 blows up).
    t_min (>= 0) maps the grid affinely onto [t_min, t_max], for paths whose velocity is singular
    at t = 0 (LDM's schedule: b_t ~ sqrt(t)); the caller finishes with an x0 prediction.
    """
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    steps = int(steps)  # accept numpy and other integral types
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    if not 0 < t_max <= 1:
        raise ValueError(f"t_max must be in (0, 1], got {t_max!r}")
    if not 0 <= t_min < t_max:
        raise ValueError(f"t_min must be in [0, t_max), got {t_min!r}")

    if kind == "plain":
        grid = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    elif kind == "sd3":
        low = shift_time(_SD3_MIN_TIME, shift)
        pts = torch.linspace(1.0, low, steps, dtype=torch.float64)
        grid = torch.cat([shift_time(pts, shift), torch.zeros(1, dtype=torch.float64)])
    else:
        raise ValueError(f"unknown time grid kind {kind!r}; valid kinds: {', '.join(GRID_KINDS)}")

    grid = t_min + grid * (t_max - t_min)
    grid[-1] = t_min  # exact, whatever rounding the shift did
    return grid
