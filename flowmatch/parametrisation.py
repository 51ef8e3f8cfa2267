"""What the network predicts, its regression target, and its conversion to a velocity.

Every parametrisation also reports ``eps_scale(t, path)``: the factor c_p(t) with
||out - target||^2 = c_p(t) ||eps_hat - eps||^2. It places the plain MSE of any prediction inside
SD3's unified eps-space loss, which is how loss weightings are compared across parametrisations.
"""

import torch

from flowmatch.paths.base import AffinePath, PathSample, expand_like


class Parametrisation:
    """Base class; subclasses name the prediction and implement the three conversions."""

    name: str = ""

    def target(self, s: PathSample, path: AffinePath) -> torch.Tensor:
        raise NotImplementedError

    def to_velocity(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, path: AffinePath) -> torch.Tensor:
        raise NotImplementedError

    def eps_scale(self, t: torch.Tensor, path: AffinePath) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VelocityPrediction(Parametrisation):
    """The network predicts dz_t/dt = a'_t x0 + b'_t eps (flow matching, rectified flow)."""

    name = "velocity"

    def target(self, s, path):
        return s.dz

    def to_velocity(self, out, z, t, path):
        return out

    def eps_scale(self, t, path):
        # z fixed: x0 = (z - b eps) / a, so v - v_hat = (b' - a' b / a)(eps - eps_hat)
        return ((path.a(t) * path.db(t) - path.da(t) * path.b(t)) / path.a(t)) ** 2


class EpsPrediction(Parametrisation):
    """The network predicts the noise eps (DDPM / LDM)."""

    name = "eps"

    def target(self, s, path):
        return s.eps

    def to_velocity(self, out, z, t, path):
        return path.velocity_from_eps(out, z, t)

    def eps_scale(self, t, path):
        return torch.ones_like(t)


class VPrediction(Parametrisation):
    """The network predicts v = a_t eps - b_t x0 (Salimans & Ho; SD3's "v/cos")."""

    name = "v"

    def target(self, s, path):
        a, b = expand_like(path.a(s.t), s.x0), expand_like(path.b(s.t), s.x0)
        return a * s.eps - b * s.x0

    def to_velocity(self, out, z, t, path):
        a, b = expand_like(path.a(t), z), expand_like(path.b(t), z)
        norm = a * a + b * b
        x0, eps = (a * z - b * out) / norm, (b * z + a * out) / norm
        return path.velocity_from_x0_eps(x0, eps, t)

    def eps_scale(self, t, path):
        # v - v_hat = a (eps - eps_hat) - b (x0 - x0_hat) = ((a^2 + b^2) / a)(eps - eps_hat)
        a, b = path.a(t), path.b(t)
        return ((a * a + b * b) / a) ** 2


class X0Prediction(Parametrisation):
    """The network predicts the clean data x0."""

    name = "x0"

    def target(self, s, path):
        return s.x0

    def to_velocity(self, out, z, t, path):
        eps = (z - expand_like(path.a(t), z) * out) / expand_like(path.b(t), z)
        return path.velocity_from_x0_eps(out, eps, t)

    def eps_scale(self, t, path):
        return (path.b(t) / path.a(t)) ** 2


PARAMETRISATIONS = {p.name: p for p in (VelocityPrediction, EpsPrediction, VPrediction, X0Prediction)}


def get_parametrisation(name: str) -> Parametrisation:
    if name not in PARAMETRISATIONS:
        raise ValueError(f"unknown parametrisation {name!r}; choose one of {sorted(PARAMETRISATIONS)}")
    return PARAMETRISATIONS[name]()
