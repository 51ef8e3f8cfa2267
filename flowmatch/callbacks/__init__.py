"""Callbacks: sample-quality metrics and sample pictures, logged during validate / test (the GenEval-style score on
the procedural scenes among them); an EMA of the weights; the largest attention logit during training."""

from flowmatch.callbacks.attention_logits import AttentionLogitMonitor
from flowmatch.callbacks.ema import EMA
from flowmatch.callbacks.image_metrics import ImageSampleMetrics
from flowmatch.callbacks.point_metrics import PointSampleMetrics
from flowmatch.callbacks.scene_eval import SceneGenEval
from flowmatch.callbacks.straightness import Straightness

__all__ = ["AttentionLogitMonitor", "EMA", "ImageSampleMetrics", "PointSampleMetrics", "SceneGenEval", "Straightness"]
