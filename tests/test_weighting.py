"""Loss weightings in SD3's unified form L_w = -1/2 E[w_t lambda'_t ||eps_hat - eps||^2] (docs/spec.md §2).

A weighting multiplies the plain MSE of the prediction by m = (-1/2 w_t lambda'_t) / c_p(t).
Expected values are derived by hand for the rectified-flow path (lambda' = -2 / (t (1 - t))).
"""

import math

import pytest
import torch

from flowmatch.parametrisation import EpsPrediction, VelocityPrediction, VPrediction, X0Prediction
from flowmatch.paths import CosineVPPath, LinearVPPath, OTPath, RectifiedFlowPath
from flowmatch.weighting import WEIGHTINGS, get_weighting

F64 = torch.float64
T = torch.linspace(0.05, 0.95, 19, dtype=F64)
RF = RectifiedFlowPath()
PATHS = {"rf": RF, "ot": OTPath(1e-2), "linear_vp": LinearVPPath(), "cosine_vp": CosineVPPath()}
PARAMS = {"velocity": VelocityPrediction(), "eps": EpsPrediction(), "v": VPrediction(), "x0": X0Prediction()}


def test_velocity_mse_weighting_on_rf_is_t_over_1_minus_t():
    # SD3 §2: w = -1/2 lambda' b^2 = -1/2 * (-2 / (t (1-t))) * t^2 = t / (1 - t)
    torch.testing.assert_close(get_weighting("velocity").w(T, RF), T / (1 - T))


def test_rf_weighting_is_t_over_1_minus_t_on_rf_path():
    torch.testing.assert_close(get_weighting("rf").w(T, RF), T / (1 - T))
    # and it is written in lambda: w = exp(-lambda / 2) = b / a, e.g. tan(pi t / 2) on the cosine path
    torch.testing.assert_close(get_weighting("rf").w(T, CosineVPPath()), torch.tan(math.pi * T / 2))


@pytest.mark.parametrize("pname", list(PATHS))
def test_native_loss_weightings_have_multiplier_one(pname):
    # the plain MSE of a prediction is its own weighting, on every path
    path = PATHS[pname]
    for wname, param in [("velocity", VelocityPrediction()), ("eps", EpsPrediction()), ("v", VPrediction())]:
        m = get_weighting(wname).multiplier(T, path, param)
        torch.testing.assert_close(m, torch.ones_like(T), rtol=1e-9, atol=1e-9)
    # also in float32, and away from the cell midpoints of LinearVPPath
    t32 = torch.rand(50, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
    m = get_weighting("velocity").multiplier(t32, path, VelocityPrediction())
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, torch.ones_like(t32), rtol=1e-5, atol=1e-5)


def test_native_returns_none():
    for pname, path in PATHS.items():
        for param in PARAMS.values():
            assert get_weighting("native").multiplier(T, path, param) is None


def test_eps_prediction_on_rf_with_rf_weighting():
    # -1/2 w lambda' / c_eps = -1/2 * t/(1-t) * (-2/(t(1-t))) / 1 = 1 / (1 - t)^2
    m = get_weighting("rf").multiplier(T, RF, EpsPrediction())
    torch.testing.assert_close(m, 1 / (1 - T) ** 2)


def test_rf_weighting_of_rf_velocity_is_plain_velocity_mse():
    # c_velocity on RF = 1/(1-t)^2, eps-space weight 1/(1-t)^2  ->  multiplier 1
    torch.testing.assert_close(get_weighting("rf").multiplier(T, RF, VelocityPrediction()), torch.ones_like(T))


def test_eps_weighting_of_rf_velocity():
    # plain eps-MSE (eps-space weight 1) for a velocity model on RF: multiplier 1 / c_v = (1 - t)^2
    torch.testing.assert_close(get_weighting("eps").multiplier(T, RF, VelocityPrediction()), (1 - T) ** 2)


def test_rf_weighting_on_cosine_eps():
    # w = tan(pi t/2), lambda' = -2 pi / sin(pi t): -1/2 w lambda' = pi / (2 cos^2(pi t / 2))
    m = get_weighting("rf").multiplier(T, CosineVPPath(), EpsPrediction())
    torch.testing.assert_close(m, math.pi / (2 * torch.cos(math.pi * T / 2) ** 2))


@pytest.mark.parametrize("pname", list(PATHS))
@pytest.mark.parametrize("param", list(PARAMS))
def test_multiplier_times_mse_is_unified_eps_loss(pname, param):
    # For any wrong eps_hat at fixed z: m * ||out_hat - out||^2 == -1/2 w lambda' ||eps_hat - eps||^2,
    # with lambda' by finite differences and the outputs built from (x0_hat, eps_hat) here.
    path, p = PATHS[pname], PARAMS[param]
    g = torch.Generator().manual_seed(7)
    n = 16
    t = (torch.randint(50, 950, (n,), generator=g).double() + 0.5) / 1000
    x0, eps, delta = (torch.randn(n, 4, generator=g, dtype=F64) for _ in range(3))
    h = 1e-7
    a, b = path.a(t)[:, None], path.b(t)[:, None]
    da = ((path.a(t + h) - path.a(t - h)) / (2 * h))[:, None]
    db = ((path.b(t + h) - path.b(t - h)) / (2 * h))[:, None]
    dlam = (path.log_snr(t + h) - path.log_snr(t - h)) / (2 * h)
    z = a * x0 + b * eps
    eps_hat = eps + delta
    x0_hat = (z - b * eps_hat) / a

    def out(x, n_):
        return {"velocity": da * x + db * n_, "eps": n_, "v": a * n_ - b * x, "x0": x}[param]

    mse = (out(x0_hat, eps_hat) - out(x0, eps)).pow(2).sum(1)
    for wname in ("eps", "velocity", "rf", "v"):
        wt = get_weighting(wname).w(t, path)
        lhs = get_weighting(wname).multiplier(t, path, p) * mse
        rhs = -0.5 * wt * dlam * delta.pow(2).sum(1)
        torch.testing.assert_close(lhs, rhs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("pname", list(PATHS))
def test_multipliers_finite_at_the_ends(pname):
    # t = 0 and t = 1 are clamped into (0, 1): no inf / nan leaks into the loss
    t = torch.tensor([0.0, 1.0])
    for wname in ("eps", "velocity", "rf", "v"):
        for param in PARAMS.values():
            m = get_weighting(wname).multiplier(t, PATHS[pname], param)
            assert m.dtype == torch.float32 and torch.isfinite(m).all(), (wname, param)


def test_get_weighting():
    assert set(WEIGHTINGS) == {"native", "eps", "velocity", "rf", "v"}
    with pytest.raises(ValueError, match="min_snr"):
        get_weighting("min_snr")
