"""Callbacks: sample-quality metrics and sample pictures, logged during validate / test."""

from flowmatch.callbacks.point_metrics import PointSampleMetrics

__all__ = ["PointSampleMetrics"]
