"""Callbacks: sample-quality metrics and sample pictures, logged during validate / test; an EMA of the weights."""

from flowmatch.callbacks.ema import EMA
from flowmatch.callbacks.image_metrics import ImageSampleMetrics
from flowmatch.callbacks.point_metrics import PointSampleMetrics
from flowmatch.callbacks.straightness import Straightness

__all__ = ["EMA", "ImageSampleMetrics", "PointSampleMetrics", "Straightness"]
