"""Log a run's resolved config, flattened params, seed, git commit and grouping tags to MLflow, and
remember the run in every checkpoint so that a resumed fit continues the same MLflow run.

Lightning's own SaveConfigCallback writes into ``trainer.log_dir``, which MLflowLogger does not
have; this subclass writes nothing to disk and logs everything to the MLflow run instead.

Tags (for grouping and filtering runs, e.g. ``--filter "tags.objective = 'RectifiedFlow'"``):
``objective``, ``model``, ``dataset``, ``sampler`` (the training time sampler with its arguments,
e.g. ``LogitNormalTime(m=0.0, s=1.0)``), ``time_sampler`` (its class), ``eval_samplers`` (the ODE
samplers of the sample metrics), ``seed``, ``stage`` and ``mlflow.source.git.commit``.
A resumed run also gets ``flowmatch.resumed_at_step`` (the last resume) and, if the resumed config
changes a logged param, ``config_resumed_step<N>.yaml`` and the tag ``flowmatch.changed_params``.
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


def _with_args(value: Any) -> str | None:
    """ "LogitNormalTime(m=0.0, s=1.0)" for {"class_path": ...LogitNormalTime, "init_args": {"m": 0.0, "s": 1.0}}."""
    name = _short_class(value)
    if name is None:
        return None
    args = value.get("init_args") or {}
    return f"{name}({', '.join(f'{k}={v}' for k, v in args.items())})"


def _eval_samplers(trainer) -> str | None:
    names = []
    for cb in trainer.callbacks:
        for sampler in getattr(cb, "samplers", None) or []:
            name = getattr(sampler, "name", None)
            if name and name not in names:
                names.append(name)
    return ",".join(names) or None


# params that are not hyper-parameters of the run (and may differ when it is resumed)
NOT_PARAMS = ("config", "trainer.callbacks", "trainer.logger", "ckpt_path")


def log_image_to_loggers(trainer, image: np.ndarray, key: str, step: int) -> None:
    """Log an HxWx3 uint8 image to every MLflow logger of the trainer (rank 0), indexed by step."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):  # (a validate / test of a checkpoint: at its step, tracking.evaluation_run)
            logger.experiment.log_image(logger.run_id, image, key=key, step=getattr(logger, "evaluated_step", step))


class MLflowSaveConfig(SaveConfigCallback):
    """Logs the resolved config as ``config.yaml``, its flattened params and grouping tags to MLflow,
    and writes the MLflow run into checkpoints (``checkpoint["mlflow"]``) so a resume can continue it.

    ``resumed_from``: set by the CLI when a fit resumes from a checkpoint (``{"step": N, ...}``).
    ``evaluated``: set by the CLI when a validate / test logs into the run that trained its checkpoint
    (flowmatch.tracking.evaluation_run): the run's params and tags stay as the fit logged them."""

    resumed_from: dict | None = None
    evaluated: dict | None = None

    def save_config(self, trainer, pl_module, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        text = self.parser.dump(self.config, skip_none=False)
        cfg = self.config.as_dict()
        model, data = cfg.get("model", {}), cfg.get("data", {})
        time_sampler = (model.get("init_args") or {}).get("time_sampler")
        tags = {
            "objective": _short_class(model),
            "model": _short_class((model.get("init_args") or {}).get("network")),
            "sampler": _with_args(time_sampler) or "UniformTime()",
            "time_sampler": _short_class(time_sampler) or "UniformTime",
            "eval_samplers": _eval_samplers(trainer),
            "dataset": _short_class(data),
            "stage": str(getattr(stage, "value", stage)),
            "seed": str(cfg.get("seed_everything")),
            "mlflow.source.git.commit": git_commit(),
        }
        params = {k: v for k, v in flatten_config(cfg).items() if not k.startswith(NOT_PARAMS)}
        for logger in loggers:
            client, run_id = logger.experiment, logger.run_id
            if self.evaluated is not None:
                self._log_evaluation(logger, text, tags["stage"])
                continue
            if self.resumed_from is None:
                client.log_text(run_id, text, "config.yaml")
                logger.log_hyperparams(params)
            else:
                self._log_resumed(logger, text, params)
            for key, value in tags.items():
                if value is not None:
                    client.set_tag(run_id, key, value)

    def _log_resumed(self, logger: MLFlowLogger, text: str, params: dict[str, str]) -> None:
        """A resumed run already has its params (MLflow refuses to change one): log only new ones,
        and keep the resumed config beside the original if it changes any."""
        client, run_id = logger.experiment, logger.run_id
        step = int((self.resumed_from or {}).get("step", 0))
        logged = client.get_run(run_id).data.params
        new = {k: v for k, v in params.items() if k not in logged}
        # (a value first logged as None was filled in by a link from the data, e.g. model.sample_shape: no change)
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] not in (str(v)[:6000], "None"))
        if new:
            logger.log_hyperparams(new)
        if not client.list_artifacts(run_id, "config.yaml") and not any(a.path == "config.yaml" for a in client.list_artifacts(run_id)):
            client.log_text(run_id, text, "config.yaml")
        if changed:
            client.log_text(run_id, text, f"config_resumed_step{step}.yaml")
            client.set_tag(run_id, "flowmatch.changed_params", ",".join(changed)[:5000])
        client.set_tag(run_id, "flowmatch.resumed_at_step", str(step))

    def _log_evaluation(self, logger: MLFlowLogger, text: str, stage: str) -> None:
        """A validate / test in the training run: its config beside the fit's, the step and the code it ran."""
        client, run_id = logger.experiment, logger.run_id
        step = int((self.evaluated or {}).get("step", 0))
        client.log_text(run_id, text, f"config_{stage}_step{step}.yaml")
        client.set_tag(run_id, f"flowmatch.{stage}_at_step", str(step))
        commit = git_commit()
        if commit:
            client.set_tag(run_id, f"flowmatch.{stage}_git_commit", commit)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger) and trainer.is_global_zero:
                checkpoint["mlflow"] = {"run_id": logger.run_id, "experiment_id": logger.experiment_id,
                                        "tracking_uri": tracking_uri(logger)}
                return


def tracking_uri(logger: MLFlowLogger) -> str:
    """The tracking store an MLFlowLogger writes to (its MLflow client's public ``tracking_uri``)."""
    return logger.experiment.tracking_uri
