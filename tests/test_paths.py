"""Affine paths z_t = a_t x0 + b_t eps (t = 0 data, t = 1 noise) against closed forms (docs/spec.md §1-2).

Every expected number here is written out by hand or computed independently of flowmatch
(finite differences, numpy's own LDM schedule), never with the path's own formulas.
"""

import math

import numpy as np
import pytest
import torch

from flowmatch.paths import CosineVPPath, LinearVPPath, OTPath, RectifiedFlowPath

F64 = torch.float64
T_STEPS = 1000


def ldm_alphabar_numpy() -> np.ndarray:
    """LDM "scaled linear" schedule, written independently: betas = linspace(sqrt b0, sqrt b1, T)^2."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T_STEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def tt(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def midpoints(n: int, seed: int = 0) -> torch.Tensor:
    """Random times at the middle of LDM grid cells (k + 1/2) / 1000: regular points of every path."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(20, 980, (n,), generator=g)
    return (k.double() + 0.5) / T_STEPS


ALL_PATHS = {
    "rf": RectifiedFlowPath(),
    "ot": OTPath(sigma_min=1e-2),
    "ot_default": OTPath(),
    "linear_vp": LinearVPPath(),
    "cosine_vp": CosineVPPath(),
}


# --- hand-computed points ------------------------------------------------------------------
X0 = torch.tensor([[2.0, -1.0]], dtype=F64)
EPS = torch.tensor([[0.5, 3.0]], dtype=F64)


def test_rectified_flow_by_hand():
    # a = 1 - t, b = t at t = 0.25: z = 0.75 x0 + 0.25 eps, dz/dt = eps - x0.
    s = RectifiedFlowPath().sample(X0, EPS, tt(0.25))
    torch.testing.assert_close(s.z, torch.tensor([[1.625, 0.0]], dtype=F64))
    torch.testing.assert_close(s.dz, torch.tensor([[-1.5, 4.0]], dtype=F64))
    # log-SNR lambda = 2 log((1 - t) / t) = 2 log 3 at t = 0.25
    torch.testing.assert_close(RectifiedFlowPath().log_snr(tt(0.25)), tt(2 * math.log(3.0)))


def test_ot_path_by_hand():
    # sigma_min = 0.1, t = 0.25: b = 0.1 + 0.9 * 0.25 = 0.325; target (1 - sigma_min) eps - x0.
    s = OTPath(sigma_min=0.1).sample(X0, EPS, tt(0.25))
    torch.testing.assert_close(s.z, torch.tensor([[1.5 + 0.1625, -0.75 + 0.975]], dtype=F64))
    torch.testing.assert_close(s.dz, torch.tensor([[0.45 - 2.0, 2.7 + 1.0]], dtype=F64))


@pytest.mark.parametrize("sigma_min", [0.0, 1e-4, 0.05])
def test_ot_path_is_lipman_path_in_his_own_time(sigma_min):
    # Lipman: t' = 1 - t, x1 = data (our x0), his x0 = noise (our eps).
    # psi_t'(noise) = t' x1 + (1 - (1 - sigma_min) t') noise, d psi / dt' = x1 - (1 - sigma_min) noise.
    # Our time runs the other way, so dz/dt = - d psi / dt'.
    g = torch.Generator().manual_seed(1)
    data, noise = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    t_lip = torch.linspace(0.0, 1.0, 6, dtype=F64)
    s = OTPath(sigma_min).sample(data, noise, 1.0 - t_lip)
    mu, sigma = t_lip[:, None] * data, 1.0 - (1.0 - sigma_min) * t_lip[:, None]
    torch.testing.assert_close(s.z, mu + sigma * noise)
    torch.testing.assert_close(-s.dz, data - (1.0 - sigma_min) * noise)


def test_ot_path_endpoints_and_validation():
    p = OTPath(sigma_min=1e-4)
    # a_0 = 1, b_0 = sigma_min (data end keeps sigma_min noise), a_1 = 0, b_1 = 1.
    torch.testing.assert_close(p.a(tt(0.0, 1.0)), tt(1.0, 0.0))
    torch.testing.assert_close(p.b(tt(0.0, 1.0)), tt(1e-4, 1.0))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            OTPath(sigma_min=bad)


