"""Metrics: distances between generated samples and reference data."""

from flowmatch.metrics.sample_distance import mmd_rbf, sliced_wasserstein2, wasserstein2_exact
from flowmatch.metrics.straightness import straightness
from flowmatch.metrics.frechet import (
    FeatureNetwork,
    FeatureNetworkError,
    ensure_feature_network,
    frechet_distance,
    frechet_metric,
    load_feature_network,
)

__all__ = ["mmd_rbf", "sliced_wasserstein2", "wasserstein2_exact", "straightness"]
__all__ += ["FeatureNetwork", "FeatureNetworkError", "ensure_feature_network", "frechet_distance", "frechet_metric", "load_feature_network"]
