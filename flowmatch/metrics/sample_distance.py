"""Distances between two point clouds (generated samples vs. reference data), for low-dim data.

All functions take (N, D) tensors (or arrays), compute in float64 on the CPU, and return a Python
float. They are deterministic: any random choice (subsampling, projection directions) comes from a
``torch.Generator`` seeded with ``seed``.

- :func:`wasserstein2_exact`: exact W2 between two empirical measures by optimal assignment.
- :func:`sliced_wasserstein2`: sliced W2 over random 1-D projections (cheap, any size).
- :func:`mmd_rbf`: squared maximum mean discrepancy with a mixture of RBF kernels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _as_points(x, name: str) -> torch.Tensor:
    """Detached float64 CPU tensor of shape (N, D); raises ValueError otherwise."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return x


def _as_pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension D, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    return x, y


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances, computed directly (exactly 0 for equal points)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def _subsample(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` rows of x drawn without replacement (x itself when it has at most n rows)."""
    if x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=generator)[:n]]


def wasserstein2_exact(x, y, max_points: int = 2000, seed: int = 0) -> float:
    """Exact 2-Wasserstein distance W2 (not W2^2) between the empirical measures of x and y.

    With equally many points and uniform weights, the optimal coupling is a permutation, found by
    ``scipy.optimize.linear_sum_assignment`` on the squared-distance matrix (O(N^3)):
    W2 = sqrt(min_sigma mean_i |x_i - y_sigma(i)|^2).

    If the clouds differ in size or exceed ``max_points``, each is subsampled without replacement
    to ``min(len(x), len(y), max_points)`` points with a generator seeded by ``seed`` (so the same
    inputs always give the same value). 2000 points take about a second.
    """
    x, y = _as_pair(x, y)
    generator = torch.Generator().manual_seed(seed)
    n = min(x.shape[0], y.shape[0], max_points)
    x, y = _subsample(x, n, generator), _subsample(y, n, generator)
    # W2^2 = |mean(x) - mean(y)|^2 + W2^2 of the centred clouds: the mean shift only adds row and
    # column constants to the cost matrix, so the optimal permutation is the same. Solving the
    # centred problem is exact and much faster (a large shift makes the assignment near-degenerate
    # and slows linear_sum_assignment down ten-fold).
    mean_x, mean_y = x.mean(dim=0), y.mean(dim=0)
    cost = _sq_dists(x - mean_x, y - mean_y).numpy()
    rows, cols = linear_sum_assignment(cost)
    w2_squared = float((mean_x - mean_y).pow(2).sum()) + float(cost[rows, cols].mean())
    return float(np.sqrt(w2_squared))


def _quantile_pairing(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair the step quantile functions of an n-point and an m-point 1-D empirical measure.

    Sorted point i of n covers the levels [i/n, (i+1)/n). Cutting [0, 1) at every i/n and j/m
    gives intervals on which both quantile functions are constant; returns, per interval, the
    index into each sorted set and the interval's width. Then, exactly,
    W2^2 = sum_k width_k * (xs[ix_k] - ys[iy_k])^2. Computed in integer units of 1/(n m).
    """
    cuts = torch.unique(torch.cat([torch.arange(1, n + 1) * m, torch.arange(1, m + 1) * n]))  # sorted, last = n m
    starts = torch.cat([torch.zeros(1, dtype=cuts.dtype), cuts[:-1]])
    widths = (cuts - starts).to(torch.float64) / (n * m)
    return starts // m, starts // n, widths


def sliced_wasserstein2(x, y, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt(E_theta W2^2(<x, theta>, <y, theta>)).

    ``num_projections`` directions theta are drawn uniformly on the unit sphere (normalised
    Gaussians, seeded by ``seed``); in 1-D, W2^2 is the integral over u in [0, 1) of the squared
    difference of the quantile functions: for equal sizes the mean squared difference of the
    sorted projections, for unequal sizes the same integral taken exactly over the (step) quantile
    functions of both empirical measures (no subsampling, no interpolation).

    A translation by m gives exactly sqrt(mean_theta <m, theta>^2), which is |m| / sqrt(D) in
    expectation over the directions.
    """
    x, y = _as_pair(x, y)
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)  # (N, P)
    py, _ = torch.sort(y @ theta, dim=0)  # (M, P)
    if px.shape[0] == py.shape[0]:
        return float((px - py).pow(2).mean().sqrt())
    ix, iy, widths = _quantile_pairing(px.shape[0], py.shape[0])
    sw2_squared = (widths[:, None] * (px[ix] - py[iy]).pow(2)).sum(dim=0).mean()
    return float(sw2_squared.sqrt())


def mmd_rbf(
    x,
    y,
    bandwidths: Sequence[float] = (0.1, 0.5, 1.0, 2.0, 5.0),
    unbiased: bool = True,
    max_points: int = 5000,
    seed: int = 0,
) -> float:
    """Squared maximum mean discrepancy MMD^2 with the kernel k = mean_s exp(-|a - b|^2 / (2 s^2)).

    ``unbiased=True`` (default) is the U-statistic: the diagonals of k(x, x) and k(y, y) are left
    out, so it can be slightly negative (of order 1/N) for equal distributions, and for x == y it is
    ~ -1/N rather than 0. ``unbiased=False`` is the V-statistic: always >= 0, exactly 0 for x == y,
    biased upwards by O(1/N). The kernel is the mean over ``bandwidths``, so the value is <= 2.

    Clouds larger than ``max_points`` are subsampled (seeded by ``seed``) to bound the N x M
    kernel matrices' memory.
    """
    x, y = _as_pair(x, y)
    if len(bandwidths) == 0 or min(bandwidths) <= 0:
        raise ValueError(f"bandwidths must be a non-empty sequence of positive numbers, got {bandwidths}")
    generator = torch.Generator().manual_seed(seed)
    x, y = _subsample(x, max_points, generator), _subsample(y, max_points, generator)
    if unbiased and (x.shape[0] < 2 or y.shape[0] < 2):
        raise ValueError(f"the unbiased MMD needs at least 2 points in each set, got {x.shape[0]} and {y.shape[0]}")

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = _sq_dists(a, b)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths) / len(bandwidths)

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = x.shape[0], y.shape[0]
    if unbiased:
        term_xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        term_yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    else:
        term_xx, term_yy = kxx.mean(), kyy.mean()
    return float(term_xx + term_yy - 2 * kxy.mean())
