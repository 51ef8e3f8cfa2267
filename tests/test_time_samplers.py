"""Training-time samplers (docs/spec.md §3, SD3 §3.1) against independently written CDFs and densities.

Independent references: logit-normal via scipy.stats.norm.cdf(logit t); cosmap by integrating
its density 2/pi / ((1-t)^2 + t^2) with scipy.integrate.quad; mode(s) by inverting
t = 1 - u - s (cos^2(pi u / 2) - 1 + u) with scipy.optimize.brentq.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

from flowmatch.time_samplers import CosMapTime, LogitNormalTime, ModeTime, UniformTime

N_DRAWS = 10_000
GRID = np.linspace(0.002, 0.998, 41)
S_MAX = 2.0 / (math.pi - 2.0)


def mode_f(u, s):
    return 1.0 - u - s * (math.cos(math.pi * u / 2) ** 2 - 1.0 + u)


def mode_cdf_ref(s):
    """P(T <= t) = 1 - f^{-1}(t) (f decreases from 1 to 0), f^{-1} by brentq at every point."""

    def inverse(t):
        if t <= 0.0 or t >= 1.0:
            return 1.0 - min(max(t, 0.0), 1.0)
        return optimize.brentq(lambda u: mode_f(u, s) - t, 0.0, 1.0, xtol=1e-15, rtol=1e-15)

    return lambda t: 1.0 - np.array([inverse(float(ti)) for ti in np.atleast_1d(t)])


def mode_cdf_table(s):
    """The same CDF for many points (KS test): tabulate (t = f(u), 1 - u) on a fine u grid and interpolate
    in t; a u grid stays accurate where the CDF is steep (s = 2/(pi-2) has infinite density at t = 1/2)."""
    u = np.linspace(0.0, 1.0, 200_001)
    t = 1.0 - u - s * (np.cos(np.pi * u / 2) ** 2 - 1.0 + u)
    return lambda x: np.interp(x, t[::-1], (1.0 - u)[::-1])


def cosmap_cdf_ref(t):
    density = lambda x: (2 / math.pi) / ((1 - x) ** 2 + x**2)  # noqa: E731
    return np.array([integrate.quad(density, 0.0, ti)[0] for ti in np.atleast_1d(t)])


def logit_normal_cdf_ref(m, s):
    return lambda t: stats.norm.cdf((np.log(t) - np.log1p(-t) - m) / s)


CASES = {
    "uniform": (UniformTime(), lambda t: np.clip(t, 0, 1)),
    "lognorm(0,1)": (LogitNormalTime(0.0, 1.0), logit_normal_cdf_ref(0.0, 1.0)),
    "lognorm(1,0.6)": (LogitNormalTime(1.0, 0.6), logit_normal_cdf_ref(1.0, 0.6)),
    "lognorm(0.5,0.6)": (LogitNormalTime(0.5, 0.6), logit_normal_cdf_ref(0.5, 0.6)),
    "lognorm(-0.5,2)": (LogitNormalTime(-0.5, 2.0), logit_normal_cdf_ref(-0.5, 2.0)),
    "mode(1.29)": (ModeTime(1.29), mode_cdf_ref(1.29)),
    "mode(0)": (ModeTime(0.0), mode_cdf_ref(0.0)),
    "mode(-0.5)": (ModeTime(-0.5), mode_cdf_ref(-0.5)),
    "mode(smax)": (ModeTime(S_MAX), mode_cdf_ref(S_MAX)),
    "cosmap": (CosMapTime(), cosmap_cdf_ref),
}


def draws(sampler, seed=0, n=N_DRAWS):
    return sampler.sample(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CASES))
def test_draws_in_open_unit_interval_float32(name):
    sampler, _ = CASES[name]
    t = draws(sampler)
    assert t.dtype == torch.float32 and t.shape == (N_DRAWS,)
    assert (t > 0).all() and (t < 1).all()
    # seeded draws are reproducible
    assert torch.equal(t, draws(sampler))
    assert not torch.equal(t, draws(sampler, seed=1))


@pytest.mark.parametrize("name", list(CASES))
def test_kolmogorov_smirnov(name):
    # draws vs the independent reference CDF, and vs the sampler's own CDF
    sampler, ref = CASES[name]
    t = draws(sampler, seed=3).double().numpy()
    if isinstance(sampler, ModeTime):
        ref = mode_cdf_table(sampler.s)
    assert stats.kstest(t, ref).pvalue > 1e-3
    own = lambda x: sampler.cdf(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()  # noqa: E731
    assert stats.kstest(t, own).pvalue > 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_cdf_matches_independent_formula(name):
    sampler, ref = CASES[name]
    cdf = sampler.cdf(torch.from_numpy(GRID)).numpy()
    # mode(2/(pi-2)): f(u) - 1/2 ~ (u - 1/2)^3 makes f^{-1}(1/2) ill-conditioned (~1e-5 in float64)
    err = np.abs(cdf - ref(GRID))
    at_half = np.abs(GRID - 0.5) < 1e-9
    assert err[~at_half].max() < 1e-8
    assert err[at_half].max() < (1e-5 if name == "mode(smax)" else 1e-8)


@pytest.mark.parametrize("name", list(CASES))
def test_density_integrates_to_one_and_is_cdf_derivative(name):
    sampler, ref = CASES[name]
    dens = lambda x: float(sampler.density(torch.tensor([x], dtype=torch.float64)))  # noqa: E731
    # mode(2/(pi-2)) has an integrable singularity ~ |t - 1/2|^(-2/3) at t = 1/2: tell quad, leave it off the grid
    singular = name == "mode(smax)"
    total, _ = integrate.quad(dens, 0.0, 1.0, limit=200, points=[0.5] if singular else None)
    assert abs(total - 1.0) < (1e-4 if singular else 1e-6)
    grid = GRID[np.abs(GRID - 0.5) > 0.01] if singular else GRID
    # density == d cdf / dt, with the derivative of the independent CDF
    h = 1e-5
    d = sampler.density(torch.from_numpy(grid)).numpy()
    np.testing.assert_allclose(d, (ref(grid + h) - ref(grid - h)) / (2 * h), rtol=1e-5, atol=1e-5)
    # and of its own CDF
    own = lambda x: sampler.cdf(torch.from_numpy(x)).numpy()  # noqa: E731
    np.testing.assert_allclose(d, (own(grid + h) - own(grid - h)) / (2 * h), rtol=1e-5, atol=1e-5)


def test_logit_normal_density_closed_form():
    # pi(t) = 1 / (s sqrt(2 pi)) * 1 / (t (1 - t)) * exp(-(logit t - m)^2 / (2 s^2))  (SD3 eq. 19)
    for m, s in [(0.0, 1.0), (1.0, 0.6), (0.5, 0.6)]:
        ref = stats.norm.pdf((np.log(GRID / (1 - GRID)) - m) / s) / (s * GRID * (1 - GRID))
        np.testing.assert_allclose(LogitNormalTime(m, s).density(torch.from_numpy(GRID)).numpy(), ref, rtol=1e-10)
        # median sigmoid(m): from_uniform(1/2) and the sample median
        med = 1 / (1 + math.exp(-m))
        assert abs(LogitNormalTime(m, s).from_uniform(torch.tensor([0.5], dtype=torch.float64)).item() - med) < 1e-9
        assert abs(draws(LogitNormalTime(m, s)).median().item() - med) < 0.01


def test_mode_map_by_hand():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    # s = 1.29: f(0) = 1, f(1/2) = 1/2, f(1) = 0; f(1/4) = 0.75 - 1.29 (cos^2(pi/8) - 0.75)
    c2 = (1 + math.cos(math.pi / 4)) / 2
    expected = torch.tensor([1.0, 0.75 - 1.29 * (c2 - 0.75), 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ModeTime(1.29).from_uniform(u), expected)
    # heavy tails around the mode: s > 0 concentrates mass at mid t, s < 0 at the ends
    assert ModeTime(1.29).density(torch.tensor([0.5])) > 1 > ModeTime(1.29).density(torch.tensor([0.02]))
    assert ModeTime(-0.5).density(torch.tensor([0.5])) < 1 < ModeTime(-0.5).density(torch.tensor([0.02]))


def test_mode_zero_is_uniform():
    u = torch.rand(1000, dtype=torch.float64)
    torch.testing.assert_close(ModeTime(0.0).from_uniform(u), 1 - u)
    t = torch.from_numpy(GRID)
    torch.testing.assert_close(ModeTime(0.0).cdf(t), t, rtol=0, atol=1e-12)
    torch.testing.assert_close(ModeTime(0.0).density(t), torch.ones_like(t))


def test_cosmap_by_hand():
    # t = 1 - 1 / (tan(pi u / 2) + 1): u = 1/2 -> 1/2; u = 1/3 -> tan = 1/sqrt 3 -> t = 1/(sqrt 3 + 1)
    u = torch.tensor([0.5, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(CosMapTime().from_uniform(u), torch.tensor([0.5, 1 / (math.sqrt(3) + 1)], dtype=torch.float64))
    # density 2 / (pi (1 - 2t + 2t^2)) (SD3 eq. 21): 4/pi at t = 1/2, 2/pi at the ends
    torch.testing.assert_close(CosMapTime().density(torch.tensor([0.5, 0.0], dtype=torch.float64)), torch.tensor([4 / math.pi, 2 / math.pi], dtype=torch.float64))


@pytest.mark.parametrize("sampler", [UniformTime(), ModeTime(1.29), CosMapTime(), LogitNormalTime(0.3, 0.8)], ids=repr)
def test_from_uniform_pushes_uniform_to_the_distribution(sampler):
    # cdf(from_uniform(u)) = u for increasing maps, 1 - u for mode's decreasing map
    u = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    c = sampler.cdf(sampler.from_uniform(u))
    expected = 1 - u if isinstance(sampler, ModeTime) else u
    torch.testing.assert_close(c, expected, rtol=0, atol=1e-8)


def test_invalid_parameters():
    for s in (-1.0001, S_MAX + 1e-3, 2.0, -3.0):
        with pytest.raises(ValueError):
            ModeTime(s)
    ModeTime(-1.0), ModeTime(S_MAX)  # the boundaries are still monotone
    for s in (0.0, -1.0):
        with pytest.raises(ValueError):
            LogitNormalTime(0.0, s)
