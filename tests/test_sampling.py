"""Sampling tests against closed forms: docs/spec.md §4 grids, exact Gaussian transport, solver orders, CFG.

Transport problem: rectified-flow path z_t = (1 - t) x0 + t eps with x0 ~ N(mu, diag(s^2)).
Per coordinate, z_t ~ N(m_t, V_t) with m_t = (1 - t) mu and V_t = (1 - t)^2 s^2 + t^2, and the
marginal velocity is the regression E[eps - x0 | z_t = z]. (eps - x0, z_t) are jointly Gaussian
with E[eps - x0] = -mu and Cov(eps - x0, z_t) = t - (1 - t) s^2, so

    v(z, t) = -mu + (t - (1 - t) s^2) / V_t * (z - m_t),

which is also dm_t/dt + (d sqrt(V_t)/dt) (z - m_t) / sqrt(V_t). The flow is affine: it carries
noise eps at t = 1 to exactly mu + s * eps at t = 0, giving a per-point reference.
"""

import math

import pytest
import torch

from flowmatch.sampling import (
    SOLVERS,
    SamplerConfig,
    dopri5,
    flux_mu,
    flux_time_shift,
    get_solver,
    guided_velocity,
    sample,
    shift_time,
    time_grid,
)

MU = torch.tensor([2.0, -1.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.5], dtype=torch.float64)


