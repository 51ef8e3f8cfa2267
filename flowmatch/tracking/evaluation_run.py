"""`validate` / `test` of a checkpoint log into the MLflow run that trained it.

A checkpoint records its MLflow run (MLflowSaveConfig.on_save_checkpoint). When ``validate`` or ``test``
is given such a checkpoint and that run is in the tracking store, the CLI points the logger at it: the
``test/*`` (or ``val/*``) metrics and images land in the training run at the checkpoint's step, beside
its curves, so `compare` and the MLflow UI show one run per trained model with its test numbers under it.

The training run stays what it was: its params and tags are not touched (the evaluation's config is kept
as the artifact ``config_<stage>_step<N>.yaml``, its outcome and step in the tags
``flowmatch.<stage>_status`` and ``flowmatch.<stage>_at_step``) and its status and end time are not
changed. Lightning's MLFlowLogger would mark the run FINISHED (or FAILED, after a crash in `test`) with a
new end time when the evaluation ends; a failed test must not make a finished training run look failed
(studies look for FINISHED runs), so the evaluation's logger records its outcome in the tag instead.

If the checkpoint's run is not in this store (a checkpoint copied from elsewhere), the evaluation logs
to a new run tagged ``flowmatch.evaluates_run`` with the original run's id.
"""

from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger

EVALUATED_RUN_TAG = "flowmatch.evaluates_run"


def evaluation_outcome(status: str) -> str:
    """Lightning's end-of-run status ("success", "failed", "finished") as MLflow's run status name."""
    return "FAILED" if status == "failed" else "FINISHED"


def log_at_checkpoint_step(logger: MLFlowLogger, step: int) -> None:
    """Log the evaluation's metrics and images at the checkpoint's training step. (Lightning logs a validate /
    test at step 0, since only ``fit`` restores the loops' counters: in the training run that would put a
    point at step 0 of its validation curve.) log_image_to_loggers reads ``evaluated_step``."""
    log_metrics = logger.log_metrics

    def log_metrics_at_step(metrics, step=None):  # (Lightning passes step= by keyword)
        return log_metrics(metrics, checkpoint_step)

    checkpoint_step = step
    logger.log_metrics = log_metrics_at_step
    logger.evaluated_step = step


def log_evaluation_into_run(logger: MLFlowLogger, stage: str) -> None:
    """Make ``logger`` (pointed at the training run) end the evaluation without ending the run again."""

    def finalize(status: str = "success") -> None:
        client = logger.experiment
        flush_at_end = getattr(client, "flush_at_end", None)  # a resilient client's buffered metrics (tracking.resilient)
        if flush_at_end is not None:
            flush_at_end()
        client.set_tag(logger.run_id, f"flowmatch.{stage}_status", evaluation_outcome(status))

    logger.finalize = finalize
