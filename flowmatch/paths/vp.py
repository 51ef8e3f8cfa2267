"""Variance-preserving paths (a_t^2 + b_t^2 = 1): LDM's discrete linear schedule and the cosine schedule."""

import math

import torch

from flowmatch.paths.base import AffinePath


def ldm_linear_alphas_cumprod(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """LDM's "scaled linear" schedule: beta_i = (sqrt(b0) + i/(T-1) (sqrt(b_end) - sqrt(b0)))^2, alphabar = prod(1 - beta)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    betas = (math.sqrt(beta_start) + i / (num_steps - 1) * (math.sqrt(beta_end) - math.sqrt(beta_start))) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class LinearVPPath(AffinePath):
    """SD3's "eps/linear": a_t = sqrt(alphabar_t), b_t = sqrt(1 - alphabar_t) with LDM's schedule.

    The schedule is defined at T discrete steps; step i (0-based) sits at t = (i + 1) / T and t = 0 is
    clean data (alphabar = 1). Between grid points log(alphabar) follows a cubic spline through all
    T + 1 points, so the path is exact at every DDPM step and smooth in t (an adaptive ODE solver
    needs a continuous velocity; a piecewise-linear schedule has 1000 kinks). It does not reach pure
    noise: a_1 = sqrt(alphabar_{T-1}) ~ 0.068 (LDM's known non-zero terminal SNR); sampling still
    starts from N(0, I) at t = 1, as DDIM does.
    Near t = 0, b_t ~ sqrt(t), so the velocity is unbounded there: the ODE is integrated to
    t_min = 1 / T (DDPM's first step) and finished with the x0 prediction, as DDIM's last step is.
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        from scipy.interpolate import CubicSpline

        self.num_steps, self.beta_start, self.beta_end = int(num_steps), float(beta_start), float(beta_end)
        self.t_min = 1.0 / self.num_steps
        log_ab = torch.log(ldm_linear_alphas_cumprod(self.num_steps, self.beta_start, self.beta_end))
        knots = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        values = torch.cat([torch.zeros(1, dtype=torch.float64), log_ab])  # log(alphabar) at t = k / T, k = 0..T
        # per-segment cubic coefficients, highest power first: c[:, k] on [k/T, (k+1)/T]
        self._coef = torch.from_numpy(CubicSpline(knots.numpy(), values.numpy(), bc_type="natural").c.copy())

    def _segment(self, t: torch.Tensor):
        """log(alphabar_t) and its t-derivative, in float64."""
        coef = self._coef.to(t.device)
        pos = t.double().clamp(0.0, 1.0) * self.num_steps
        k = pos.floor().clamp(max=self.num_steps - 1).long()
        x = (pos - k) / self.num_steps  # offset from the segment's left knot, in t units
        c3, c2, c1, c0 = coef[0, k], coef[1, k], coef[2, k], coef[3, k]
        log_ab = ((c3 * x + c2) * x + c1) * x + c0
        slope = (3 * c3 * x + 2 * c2) * x + c1
        return log_ab, slope

    def alphabar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._segment(t)[0]).to(t.dtype)

    def a(self, t):
        return torch.exp(0.5 * self._segment(t)[0]).to(t.dtype)

    def b(self, t):
        log_ab, _ = self._segment(t)
        return torch.sqrt((-torch.expm1(log_ab)).clamp(min=0.0)).to(t.dtype)

    def da(self, t):
        log_ab, slope = self._segment(t)
        return (0.5 * torch.exp(0.5 * log_ab) * slope).to(t.dtype)

    def db(self, t):
        # b = sqrt(1 - ab)  =>  b' = -ab' / (2 b) = -ab * slope / (2 b)
        log_ab, slope = self._segment(t)
        ab = torch.exp(log_ab)
        return (-ab * slope / (2.0 * torch.sqrt((-torch.expm1(log_ab)).clamp(min=0.0)))).to(t.dtype)


class CosineVPPath(AffinePath):
    """The cosine VP path ("eps/cos", "v/cos"): a_t = cos(pi t / 2), b_t = sin(pi t / 2).

    a_1 = 0, so an eps-prediction cannot recover x0 at t = 1: sampling starts at ``t_max`` (< 1).
    """

    def __init__(self, t_max: float = 0.999):
        if not 0.0 < t_max <= 1.0:
            raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
        self.t_max = float(t_max)

    def a(self, t):
        return torch.cos(0.5 * math.pi * t)

    def b(self, t):
        return torch.sin(0.5 * math.pi * t)

    def da(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def db(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)
