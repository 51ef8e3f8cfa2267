"""Straightness of a flow's ODE paths (Rectified Flow, Liu et al. 2022; docs/spec.md §5).

    S(Z) = integral_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt

is 0 exactly when every path is a straight line walked at constant speed. The formula reads the
same in either time direction: in the platform's convention (t = 1 noise, t = 0 data, dz/dt = v)
a path starts at z_1 = eps, ends at z_0 = the sample, and is straight iff v(z_t, t) = z_1 - z_0 =
eps - x0 for all t, the rectified-flow target. (In the paper's time s = 1 - t both the chord and
the velocity change sign, and the squared norm does not see it.)

Estimate: integrate with ``steps`` Euler steps on a uniform grid from t_max to t_min, evaluating
v_k at each step's start t_k. Over that Euler path the chord is exactly the mean velocity,
(z_1 - z_0) / T = mean_k v_k (T = t_max - t_min, 1 for flow paths), so

    S_hat = mean_k E || mean_j v_j - v_k ||^2 = E [ mean_k ||v_k||^2 - ||mean_k v_k||^2 ],

the variance of the velocity along each path, accumulated on the fly in float64 without storing
the path. It converges to S with the Euler path (error O(1 / steps)).

Also reported: ``normalized`` = S / E||(z_1 - z_0) / T||^2 (scale-free; 0 straight), the path length
ratio E[arc length] / E[|z_1 - z_0|] (1 for straight paths walked one way), and the total curvature
E sum_k angle(v_k, v_{k+1}) (the tangent's total turning, radians; 0 for straight paths, omega for
a rotation by omega), and the paper's bound's numerator E||z_1 - z_0||^2 (``displacement``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from flowmatch.sampling.guidance import guided_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class StraightnessResult:
    straightness: float  # S, the RF paper's straightness
    normalized: float  # S / E||chord||^2
    length_ratio: float  # E[arc length] / E[chord length]
    curvature: float  # E[total turning angle of the velocity] (radians)
    displacement: float  # E||z_1 - z_0||^2
    steps: int
    nfe: int
    num: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _angle(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The angle between the rows of u and w (float64), stable near 0 and pi; 0 where either is ~0."""
    nu, nw = u.norm(dim=1, keepdim=True), w.norm(dim=1, keepdim=True)
    ok = (nu[:, 0] > 1e-12) & (nw[:, 0] > 1e-12)
    uh, wh = u / nu.clamp_min(1e-12), w / nw.clamp_min(1e-12)
    angle = 2 * torch.atan2((uh - wh).norm(dim=1), (uh + wh).norm(dim=1))
    return torch.where(ok, angle, torch.zeros_like(angle))


@torch.no_grad()
def path_straightness(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int = 100, cond: Any = None,
                      t_max: float = 1.0, t_min: float = 0.0) -> tuple[dict[str, torch.Tensor], int]:
    """Per-path statistics of the Euler paths of ``velocity_fn(z, t, cond)`` from ``noise`` at t_max to t_min.

    Returns ({"straightness", "chord_sq", "arc", "chord", "turning"}: (B,) float64 tensors, one per path), nfe.
    """
    if steps < 2:
        raise ValueError(f"straightness needs at least 2 steps, got {steps}")
    if not 0 <= t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
    T = t_max - t_min
    dt = -T / steps
    z = noise
    b = noise.shape[0]
    sum_v = torch.zeros(b, noise[0].numel(), dtype=torch.float64, device=noise.device)
    sum_sq = torch.zeros(b, dtype=torch.float64, device=noise.device)
    arc = torch.zeros_like(sum_sq)
    turning = torch.zeros_like(sum_sq)
    prev = None
    for k in range(steps):
        t = t_max - k * T / steps
        v = velocity_fn(z, torch.full((b,), t, dtype=z.dtype, device=z.device), cond)
        v64 = v.detach().reshape(b, -1).double()
        sum_v += v64
        speed_sq = v64.pow(2).sum(1)
        sum_sq += speed_sq
        arc += speed_sq.sqrt() * T / steps
        if prev is not None:
            turning += _angle(prev, v64)
        prev = v64
        z = z + dt * v
    mean_v = sum_v / steps  # = (z_start - z_end) / T over the Euler path
    per_path = {
        "straightness": (sum_sq / steps - mean_v.pow(2).sum(1)).clamp_min(0.0),
        "chord_sq": mean_v.pow(2).sum(1),  # ||(z_1 - z_0) / T||^2
        "arc": arc,
        "chord": mean_v.pow(2).sum(1).sqrt() * T,
        "turning": turning,
    }
    return per_path, steps


