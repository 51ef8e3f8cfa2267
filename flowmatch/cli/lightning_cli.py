"""The LightningCLI behind `fit`, `validate`, `test` and `predict`.

Model and data are given in subclass mode (``class_path`` / ``init_args``), several ``--config``
files compose, and OmegaConf interpolation ``${...}`` is resolved over the merged config. The model
learns its sample shape from the data at setup (MatchModelToData), so configs need not repeat it.

Around Lightning's own behaviour the CLI adds:
* an MLflow tracking server given by an http(s) URI is checked before anything is built: an
  unreachable server is an ``error:`` at start-up (exit status 1), not a crash at the first metric;
* ``fit --ckpt_path CKPT`` continues the MLflow run recorded in the checkpoint (same run id, metrics
  continue at the resumed step), or, if that run is not in this tracking store, starts a new run
  tagged ``flowmatch.resumed_from_run``; ``validate`` / ``test --ckpt_path CKPT`` log into that run
  (test metrics beside its val metrics; flowmatch.tracking.evaluation_run);
* checkpoint files are written atomically and read with safe unpickling (AtomicCheckpointIO);
* ``validate`` / ``test`` of a checkpoint that holds EMA weights use them (an EMA callback is added if the
  config has none; for the raw weights configure one with ``use_for_eval: false``);
* a progress bar whose rate and ETA cover the whole run (StepProgressBar) and, at the end of a fit,
  the final model (with its EMA weights) as the MLflow artifact ``model/final.ckpt``
  (``--final_model.log false`` turns that off);
* the data's facts reach the model (MatchModelToData: the sample shape at setup, the network checked
  against latent shards before the first step), and the data's skip counts are logged (DataHealthLogger).

Only Lightning's public hooks are used (``parse_arguments``, ``before_instantiate_classes``,
``instantiate_trainer``, ``after_fit``); checked against lightning 2.6.x.
"""

import os
import sys

from jsonargparse import set_parsing_settings

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import MLFlowLogger

from flowmatch.tracking.final_model import LogFinalModel
from flowmatch.tracking.mlflow_config import MLflowSaveConfig, tracking_uri

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def _mlflow_logger_specs(logger_cfg) -> list:
    """The MLFlowLogger entries (class_path / init_args namespaces) of a trainer.logger config value."""
    items = logger_cfg if isinstance(logger_cfg, list) else [logger_cfg]
    out = []
    for item in items:
        class_path = getattr(item, "class_path", None) if item is not None and not isinstance(item, bool) else None
        if class_path and class_path.rsplit(".", 1)[-1] == "MLFlowLogger":
            out.append(item)
    return out


def _model_identity(model) -> dict | None:
    """What makes two model configs the same model: the objective class and the network's class and sizes."""
    if model is None or not hasattr(model, "get"):
        return None
    out = {"model": model.get("class_path")}
    network = (model.get("init_args") or {}).get("network") if model.get("init_args") is not None else None
    if network is not None and hasattr(network, "get"):
        out["network"] = network.get("class_path")
        args = network.get("init_args")
        for key, value in (args.as_dict() if hasattr(args, "as_dict") else dict(args or {})).items():
            out[f"network.{key}"] = value
    return out


