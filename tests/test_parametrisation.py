"""Parametrisations (velocity, eps, v, x0): targets, conversion to a velocity, and eps_scale c_p(t).

Ground truth is built in the test from x0, eps and the path's a_t, b_t only; derivatives
come from finite differences, so nothing relies on the code's own conversion formulas.
"""

import math

import pytest
import torch

from flowmatch.parametrisation import (
    EpsPrediction,
    VelocityPrediction,
    VPrediction,
    X0Prediction,
    get_parametrisation,
)
from flowmatch.paths import CosineVPPath, LinearVPPath, OTPath, PathSample, RectifiedFlowPath

F64 = torch.float64
H = 1e-7

PATHS = {
    "rf": RectifiedFlowPath(),
    "ot": OTPath(sigma_min=1e-2),
    "linear_vp": LinearVPPath(),
    "cosine_vp": CosineVPPath(),
}
PARAMS = {"velocity": VelocityPrediction(), "eps": EpsPrediction(), "v": VPrediction(), "x0": X0Prediction()}


def setup(seed=0, n=32):
    """float64 data, noise and times in the middle of LDM grid cells, away from t = 0 and t = 1."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 2, generator=g, dtype=F64)
    eps = torch.randn(n, 3, 2, generator=g, dtype=F64)
    t = (torch.randint(50, 950, (n,), generator=g).double() + 0.5) / 1000
    return x0, eps, t


def e(v):
    return v[:, None, None]


def fd_coeffs(path, t):
    """a, b and their finite-difference derivatives."""
    da = (path.a(t + H) - path.a(t - H)) / (2 * H)
    db = (path.b(t + H) - path.b(t - H)) / (2 * H)
    return path.a(t), path.b(t), da, db


def true_output(name, x0, eps, a, b, da, db):
    """What each parametrisation should predict, from (x0, eps) and the path coefficients."""
    return {
        "velocity": e(da) * x0 + e(db) * eps,  # dz/dt
        "eps": eps,
        "v": e(a) * eps - e(b) * x0,  # Salimans & Ho
        "x0": x0,
    }[name]


@pytest.mark.parametrize("pname", list(PATHS))
@pytest.mark.parametrize("param", list(PARAMS))
def test_target_and_exact_output_gives_true_velocity(pname, param):
    path, p = PATHS[pname], PARAMS[param]
    x0, eps, t = setup()
    a, b, da, db = fd_coeffs(path, t)
    z = e(a) * x0 + e(b) * eps
    dz_true = e(da) * x0 + e(db) * eps
    expected = true_output(param, x0, eps, a, b, da, db)
    # the regression target
    s = PathSample(x0=x0, eps=eps, t=t, z=z, dz=dz_true)
    torch.testing.assert_close(p.target(s, path), expected, rtol=1e-12, atol=1e-12)
    # feeding the exact target as the network output recovers the path's dz/dt
    torch.testing.assert_close(p.to_velocity(expected, z, t, path), dz_true, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pname", list(PATHS))
@pytest.mark.parametrize("param", list(PARAMS))
def test_eps_scale_is_the_squared_error_ratio_at_fixed_z(pname, param):
    # At fixed z, a wrong eps_hat = eps + delta implies x0_hat = (z - b eps_hat) / a, and every
    # prediction is an affine function of eps_hat: ||out_hat - target||^2 = c_p(t) ||delta||^2.
    path, p = PATHS[pname], PARAMS[param]
    x0, eps, t = setup(seed=1)
    a, b, da, db = fd_coeffs(path, t)
    z = e(a) * x0 + e(b) * eps
    delta = 0.3 * torch.randn(eps.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    eps_hat = eps + delta
    x0_hat = (z - e(b) * eps_hat) / e(a)
    out_hat = true_output(param, x0_hat, eps_hat, a, b, da, db)
    target = true_output(param, x0, eps, a, b, da, db)
    ratio = (out_hat - target).pow(2).flatten(1).sum(1) / delta.pow(2).flatten(1).sum(1)
    torch.testing.assert_close(p.eps_scale(t, path), ratio, rtol=1e-6, atol=1e-9)


def test_eps_scale_closed_forms():
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    rf, cos = RectifiedFlowPath(), CosineVPPath()
    # RF velocity: v = -z/(1-t) + eps/(1-t) at fixed z  ->  c = 1/(1-t)^2
    torch.testing.assert_close(VelocityPrediction().eps_scale(t, rf), 1 / (1 - t) ** 2)
    # RF x0: x0 = (z - t eps)/(1-t)  ->  c = (t/(1-t))^2
    torch.testing.assert_close(X0Prediction().eps_scale(t, rf), (t / (1 - t)) ** 2)
    # cosine v: v = a eps - b x0 = eps/a - (b/a) z  ->  c = 1/cos^2(pi t/2)
    torch.testing.assert_close(VPrediction().eps_scale(t, cos), 1 / torch.cos(math.pi * t / 2) ** 2)
    # cosine velocity: (a b' - a' b)/a = (pi/2)/cos(pi t/2)
    torch.testing.assert_close(VelocityPrediction().eps_scale(t, cos), (math.pi / 2) ** 2 / torch.cos(math.pi * t / 2) ** 2)
    # eps: 1 everywhere
    torch.testing.assert_close(EpsPrediction().eps_scale(t, cos), torch.ones_like(t))


def test_rf_conversions_by_hand():
    # RF, t = 0.25, x0 = (2, -1), eps = (0.5, 3): z = (1.625, 0), dz/dt = eps - x0 = (-1.5, 4).
    rf, t = RectifiedFlowPath(), torch.tensor([0.25], dtype=F64)
    x0, eps = torch.tensor([[2.0, -1.0]], dtype=F64), torch.tensor([[0.5, 3.0]], dtype=F64)
    z, dz = torch.tensor([[1.625, 0.0]], dtype=F64), torch.tensor([[-1.5, 4.0]], dtype=F64)
    torch.testing.assert_close(EpsPrediction().to_velocity(eps, z, t, rf), dz)
    torch.testing.assert_close(X0Prediction().to_velocity(x0, z, t, rf), dz)
    v = 0.75 * eps - 0.25 * x0  # a eps - b x0
    torch.testing.assert_close(VPrediction().to_velocity(v, z, t, rf), dz)
    torch.testing.assert_close(VelocityPrediction().to_velocity(dz, z, t, rf), dz)


@pytest.mark.parametrize("param", list(PARAMS))
def test_float32_conversion(param):
    path, p = CosineVPPath(), PARAMS[param]
    x0, eps, t = (x.float() for x in setup(seed=3))
    s = path.sample(x0, eps, t)
    v = p.to_velocity(p.target(s, path), s.z, t, path)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, s.dz, rtol=1e-4, atol=1e-4)


def test_get_parametrisation():
    for name, cls in [("velocity", VelocityPrediction), ("eps", EpsPrediction), ("v", VPrediction), ("x0", X0Prediction)]:
        assert type(get_parametrisation(name)) is cls
    with pytest.raises(ValueError, match="score"):
        get_parametrisation("score")
