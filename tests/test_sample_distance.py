"""Sample distances against closed forms."""

import math

import numpy as np
import pytest
import torch

from flowmatch.metrics import mmd_rbf, sliced_wasserstein2, wasserstein2_exact


@pytest.fixture(autouse=True)
def one_thread():
    """These small kernels gain little from threads, and on a busy 2-core machine threads stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gaussian(n, d=2, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_w2_exact_of_identical_sets_is_zero_and_of_a_translate_is_the_shift():
    x = _gaussian(500)
    m = torch.tensor([3.0, -4.0])
    assert wasserstein2_exact(x, x) == 0.0
    assert wasserstein2_exact(x, x[torch.randperm(500)]) == pytest.approx(0.0, abs=1e-12)
    # Translating a set by m: every permutation pays |m|^2 plus its own cost, so W2 = |m| exactly.
    assert wasserstein2_exact(x, x + m) == pytest.approx(5.0, abs=1e-6)
    assert isinstance(wasserstein2_exact(x, x + m), float)


def test_w2_exact_between_gaussian_samples_approaches_the_mean_distance():
    # W2(N(0, I), N(m, I)) = |m|; independent samples add a small positive finite-sample term.
    m = torch.tensor([1.5, 2.0])
    w2 = wasserstein2_exact(_gaussian(800, seed=1), _gaussian(800, seed=2) + m)
    assert w2 == pytest.approx(2.5, abs=0.1)
    # Unequal sizes and max_points: subsampled to a common size, deterministically.
    a, b = _gaussian(900, seed=3), _gaussian(600, seed=4) + m
    assert wasserstein2_exact(a, b, max_points=300) == wasserstein2_exact(a, b, max_points=300)
    assert wasserstein2_exact(a, b, max_points=300) == pytest.approx(2.5, abs=0.25)


def test_sliced_w2_closed_forms():
    x = _gaussian(1000)
    assert sliced_wasserstein2(x, x) == 0.0
    # A translate by m moves each projection by <m, theta>, so SW2^2 = E <m, theta>^2 = |m|^2 / D.
    for d in (2, 5):
        x = _gaussian(1000, d=d)
        m = torch.full((d,), 2.0)
        expected = m.norm().item() / math.sqrt(d)
        assert sliced_wasserstein2(x, x + m, num_projections=2000) == pytest.approx(expected, rel=0.04)
    # Deterministic per seed.
    y = _gaussian(1000, d=5, seed=9)
    assert sliced_wasserstein2(x, y, seed=1) == sliced_wasserstein2(x, y, seed=1)


def test_sliced_w2_with_unequal_sizes_is_exact_on_the_empirical_measures():
    # In 1-D (one projection, theta = +-1) it is the exact W2 of the two empirical measures:
    # repeating each set to a common size (the lcm) gives the same measures with equal sizes.
    a, b = _gaussian(37, d=1, seed=1).double(), _gaussian(53, d=1, seed=2).double() + 0.3
    brute = (a.repeat(53, 1).flatten().sort().values - b.repeat(37, 1).flatten().sort().values).pow(2).mean().sqrt()
    assert sliced_wasserstein2(a, b, num_projections=1) == pytest.approx(brute.item(), rel=1e-10)
    # A set and its duplicates are the same measure: exactly 0.
    x = _gaussian(500, seed=5)
    assert sliced_wasserstein2(x, x.repeat(3, 1)) == pytest.approx(0.0, abs=1e-12)
    # Same distribution, different sizes: small; a shift by m is recovered (|m| / sqrt(D)).
    x, y = _gaussian(2000, seed=5), _gaussian(700, seed=6)
    assert sliced_wasserstein2(x, y) < 0.1
    m = torch.tensor([2.0, 0.0])
    assert sliced_wasserstein2(x, y + m, num_projections=2000) == pytest.approx(2.0 / math.sqrt(2), rel=0.06)


def _mmd2_gaussian_shift(shift, dim, bandwidths=(0.1, 0.5, 1.0, 2.0, 5.0)):
    """Closed-form MMD^2 between N(0, I) and N(m, I), |m| = shift, for the mean of RBF kernels.

    With x - x' ~ N(0, 2I): E k_s(x, x') = (s^2 / (s^2 + 2))^(D/2), and the cross term carries an
    extra factor exp(-|m|^2 / (2 (s^2 + 2))).
    """
    terms = [
        2 * (s * s / (s * s + 2)) ** (dim / 2) * (1 - math.exp(-shift**2 / (2 * (s * s + 2)))) for s in bandwidths
    ]
    return sum(terms) / len(terms)


def test_mmd_matches_the_gaussian_closed_form_and_grows_with_shift():
    x, x2 = _gaussian(800, seed=1), _gaussian(800, seed=2)
    assert mmd_rbf(x, x, unbiased=False) == 0.0  # V-statistic: exactly 0 for identical sets
    assert abs(mmd_rbf(x, x)) < 5e-3  # U-statistic: ~ -1/N for identical sets
    assert abs(mmd_rbf(x, x2)) < 5e-3  # independent samples of one distribution
    values = []
    for shift in (0.5, 1.0, 2.0):
        values.append(mmd_rbf(x, x2 + torch.tensor([shift, 0.0])))
        # The unbiased estimate's standard deviation at N = 800 is below 0.01.
        assert values[-1] == pytest.approx(_mmd2_gaussian_shift(shift, 2), abs=0.025)
    assert all(a < b for a, b in zip(values, values[1:]))  # grows with the shift
    assert isinstance(values[0], float)


def test_inputs_are_checked_and_numpy_is_accepted():
    x = _gaussian(50)
    assert wasserstein2_exact(x.numpy(), np.asarray(x.numpy())) == 0.0
    with pytest.raises(ValueError, match=r"same dimension.*\(50, 2\).*\(50, 3\)"):
        sliced_wasserstein2(x, _gaussian(50, d=3))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        mmd_rbf(x.flatten(), x)
    with pytest.raises(ValueError, match="empty"):
        wasserstein2_exact(x[:0], x)
