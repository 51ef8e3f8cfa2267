"""Classifiers trained on the platform's data: the feature network of the demo's Fréchet distance
and the judge of caption adherence (flowmatch.metrics.frechet loads them)."""

from flowmatch.classifiers.digits import DigitClassifier, DigitClassifierError

__all__ = ["DigitClassifier", "DigitClassifierError"]
