"""Loss weightings w_t in SD3's unified form L_w = -1/2 E[w_t lambda'_t ||eps_hat - eps||^2] (SD3 §2).

A weighting is applied as a per-sample multiplier on the plain MSE of whatever the network
predicts: multiplier = (-1/2 w_t lambda'_t) / c_p(t), where c_p is the parametrisation's
``eps_scale``. "native" means no multiplier at all: the plain MSE of the prediction.
Weightings are written as functions of the log-SNR lambda where the literature does, so the same
name means the same weighting on any path.
"""

import torch

from flowmatch.parametrisation import Parametrisation
from flowmatch.paths.base import AffinePath

_T_CLAMP = 1e-6  # weights are computed in float64 at t clamped into [1e-6, 1 - 1e-6]


class Weighting:
    """Base class: ``w(t, path)`` is SD3's w_t."""

    name: str = ""

    def w(self, t: torch.Tensor, path: AffinePath) -> torch.Tensor:
        raise NotImplementedError

    def multiplier(self, t: torch.Tensor, path: AffinePath, param: Parametrisation) -> torch.Tensor | None:
        t64 = t.detach().double().clamp(_T_CLAMP, 1.0 - _T_CLAMP)
        eps_space = -0.5 * self.w(t64, path) * path.d_log_snr(t64)
        return (eps_space / param.eps_scale(t64, path)).to(t.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NativeWeighting(Weighting):
    """Plain MSE of the network's own prediction (velocity MSE for FM/RF, eps MSE for DDPM)."""

    name = "native"

    def multiplier(self, t, path, param):
        return None


class EpsMSEWeighting(Weighting):
    """Plain eps-MSE: -1/2 w_t lambda'_t = 1, i.e. w_t = -2 / lambda'_t (LDM's "simple" loss)."""

    name = "eps"

    def w(self, t, path):
        return -2.0 / path.d_log_snr(t)


class VelocityMSEWeighting(Weighting):
    """Conditional flow matching's velocity MSE on the path: w_t = -1/2 lambda'_t b_t^2."""

    name = "velocity"

    def w(self, t, path):
        return -0.5 * path.d_log_snr(t) * path.b(t) ** 2


class RectifiedFlowWeighting(Weighting):
    """Rectified flow's effective weighting w = t / (1 - t) on its own path, i.e. w(lambda) = exp(-lambda / 2).

    Written in lambda so it transfers to any path: this is "eps-DDPM re-weighted to match rf".
    """

    name = "rf"

    def w(self, t, path):
        return torch.exp(-0.5 * path.log_snr(t))


class VMSEWeighting(Weighting):
    """Plain v-MSE (v = a eps - b x0): -1/2 w_t lambda'_t = ((a^2 + b^2) / a)^2."""

    name = "v"

    def w(self, t, path):
        a, b = path.a(t), path.b(t)
        return -2.0 * ((a * a + b * b) / a) ** 2 / path.d_log_snr(t)


WEIGHTINGS = {w.name: w for w in (NativeWeighting, EpsMSEWeighting, VelocityMSEWeighting, RectifiedFlowWeighting, VMSEWeighting)}


def get_weighting(name: str) -> Weighting:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name]()
