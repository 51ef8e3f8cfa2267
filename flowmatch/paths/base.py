"""The affine path interface: z_t = a_t * x0 + b_t * eps, and what follows from a_t, b_t alone."""

from dataclasses import dataclass

import torch


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values t (B,) to broadcast against x (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


@dataclass
class PathSample:
    """One draw from the path: the data x0, the noise eps, the time t (B,), the point z_t and dz_t/dt."""

    x0: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    z: torch.Tensor
    dz: torch.Tensor


class AffinePath:
    """Base class: subclasses define a(t), b(t) and their time derivatives da(t), db(t).

    Everything else (the point z_t, its velocity, the log-SNR lambda_t and lambda'_t, and the
    conversions between x0, eps and velocity) is generic and lives here.
    ``t_max`` is the latest time sampling may start from (1.0 unless a_t vanishes there in a way
    that makes some parametrisations singular); ``t_min`` the earliest time the ODE is integrated
    to (0.0 unless the velocity is singular at t = 0); from there sampling jumps to the x0 prediction.
    """

    t_max: float = 1.0
    t_min: float = 0.0

    def a(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def b(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def da(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def db(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- generic consequences -------------------------------------------------------------
    def sample(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> PathSample:
        """z_t = a_t x0 + b_t eps and its time derivative dz_t/dt = a'_t x0 + b'_t eps."""
        a, b = expand_like(self.a(t), x0), expand_like(self.b(t), x0)
        da, db = expand_like(self.da(t), x0), expand_like(self.db(t), x0)
        return PathSample(x0=x0, eps=eps, t=t, z=a * x0 + b * eps, dz=da * x0 + db * eps)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t = log(a_t^2 / b_t^2)."""
        return 2.0 * (torch.log(self.a(t)) - torch.log(self.b(t)))

    def d_log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda'_t = 2 a'_t / a_t - 2 b'_t / b_t."""
        return 2.0 * (self.da(t) / self.a(t) - self.db(t) / self.b(t))

    def velocity_from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The conditional field u_t = a'_t x0 + b'_t eps."""
        return expand_like(self.da(t), x0) * x0 + expand_like(self.db(t), x0) * eps

    def velocity_from_eps(self, eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """docs/spec.md §2: u_t(z | eps) = (a'_t / a_t) z_t - (b_t / 2) lambda'_t eps."""
        a, da = expand_like(self.a(t), z), expand_like(self.da(t), z)
        b, dlam = expand_like(self.b(t), z), expand_like(self.d_log_snr(t), z)
        return (da / a) * z - 0.5 * b * dlam * eps

    def x0_eps_from_velocity(self, v: torch.Tensor, z: torch.Tensor, t: torch.Tensor):
        """Invert (z, v) = (a x0 + b eps, a' x0 + b' eps) for (x0, eps); the determinant a b' - a' b > 0."""
        a, b = expand_like(self.a(t), z), expand_like(self.b(t), z)
        da, db = expand_like(self.da(t), z), expand_like(self.db(t), z)
        det = a * db - da * b
        return (db * z - b * v) / det, (a * v - da * z) / det

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
