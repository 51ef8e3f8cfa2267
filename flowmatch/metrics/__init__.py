"""Metrics: distances between generated samples and reference data."""

from flowmatch.metrics.sample_distance import mmd_rbf, sliced_wasserstein2, wasserstein2_exact
from flowmatch.metrics.straightness import straightness

__all__ = ["mmd_rbf", "sliced_wasserstein2", "wasserstein2_exact", "straightness"]