def straightness_of_field(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int = 100, cond: Any = None,
                          t_max: float = 1.0, t_min: float = 0.0) -> StraightnessResult:
    """Straightness S and path statistics of any velocity field ``velocity_fn(z, t, cond)``, from the given noise."""
    per, nfe = path_straightness(velocity_fn, noise, steps, cond, t_max, t_min)
    return _summarise(per, steps, nfe, noise.shape[0], T=t_max - t_min)


def _summarise(per: dict[str, torch.Tensor], steps: int, nfe: int, num: int, T: float) -> StraightnessResult:
    s, chord_sq = float(per["straightness"].mean()), float(per["chord_sq"].mean())
    return StraightnessResult(
        straightness=s,
        normalized=s / chord_sq if chord_sq > 0 else 0.0,
        length_ratio=float(per["arc"].mean() / per["chord"].mean()) if float(per["chord"].mean()) > 0 else 1.0,
        curvature=float(per["turning"].mean()),
        displacement=chord_sq * T * T,
        steps=steps,
        nfe=nfe,
        num=num,
    )


def _rows(cond: Any, lo: int, hi: int, device) -> Any:
    """Rows lo:hi of a condition: a tensor, or a dict of tensors (a text model's {"pooled", "tokens", "mask"})."""
    if isinstance(cond, dict):
        return {k: v[lo:hi].to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}
    return cond[lo:hi].to(device)


@torch.no_grad()
def straightness(model, num: int = 1000, steps: int = 100, seed: int = 0, cond: Any = None, guidance: float = 1.0,
                 noise: torch.Tensor | None = None, batch_size: int = 8192) -> StraightnessResult:
    """Straightness of a trained objective's sampling ODE, from ``num`` noises drawn with ``seed``.

    ``model`` is a FlowObjective (its ``velocity`` is the learned dz/dt, integrated over the path's
    [t_min, t_max]). ``cond`` (labels, one per sample, or a text model's conditioning dict of tensors
    with one row per sample) and ``guidance`` give the guided field.
    The network runs in eval mode (no condition dropout).
    """
    if noise is None:
        if model.sample_shape is None:
            raise RuntimeError("this model does not know its sample shape: train it first or pass noise")
        noise = torch.randn((num, *model.sample_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    num = noise.shape[0]
    noise = noise.to(model.device)
    t_max, t_min = float(model.path.t_max), float(model.path.t_min)
    was_training = model.net.training
    model.net.eval()
    try:
        parts: dict[str, list[torch.Tensor]] = {}
        nfe = 0
        for lo in range(0, num, batch_size):
            c = None if cond is None else _rows(cond, lo, lo + batch_size, model.device)
            uncond = model.null_condition(c) if guidance != 1.0 else None
            guided = guided_velocity(model.velocity, c, uncond, guidance)
            per, nfe = path_straightness(lambda z, t, _c: guided(z, t), noise[lo : lo + batch_size], steps, None, t_max, t_min)
            for key, value in per.items():
                parts.setdefault(key, []).append(value)
        per = {k: torch.cat(v) for k, v in parts.items()}
    finally:
        model.net.train(was_training)
    return _summarise(per, steps, nfe, num, T=t_max - t_min)
