"""Experiment tracking: MLflow is the platform's default logger.

mlflow_config: the resolved config, params, tags and the run id in checkpoints; server: the tracking-URI
check at start-up; final_model: the final weights as an artifact; progress: the whole-run progress bar;
report: the HTML comparison of runs (`python -m flowmatch compare`)."""

from flowmatch.tracking.final_model import LogFinalModel
from flowmatch.tracking.mlflow_config import MLflowSaveConfig, flatten_config, log_image_to_loggers
from flowmatch.tracking.progress import StepProgressBar
from flowmatch.tracking.server import TrackingServerError, check_tracking_uri

__all__ = ["LogFinalModel", "MLflowSaveConfig", "StepProgressBar", "TrackingServerError", "check_tracking_uri",
           "flatten_config", "log_image_to_loggers"]
