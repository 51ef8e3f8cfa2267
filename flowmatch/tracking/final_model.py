"""Log the final model of a fit to MLflow: one checkpoint file with the weights (and the EMA weights,
which flowmatch.objectives.loading.load_objective and `python -m flowmatch sample` use by default)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

#: what the logged file keeps: enough to rebuild, validate and sample the model (no optimizer state)
FINAL_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "hyper_parameters", "flowmatch", "ema", "mlflow")


class LogFinalModel(L.Callback):
    """At the end of ``fit``, save the model as it ended and log it as the MLflow artifact
    ``<artifact_path>/final.ckpt`` (any strategy: a DeepSpeed checkpoint is consolidated first).

    Args:
        log: set false to skip (e.g. for very large models whose checkpoints are kept elsewhere).
        artifact_path: the artifact folder in the MLflow run.
    """

    def __init__(self, log: bool = True, artifact_path: str = "model"):
        self.log = log
        self.artifact_path = artifact_path
        self.logged_path: str | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        # decided by rank 0, the only rank with a logger (the CLI gives the others none): every rank must take part
        if not self.log or not trainer.strategy.broadcast(bool(loggers) if trainer.is_global_zero else None):
            return
        from flowmatch.checkpoints import atomic_torch_save, consolidate_deepspeed_checkpoint, read_checkpoint

        tmpdir = trainer.strategy.broadcast(tempfile.mkdtemp(prefix="flowmatch-final-") if trainer.is_global_zero else None)
        path = Path(tmpdir) / "final.ckpt"
        try:
            trainer.save_checkpoint(path)  # every rank takes part (DeepSpeed writes per-rank shards)
            trainer.strategy.barrier("flowmatch_final_model")
            if not trainer.is_global_zero:
                return
            if path.is_dir():
                ckpt = consolidate_deepspeed_checkpoint(path, Path(tmpdir) / "consolidated.ckpt")
                shutil.rmtree(path)
            else:
                ckpt = read_checkpoint(path)
            # and the data module's own state (Lightning keys it by class name): e.g. which k-th rectified flow reflow couplings made
            dm = getattr(trainer, "datamodule", None)
            keep = FINAL_KEYS + ((type(dm).__qualname__,) if dm is not None else ())
            ckpt = {k: v for k, v in ckpt.items() if k in keep}
            ckpt["state_dict"] = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
            atomic_torch_save(ckpt, path)
            for logger in loggers:
                logger.experiment.log_artifact(logger.run_id, str(path), self.artifact_path)
            self.logged_path = f"{self.artifact_path}/final.ckpt"
        finally:
            trainer.strategy.barrier("flowmatch_final_model_logged")
            if trainer.is_global_zero:
                shutil.rmtree(tmpdir, ignore_errors=True)