def launch_rank() -> int:
    """This process's global rank as its launcher set it, before any process group exists: torchrun's RANK,
    SLURM's SLURM_PROCID, or Lightning's own launcher's NODE_RANK / LOCAL_RANK (any non-zero one: not rank 0)."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    node, local = (int(os.environ.get(n, "0")) if os.environ.get(n, "0").isdigit() else 0 for n in ("NODE_RANK", "LOCAL_RANK"))
    return local if node == 0 else max(node, local, 1)


class FlowCLI(LightningCLI):
    def __init__(self, args=None, run=True):
        # `${trainer.max_steps}` in any config file refers to the merged config of the command
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        super().__init__(
            model_class=LightningModule,  # the objectives, and auxiliary models such as the autoencoder
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=MLflowSaveConfig,
            save_config_kwargs={"save_to_log_dir": False},
            parser_kwargs={"parser_mode": "omegaconf+", "default_env": False, "prog": "python -m flowmatch"},
            auto_configure_optimizers=False,
            trainer_defaults={
                "default_root_dir": "runs",
                # MLflowSaveConfig logs the whole resolved config as params (model.lr, data.batch_size, ...);
                # Lightning's own logging of the module's hparams would add unprefixed duplicates (lr, network, ...)
                "enable_autolog_hparams": False,
                "logger": {
                    "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                    "init_args": {
                        "experiment_name": "flowmatch",
                        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                    },
                },
            },
            seed_everything_default=0,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # (no link of data.sample_shape into the model: the manifest may only exist after prepare_data;
        # MatchModelToData gives the model the data's sample shape at setup)
        # the checkpoint callback's options, instantiated here and added to the trainer by instantiate_trainer
        # (unless --trainer.enable_checkpointing false, which must drop it, not clash with it)
        parser.add_class_arguments(ModelCheckpoint, "checkpoint", fail_untyped=False, instantiate=True, sub_configs=True)
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "step{step:07d}", "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(LogFinalModel, "final_model")

    # --- a checkpoint's model must be the config's model -------------------------------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        # the model the config asks for, before Lightning replaces it with the checkpoint's hyper-parameters
        sub = self.config.get("subcommand")
        self._config_model = _model_identity(self.config[sub].get("model")) if sub else None

    def _refuse_checkpoint_of_another_model(self, cfg) -> None:
        """Lightning rebuilds the model from the checkpoint's hyper-parameters (so a checkpoint loads whatever the
        config says); refuse when the checkpoint's objective or network contradicts the config's, instead of
        silently evaluating another model than the one asked for."""
        before = getattr(self, "_config_model", None)
        after = _model_identity(cfg.get("model"))
        if before is None or after is None or after == before:
            return
        from flowmatch.checkpoints import CheckpointError

        # keys of either side: a checkpoint of another network class has other argument names
        diffs = [f"{k}: config {before.get(k, '(none)')!r}, checkpoint {after.get(k, '(none)')!r}"
                 for k in [*before, *(k for k in after if k not in before)] if before.get(k) != after.get(k)]
        raise CheckpointError(f"{cfg.get('ckpt_path')} was trained with another model than this config's: "
                              + "; ".join(diffs[:6]) + ". Use the config the checkpoint was trained with.")

    # --- before anything is built: the checkpoint's model, the tracking server, the run a resume continues --
    def before_instantiate_classes(self) -> None:
        from flowmatch.tracking.server import TrackingServerError, check_tracking_uri, ensure_experiment

        cfg = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        self._refuse_checkpoint_of_another_model(cfg)
        self._resumed_from = None
        if launch_rank() != 0 and cfg.get("trainer", {}).get("logger") not in (None, False):
            # only global rank 0 logs; the others must not open the store at all (launched together by torchrun or
            # SLURM, every rank would create / migrate the same SQLite store at once and collide)
            cfg.trainer.logger = False
        specs = _mlflow_logger_specs(cfg.get("trainer", {}).get("logger"))
        for spec in specs:
            if spec.get("init_args") is not None and not spec.init_args.get("tracking_uri"):
                spec.init_args.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)  # never ./mlruns
            uri = spec.init_args.get("tracking_uri") if spec.get("init_args") is not None else None
            try:
                check_tracking_uri(uri or DEFAULT_TRACKING_URI)
            except TrackingServerError as err:
                raise SystemExit(f"error: {err}") from None
            if spec.get("init_args") is not None and spec.init_args.get("experiment_name") and not spec.init_args.get("run_id"):
                ensure_experiment(uri or DEFAULT_TRACKING_URI, spec.init_args.experiment_name)  # two fits at once: no race
        self._evaluated = None
        if self.subcommand == "fit" and cfg.get("ckpt_path") and specs:
            self._resumed_from = self._continue_mlflow_run(cfg.ckpt_path, specs[0], "fit")
        elif self.subcommand in ("validate", "test") and cfg.get("ckpt_path") and specs:
            self._evaluated = self._continue_mlflow_run(cfg.ckpt_path, specs[0], self.subcommand)  # flowmatch.tracking.evaluation_run
        self._evaluate_ema = self.subcommand in ("validate", "test") and self._checkpoint_has_ema(cfg.get("ckpt_path"))

    @staticmethod
    def _checkpoint_has_ema(ckpt_path) -> bool:
        from flowmatch.checkpoints import CheckpointError, read_client_state

        if not ckpt_path or not os.path.exists(str(ckpt_path)):
            return False
        try:
            return bool((read_client_state(ckpt_path).get("ema") or {}).get("state_dict"))
        except CheckpointError:
            return False

    def _continue_mlflow_run(self, ckpt_path: str, spec, stage: str) -> dict | None:
        """Point the MLflow logger at the run the checkpoint was written by (if it is in this store): a resumed
        fit continues it, a validate / test logs into it (flowmatch.tracking.evaluation_run)."""
        from flowmatch.checkpoints import CheckpointError, read_client_state

        if not os.path.exists(str(ckpt_path)):
            return None  # Lightning reports it ("last", "hpc" ... are resolved by Lightning)
        try:
            state = read_client_state(ckpt_path)
        except CheckpointError:
            return None  # Lightning reports an unreadable checkpoint itself
        info = dict(state.get("mlflow") or {})
        info["step"] = int(state.get("global_step", 0))
        run_id = info.get("run_id")
        if not run_id or spec.init_args.get("run_id"):
            return info
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(spec.init_args.tracking_uri).get_run(run_id)
        except MlflowException:
            from flowmatch.tracking.evaluation_run import EVALUATED_RUN_TAG

            tag = "flowmatch.resumed_from_run" if stage == "fit" else EVALUATED_RUN_TAG
            print(f"note: the checkpoint's MLflow run {run_id} is not in {spec.init_args.tracking_uri}; "
                  f"this {'resumed fit' if stage == 'fit' else stage} logs to a new run tagged {tag}", file=sys.stderr)
            info["new_run"] = True
            tags = dict(spec.init_args.get("tags") or {})
            tags[tag] = run_id
            spec.init_args.tags = tags
            return info
        spec.init_args.run_id = run_id
        info["into_run"] = True
        return info

    # --- the trainer: the platform's callbacks, atomic checkpoint files ---------------------------------
    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init.get(str(self.subcommand), self.config_init) if self.subcommand else self.config_init
        trainer_config = {**cfg.get("trainer", {}), **kwargs}
        configured = trainer_config.get("callbacks") or []
        configured = list(configured) if isinstance(configured, list) else [configured]
        checkpoint = [cfg["checkpoint"]] if trainer_config.get("enable_checkpointing") is not False else []
        callbacks = self._platform_callbacks(trainer_config, configured, checkpoint)
        trainer = super().instantiate_trainer(**{**kwargs, "callbacks": callbacks})  # adds final_model and the config saver
        self._harden_checkpoint_io(trainer)
        self._resilient_tracking(trainer)
        resumed, evaluated = getattr(self, "_resumed_from", None), getattr(self, "_evaluated", None)
        for cb in trainer.callbacks:
            if isinstance(cb, MLflowSaveConfig) and resumed and not resumed.get("new_run"):
                cb.resumed_from = resumed
            if isinstance(cb, MLflowSaveConfig) and evaluated and evaluated.get("into_run"):
                cb.evaluated = evaluated
        if evaluated:
            from flowmatch.tracking.evaluation_run import log_at_checkpoint_step, log_evaluation_into_run

            for logger in trainer.loggers:
                if isinstance(logger, MLFlowLogger):
                    log_at_checkpoint_step(logger, int(evaluated.get("step", 0)))
                    if evaluated.get("into_run") and logger.run_id == evaluated.get("run_id"):
                        log_evaluation_into_run(logger, str(self.subcommand))
        return trainer

    def _platform_callbacks(self, trainer_config, configured: list, checkpoint: list) -> list:
        """The configured callbacks with those every run gets (unless the config has its own of the kind)."""
        from flowmatch.callbacks.data_match import MatchModelToData
        from flowmatch.data.health import DataHealthLogger

        def missing(kind) -> bool:
            return not any(isinstance(cb, kind) for cb in configured)

        out = [MatchModelToData()] if missing(MatchModelToData) else []  # first: the others may need the sample shape
        out += [*configured, *checkpoint]
        if trainer_config.get("enable_progress_bar") is not False and missing(ProgressBar):
            from flowmatch.tracking.progress import StepProgressBar

            out.append(StepProgressBar())
        if getattr(self, "_evaluate_ema", False):
            from flowmatch.callbacks.ema import EMA

            if missing(EMA):
                out.append(EMA())  # validate / test a checkpoint with its EMA weights by default
        if missing(DataHealthLogger):
            out.append(DataHealthLogger())
        return out

    @staticmethod
    def _resilient_tracking(trainer) -> None:
        """Training goes on when an http(s) tracking server goes away mid-run (flowmatch.tracking.resilient).
        Only rank 0 has loggers (before_instantiate_classes)."""
        from flowmatch.tracking.resilient import UNSENT_FILE, make_resilient

        for logger in trainer.loggers:
            make_resilient(logger, os.path.join(trainer.default_root_dir, UNSENT_FILE))

    @staticmethod
    def _harden_checkpoint_io(trainer) -> None:
        """Atomic writes and safe unpickling for checkpoint files (unless a plugin chose its own IO)."""
        from lightning.fabric.plugins import TorchCheckpointIO

        from flowmatch.checkpoints import AtomicCheckpointIO

        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and ckpt is not None and ckpt.last_model_path:
            path = ckpt.last_model_path
            print(f"\ncheckpoint: {path}")
            if os.path.isdir(path):
                print(f"consolidate it (DeepSpeed):  python -m flowmatch convert-checkpoint {path} --out model.ckpt")
                print("sample it:  python -m flowmatch sample --ckpt model.ckpt --out samples/")
            else:
                print(f"sample it:  python -m flowmatch sample --ckpt {path} --out samples/")
        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger) and self.trainer.is_global_zero:
                print(f"MLflow run: {logger.run_id} (experiment {logger.experiment_id}) in {tracking_uri(logger)}")