def test_cosine_vp_by_hand():
    # a = cos(pi t / 2), b = sin(pi t / 2) at t = 1/3: a = sqrt(3)/2, b = 1/2,
    # a' = -pi/2 * 1/2, b' = pi/2 * sqrt(3)/2; lambda = 2 log(cot(pi/6)) = log 3, lambda' = -2 pi / sin(pi t).
    p, t = CosineVPPath(), tt(1.0 / 3.0)
    torch.testing.assert_close(p.a(t), tt(math.sqrt(3) / 2))
    torch.testing.assert_close(p.b(t), tt(0.5))
    torch.testing.assert_close(p.da(t), tt(-math.pi / 4))
    torch.testing.assert_close(p.db(t), tt(math.pi * math.sqrt(3) / 4))
    torch.testing.assert_close(p.log_snr(t), tt(math.log(3.0)))
    torch.testing.assert_close(p.d_log_snr(t), tt(-2 * math.pi / math.sin(math.pi / 3)))
    with pytest.raises(ValueError):
        CosineVPPath(t_max=0.0)
    with pytest.raises(ValueError):
        CosineVPPath(t_max=1.5)
    assert CosineVPPath().t_max < 1.0  # a_1 = 0: sampling must start below t = 1


def test_closed_form_log_snr_derivatives():
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    # RF: lambda' = 2 (-1/(1-t) - 1/t) = -2 / (t (1 - t))
    torch.testing.assert_close(RectifiedFlowPath().d_log_snr(t), -2.0 / (t * (1 - t)))
    # OT: lambda = 2 log((1-t) / (s + (1-s) t)), lambda' = -2/(1-t) - 2 (1-s) / (s + (1-s) t)
    s = 0.01
    torch.testing.assert_close(OTPath(s).d_log_snr(t), -2.0 / (1 - t) - 2 * (1 - s) / (s + (1 - s) * t))
    # cosine: lambda' = -2 pi / sin(pi t)
    torch.testing.assert_close(CosineVPPath().d_log_snr(t), -2 * math.pi / torch.sin(math.pi * t))


# --- derivatives by finite differences ------------------------------------------------------
@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_derivatives_match_finite_differences(name):
    # Central differences in float64; LinearVPPath is evaluated at the middle of its grid cells,
    # where it is smooth (log alphabar is linear inside a cell), with h far below the cell width.
    p, t, h = ALL_PATHS[name], midpoints(64), 1e-7
    fd = lambda f: (f(t + h) - f(t - h)) / (2 * h)  # noqa: E731
    torch.testing.assert_close(p.da(t), fd(p.a), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.db(t), fd(p.b), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.d_log_snr(t), fd(p.log_snr), rtol=1e-6, atol=1e-6)
    # lambda = log(a^2 / b^2), computed here from a and b
    torch.testing.assert_close(p.log_snr(t), torch.log(p.a(t) ** 2 / p.b(t) ** 2))


