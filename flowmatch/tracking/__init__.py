"""Experiment tracking: MLflow is the platform's default logger."""

from flowmatch.tracking.mlflow_config import MLflowSaveConfig, flatten_config, log_image_to_loggers

__all__ = ["MLflowSaveConfig", "flatten_config", "log_image_to_loggers"]
