"""Training-time densities over t in (0, 1) (SD3 §3.1): uniform, logit-normal, mode(s), cosmap.

Each sampler draws t in float32 (even under bf16 training) and knows its own CDF and density,
so tests can check the draws against the formula and a loss weighting can use pi(t).
"""

import math

import torch

_EPS = 1e-6  # keeps draws strictly inside (0, 1); every path is regular there


class TimeSampler:
    """Base class: ``sample(n)`` draws n times; ``cdf`` and ``density`` describe the distribution."""

    def sample(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float32, device=generator.device if generator else "cpu")
        return self.from_uniform(u).clamp(_EPS, 1.0 - _EPS).to(device or "cpu")

    def from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def density(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class UniformTime(TimeSampler):
    """t ~ U(0, 1) (SD3's plain "rf")."""

    def from_uniform(self, u):
        return u

    def cdf(self, t):
        return t.clamp(0.0, 1.0)

    def density(self, t):
        return torch.ones_like(t)


class LogitNormalTime(TimeSampler):
    """t = sigmoid(u), u ~ N(m, s) (SD3's "rf/lognorm(m, s)"; (0, 1) is SD3's best setting)."""

    def __init__(self, m: float = 0.0, s: float = 1.0):
        if s <= 0:
            raise ValueError(f"logit-normal scale s must be > 0, got {s}")
        self.m, self.s = float(m), float(s)

    def sample(self, n, device=None, generator=None):
        u = torch.randn(n, generator=generator, dtype=torch.float32, device=generator.device if generator else "cpu")
        return torch.sigmoid(self.m + self.s * u).clamp(_EPS, 1.0 - _EPS).to(device or "cpu")

    def from_uniform(self, u):
        # inverse-CDF form, used where a caller needs a deterministic map from uniforms
        normal = torch.distributions.Normal(self.m, self.s)
        return torch.sigmoid(normal.icdf(u.clamp(_EPS, 1 - _EPS)))

    def cdf(self, t):
        logit = torch.log(t) - torch.log1p(-t)
        return 0.5 * (1.0 + torch.erf((logit - self.m) / (self.s * math.sqrt(2.0))))

    def density(self, t):
        logit = torch.log(t) - torch.log1p(-t)
        return torch.exp(-0.5 * ((logit - self.m) / self.s) ** 2) / (self.s * math.sqrt(2 * math.pi) * t * (1 - t))


class ModeTime(TimeSampler):
    """SD3's mode sampling with heavy tails: t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1).

    f is decreasing (hence a valid change of variables) for -1 <= s <= 2 / (pi - 2) ~ 1.75;
    s = 0 is uniform, s > 0 puts more mass at mid t. SD3's best: s = 1.29.
    """

    def __init__(self, s: float = 1.29):
        if not -1.0 <= s <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"mode scale s must lie in [-1, 2/(pi-2) = {2 / (math.pi - 2):.4f}], got {s}")
        self.s = float(s)

    def from_uniform(self, u):
        return 1.0 - u - self.s * (torch.cos(0.5 * math.pi * u) ** 2 - 1.0 + u)

    def _df(self, u):
        return -1.0 - self.s * (1.0 - 0.5 * math.pi * torch.sin(math.pi * u))

    def _inverse(self, t: torch.Tensor) -> torch.Tensor:
        """u with f(u) = t, by bisection (f is monotone decreasing); float64 for accuracy."""
        t = t.double()
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.from_uniform(mid) > t  # f decreasing: f(mid) > t means the root is right of mid
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def cdf(self, t):
        return (1.0 - self._inverse(t)).to(t.dtype)

    def density(self, t):
        return (1.0 / self._df(self._inverse(t)).abs()).to(t.dtype)


class CosMapTime(TimeSampler):
    """SD3's "rf/cosmap": t = 1 - 1 / (tan(pi u / 2) + 1), matching the cosine schedule's log-SNR density."""

    def from_uniform(self, u):
        return 1.0 - 1.0 / (torch.tan(0.5 * math.pi * u) + 1.0)

    def cdf(self, t):
        return (2.0 / math.pi) * torch.atan(t / (1.0 - t))

    def density(self, t):
        return (2.0 / math.pi) / ((1.0 - t) ** 2 + t**2)