# --- LinearVPPath is LDM's discrete schedule --------------------------------------------------
def test_linear_vp_equals_ldm_schedule_at_grid_points():
    # DDPM step i (0-based) sits at t = (i + 1) / 1000: a_t^2 = alphabar_i, b_t^2 = 1 - alphabar_i.
    ab = ldm_alphabar_numpy()
    p = LinearVPPath()
    t = (torch.arange(T_STEPS, dtype=F64) + 1) / T_STEPS
    ab_t = torch.from_numpy(ab)
    torch.testing.assert_close(p.alphabar(t), ab_t, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.a(t), ab_t.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(p.b(t), (1 - ab_t).sqrt(), rtol=1e-10, atol=0)
    # known LDM values: alphabar_0 = 1 - 0.00085; terminal a_1 = sqrt(alphabar_999) ~ 0.0683
    assert abs(p.alphabar(tt(1e-3)).item() - (1 - 0.00085)) < 1e-12
    assert abs(p.a(tt(1.0)).item() - 0.068265) < 1e-4
    # float32 times at the grid points agree too (to float32 precision)
    torch.testing.assert_close(p.a(t.float()), ab_t.sqrt().float(), rtol=2e-6, atol=1e-7)


def test_linear_vp_is_monotone_and_continuous_between_steps():
    # However the schedule is interpolated between DDPM steps, alphabar must stay between its
    # neighbouring grid values (it decreases), and the path must be continuous.
    ab = np.concatenate([[1.0], ldm_alphabar_numpy()])
    p = LinearVPPath()
    k = np.array([0, 1, 10, 400, 998, 999])
    for frac in (0.25, 0.5, 0.75):
        mid = p.alphabar(torch.from_numpy((k + frac) / T_STEPS)).numpy()
        assert (mid < ab[k]).all() and (mid > ab[k + 1]).all()
    grid = torch.linspace(0, 1, 20001, dtype=F64)
    a, b = p.a(grid), p.b(grid)
    assert (a[1:] < a[:-1]).all() and (b[1:] > b[:-1]).all()
    assert (a[1:] - a[:-1]).abs().max() < 1e-3


@pytest.mark.parametrize("path", [LinearVPPath(), CosineVPPath()], ids=["linear", "cosine"])
def test_vp_paths_preserve_variance_and_start_at_data(path):
    # a_t^2 + b_t^2 = 1; a_0 = 1, b_0 = 0.
    t = torch.cat([tt(0.0, 1e-4, 0.5, 1.0), torch.rand(200, dtype=F64)])
    torch.testing.assert_close(path.a(t) ** 2 + path.b(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-12)
    torch.testing.assert_close(path.a(tt(0.0)), tt(1.0))
    torch.testing.assert_close(path.b(tt(0.0)), tt(0.0))


def test_straight_paths_endpoints():
    p = RectifiedFlowPath()
    torch.testing.assert_close(p.a(tt(0.0, 1.0)), tt(1.0, 0.0))
    torch.testing.assert_close(p.b(tt(0.0, 1.0)), tt(0.0, 1.0))
    torch.testing.assert_close(CosineVPPath().a(tt(1.0)), tt(0.0), atol=1e-15, rtol=0)


# --- generic identities -----------------------------------------------------------------------
def _data(seed=0, shape=(64, 3, 2)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g, dtype=F64)


@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_sample_velocity_is_time_derivative_of_z(name):
    # dz/dt of the sample equals the finite difference of z_t = a_t x0 + b_t eps.
    p, (x0, eps), t, h = ALL_PATHS[name], _data(), midpoints(64, seed=2), 1e-7
    s = p.sample(x0, eps, t)
    fd = (p.sample(x0, eps, t + h).z - p.sample(x0, eps, t - h).z) / (2 * h)
    torch.testing.assert_close(s.dz, fd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.velocity_from_x0_eps(x0, eps, t), s.dz)


@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_sd3_conditional_field_identity(name):
    # docs/spec.md §2: u_t = (a'/a) z - (b/2) lambda' eps  ==  a' x0 + b' eps.
    # Evaluated here with finite-difference a' and lambda' (not the path's own derivatives).
    p, (x0, eps), t, h = ALL_PATHS[name], _data(3), midpoints(64, seed=4), 1e-7
    e = lambda v: v[:, None, None]  # noqa: E731
    a, b = p.a(t), p.b(t)
    da = (p.a(t + h) - p.a(t - h)) / (2 * h)
    db = (p.b(t + h) - p.b(t - h)) / (2 * h)
    dlam = (p.log_snr(t + h) - p.log_snr(t - h)) / (2 * h)
    z = e(a) * x0 + e(b) * eps
    u_identity = e(da / a) * z - 0.5 * e(b * dlam) * eps
    torch.testing.assert_close(u_identity, e(da) * x0 + e(db) * eps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.velocity_from_eps(eps, z, t), e(da) * x0 + e(db) * eps, rtol=1e-6, atol=1e-6)


def test_rf_velocity_from_eps_by_hand():
    # RF: (a'/a) z - (b/2) lambda' eps = -z/(1-t) + eps/(1-t) = eps - x0.
    s = RectifiedFlowPath().sample(X0, EPS, tt(0.25))
    torch.testing.assert_close(RectifiedFlowPath().velocity_from_eps(EPS, s.z, tt(0.25)), EPS - X0)


@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_x0_eps_from_velocity_inverts_sample(name):
    p, (x0, eps) = ALL_PATHS[name], _data(5)
    t = torch.rand(64, generator=torch.Generator().manual_seed(6), dtype=F64) * 0.9 + 0.05
    s = p.sample(x0, eps, t)
    x0_rec, eps_rec = p.x0_eps_from_velocity(s.dz, s.z, t)
    torch.testing.assert_close(x0_rec, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_rec, eps, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(ALL_PATHS))
def test_float32_in_float32_out(name):
    p = ALL_PATHS[name]
    t = torch.rand(8)
    x0, eps = torch.randn(8, 4), torch.randn(8, 4)
    s = p.sample(x0, eps, t)
    assert s.z.dtype == s.dz.dtype == torch.float32
    for f in (p.a, p.b, p.da, p.db):
        assert f(t).dtype == torch.float32