def gaussian_velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact marginal RF velocity for data N(MU, diag(S^2)) (derivation in the module docstring)."""
    mu, s = MU.to(z.dtype), S.to(z.dtype)
    t = t[:, None]
    var = (1 - t) ** 2 * s**2 + t**2
    return -mu + (t - (1 - t) * s**2) / var * (z - (1 - t) * mu)


def noise(n: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------- grids


def test_sd3_reference_grids():
    expected = {3.0: [1.0, 0.857692, 0.602151, 0.008929, 0.0], 1.0: [1.0, 0.667, 0.334, 0.001, 0.0]}
    for alpha, values in expected.items():
        grid = time_grid(4, shift=alpha, kind="sd3")
        torch.testing.assert_close(grid, torch.tensor(values, dtype=grid.dtype), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["plain", "sd3"])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_grid_endpoints_and_monotone(kind, shift):
    grid = time_grid(10, shift=shift, kind=kind)
    assert grid.shape == (11,)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert torch.all(grid[1:] < grid[:-1])


def test_plain_grid_values_and_t_max():
    torch.testing.assert_close(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = time_grid(4, shift=3.0)
    torch.testing.assert_close(shifted, shift_time(torch.linspace(1, 0, 5, dtype=torch.float64), 3.0))
    scaled = time_grid(4, t_max=0.99)
    assert scaled[0].item() == pytest.approx(0.99) and scaled[-1].item() == 0.0
    torch.testing.assert_close(scaled, 0.99 * time_grid(4))


def test_shift_time_fixes_endpoints_and_pushes_to_noise():
    assert shift_time(0.0, 3.0) == 0.0 and shift_time(1.0, 3.0) == 1.0
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    assert shift_time(0.5, 1.0) == 0.5


def test_flux_shift_is_sd3_shift_with_alpha_exp_mu():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu((256 + 4096) / 2) == pytest.approx((0.5 + 1.15) / 2)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for mu in [0.5, 1.15, flux_mu(1024)]:
        torch.testing.assert_close(flux_time_shift(mu, t), shift_time(t, math.exp(mu)))
        assert flux_time_shift(mu, 0.0) == 0.0
        assert flux_time_shift(mu, 0.3) == pytest.approx(shift_time(0.3, math.exp(mu)))


def test_grid_argument_validation():
    with pytest.raises(ValueError, match="cosine.*plain.*sd3"):
        time_grid(4, kind="cosine")
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)
    with pytest.raises(ValueError, match="shift"):
        time_grid(4, shift=0.0)
    with pytest.raises(ValueError, match="t_max"):
        time_grid(4, t_max=1.5)


# ------------------------------------------------------------------------------------ transport


@pytest.mark.parametrize(
    "solver, steps, tol",
    [("euler", 200, 0.06), ("heun", 20, 0.01), ("midpoint", 20, 1e-3), ("dopri5", 1, 2e-3)],
)
def test_transport_matches_gaussian_target(solver, steps, tol):
    """N(0, I) noise integrated 1 -> 0 must land on N(MU, diag(S^2))."""
    eps = noise(20000, dtype=torch.float32)
    x, _ = sample(lambda z, t, c: gaussian_velocity(z, t), eps, config=SamplerConfig(solver=solver, steps=steps))
    assert x.dtype == torch.float32 and x.shape == eps.shape
    x = x.double()
    # Standard errors are S/sqrt(N) <= 0.011 (mean) and S/sqrt(2N) <= 0.008 (std): ~4 SE allowed.
    torch.testing.assert_close(x.mean(0), MU, atol=0.04, rtol=0)
    torch.testing.assert_close(x.std(0), S, atol=0.03, rtol=0)
    # The flow is affine, so each point has an exact destination: this isolates the solver error
    # (tol is the worst point over 20000; Euler's error grows with |eps|).
    assert (x - (MU + S * eps.double())).abs().max() < tol


def test_dopri5_and_fine_heun_agree_pointwise():
    eps = noise(2000)
    x_dopri, _ = dopri5(gaussian_velocity, eps, time_grid(1), rtol=1e-8, atol=1e-8)
    x_heun, _ = get_solver("heun")(gaussian_velocity, eps, time_grid(400))
    assert (x_dopri - x_heun).abs().max() < 1e-4
    assert (x_dopri - (MU + S * eps)).abs().max() < 1e-6


def test_convergence_orders():
    """Doubling the steps halves Euler's error (order 1) and quarters Heun's (order 2)."""
    eps = noise(500)
    ref, _ = dopri5(gaussian_velocity, eps, time_grid(1), rtol=1e-10, atol=1e-10)

    def err(name, steps):
        x, _ = get_solver(name)(gaussian_velocity, eps, time_grid(steps))
        return (x - ref).abs().max().item()

    euler_ratio = err("euler", 20) / err("euler", 40)
    heun_ratio = err("heun", 20) / err("heun", 40)
    midpoint_ratio = err("midpoint", 20) / err("midpoint", 40)
    assert 1.7 < euler_ratio < 2.3, euler_ratio
    assert 3.4 < heun_ratio < 4.8, heun_ratio
    assert midpoint_ratio > 3.4, midpoint_ratio  # at least second order


# ------------------------------------------------------------------------------------- nfe, API


@pytest.mark.parametrize("solver, per_step", [("euler", 1), ("heun", 2), ("midpoint", 2)])
def test_nfe_counts_fixed_step(solver, per_step):
    calls = []

    def v(z, t, cond):
        calls.append(t)
        assert t.shape == (z.shape[0],) and t.dtype == z.dtype
        return gaussian_velocity(z, t)

    _, nfe = sample(v, noise(8), config=SamplerConfig(solver=solver, steps=7))
    assert nfe == per_step * 7 == len(calls)
    assert calls[0][0].item() == 1.0  # starts at pure noise


def test_nfe_dopri5_reported():
    calls = []
    _, nfe = sample(lambda z, t, c: calls.append(1) or gaussian_velocity(z, t), noise(8), config=SamplerConfig("dopri5"))
    assert nfe == len(calls) > 0


def test_progress_bar_runs():
    x, nfe = sample(lambda z, t, c: gaussian_velocity(z, t), noise(4), config=SamplerConfig("heun", 3), progress=True)
    assert nfe == 6 and torch.isfinite(x).all()


def test_sample_respects_t_max():
    seen = []
    sample(lambda z, t, c: seen.append(t[0].item()) or z * 0, noise(4), config=SamplerConfig(steps=4), t_max=0.9)
    assert seen[0] == pytest.approx(0.9)


def test_bad_names_raise_with_name():
    with pytest.raises(ValueError, match="rk4.*euler.*heun.*midpoint.*dopri5"):
        get_solver("rk4")
    with pytest.raises(ValueError, match="rk4"):
        SamplerConfig(solver="rk4")
    with pytest.raises(ValueError, match="karras"):
        SamplerConfig(grid="karras")
    assert set(SOLVERS) == {"euler", "heun", "midpoint", "ddim", "dopri5"}


def test_config_names():
    assert SamplerConfig().name == "euler25"
    assert SamplerConfig("heun", 8).name == "heun8"
    assert SamplerConfig("dopri5", steps=50).name == "dopri5"
    assert SamplerConfig("euler", 25, guidance=4.0).name == "euler25_cfg4"
    assert SamplerConfig("heun", 8, shift=3.0).name == "heun8_shift3"
    assert SamplerConfig("midpoint", 10, shift=1.5, guidance=7.5, grid="sd3").name == "midpoint10_cfg7p5_shift1p5_sd3grid"


# ------------------------------------------------------------------------------------- guidance


class CountingField:
    """A real conditional field v = 2 z + t + f(cond), recording the batch size of each call."""

    def __init__(self):
        self.batches = []

    def __call__(self, z, t, cond):
        self.batches.append(z.shape[0])
        if isinstance(cond, dict):
            c = cond["vec"] + cond["seq"].mean(1) * cond["scale"][0]
        else:
            c = 0.0 if cond is None else cond  # None: an unconditional model
        return 2 * z + t[:, None] + c


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.0])
def test_guidance_combines_in_one_batched_call(scale):
    z, t = noise(5), torch.full((5,), 0.3, dtype=torch.float64)
    cond, uncond = torch.randn(5, 2, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)
    field = CountingField()
    out = guided_velocity(field, cond, uncond, scale)(z, t)
    base = 2 * z + t[:, None]
    torch.testing.assert_close(out, base + uncond + scale * (cond - uncond))
    assert field.batches == [10]


def test_guidance_with_dict_conditions_and_broadcast_uncond():
    z, t = noise(3), torch.rand(3, dtype=torch.float64)
    cond = {"vec": torch.randn(3, 2, dtype=torch.float64), "seq": torch.randn(3, 4, 2, dtype=torch.float64), "scale": [2.0]}
    # A single null embedding (batch 1) serves the whole batch.
    uncond = {"vec": torch.zeros(1, 2, dtype=torch.float64), "seq": torch.ones(1, 4, 2, dtype=torch.float64), "scale": [2.0]}
    field = CountingField()
    out = guided_velocity(field, cond, uncond, 3.0)(z, t)
    c = cond["vec"] + 2.0 * cond["seq"].mean(1)
    u = torch.full_like(c, 2.0)
    torch.testing.assert_close(out, 2 * z + t[:, None] + u + 3.0 * (c - u))
    assert field.batches == [6]


def test_guidance_noop_cases_make_one_plain_call():
    z, t = noise(4), torch.zeros(4, dtype=torch.float64)
    cond = torch.randn(4, 2, dtype=torch.float64)
    for c, u, scale in [(cond, torch.zeros_like(cond), 1.0), (cond, None, 5.0), (None, None, 5.0)]:
        field = CountingField()
        expected = 2 * z + t[:, None] + (c if c is not None else 0.0)
        torch.testing.assert_close(guided_velocity(field, c, u, scale)(z, t), expected)
        assert field.batches == [4]


def test_guidance_structure_mismatch_raises():
    v = guided_velocity(CountingField(), {"a": torch.zeros(2, 2)}, {"b": torch.zeros(2, 2)}, 2.0)
    with pytest.raises(ValueError, match="structure"):
        v(torch.zeros(2, 2), torch.zeros(2))


def test_guided_sampling_counts_network_evaluations_per_sample():
    field = CountingField()
    cond = torch.randn(4, 2, dtype=torch.float64)
    _, nfe = sample(field, noise(4), cond, torch.zeros_like(cond), SamplerConfig("heun", 5, guidance=3.0))
    assert field.batches == [8] * 10  # 10 field evaluations, each one call on the doubled batch
    assert nfe == sum(field.batches) / 4 == 20  # network evaluations per sample: both passes count
    field = CountingField()
    _, nfe = sample(field, noise(4), cond, torch.zeros_like(cond), SamplerConfig("heun", 5, guidance=1.0))
    assert nfe == 10 and field.batches == [4] * 10  # guidance 1: the conditional pass only
