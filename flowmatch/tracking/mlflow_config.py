"""Log a run's resolved config, flattened params, seed, git commit and grouping tags to MLflow.

Lightning's own SaveConfigCallback writes into ``trainer.log_dir``, which MLflowLogger does not
have; this subclass writes nothing to disk and logs everything to the MLflow run instead.
"""

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, str]:
    """{"model": {"init_args": {"lr": 1e-3}}} -> {"model.lr": "0.001"}; "init_args" levels are dropped for readability."""
    out: dict[str, str] = {}
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            name = prefix if key == "init_args" else (f"{prefix}.{key}" if prefix else str(key))
            out.update(flatten_config(value, name))
    elif isinstance(cfg, (list, tuple)) and any(isinstance(v, (dict, list)) for v in cfg):
        for i, value in enumerate(cfg):
            out.update(flatten_config(value, f"{prefix}.{i}"))
    else:
        out[prefix] = str(cfg)
    return out


def git_commit(path: str | Path = ".") -> str | None:
    """The commit of the code being run (with "-dirty" when the tree has changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def _short_class(value: Any) -> str | None:
    if isinstance(value, dict) and "class_path" in value:
        return str(value["class_path"]).rsplit(".", 1)[-1]
    return None


def log_image_to_loggers(trainer, image: np.ndarray, key: str, step: int) -> None:
    """Log an HxWx3 uint8 image to every MLflow logger of the trainer (rank 0), indexed by step."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, key=key, step=step)


class MLflowSaveConfig(SaveConfigCallback):
    """Logs the resolved config as ``config.yaml``, its flattened params and grouping tags to MLflow."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not loggers:
            return
        text = self.parser.dump(self.config, skip_none=False)
        cfg = self.config.as_dict()
        model, data = cfg.get("model", {}), cfg.get("data", {})
        tags = {
            "objective": _short_class(model),
            "model": _short_class((model.get("init_args") or {}).get("network")),
            "time_sampler": _short_class((model.get("init_args") or {}).get("time_sampler")) or "UniformTime",
            "dataset": _short_class(data),
            "stage": str(getattr(stage, "value", stage)),
            "seed": str(cfg.get("seed_everything")),
            "mlflow.source.git.commit": git_commit(),
        }
        params = {k: v for k, v in flatten_config(cfg).items() if not k.startswith(("config", "trainer.callbacks", "trainer.logger"))}
        for logger in loggers:
            client, run_id = logger.experiment, logger.run_id
            client.log_text(run_id, text, "config.yaml")
            logger.log_hyperparams(params)
            for key, value in tags.items():
                if value is not None:
                    client.set_tag(run_id, key, value)
