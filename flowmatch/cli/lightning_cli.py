"""The LightningCLI behind `fit`, `validate`, `test` and `predict`.

Model and data are given in subclass mode (``class_path`` / ``init_args``), several ``--config``
files compose, OmegaConf interpolation ``${...}`` is resolved over the merged config, and the data
module's shape facts are linked into the model so configs need not repeat them.
"""

import os

from jsonargparse import set_parsing_settings

from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from flowmatch.objectives.base import FlowObjective
from flowmatch.tracking.mlflow_config import MLflowSaveConfig

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class FlowCLI(LightningCLI):
    def __init__(self, args=None, run=True):
        # `${trainer.max_steps}` in any config file refers to the merged config of the command
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        super().__init__(
            model_class=FlowObjective,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=MLflowSaveConfig,
            save_config_kwargs={"save_to_log_dir": False},
            parser_kwargs={"parser_mode": "omegaconf+", "default_env": False, "prog": "python -m flowmatch"},
            auto_configure_optimizers=False,
            trainer_defaults={
                "default_root_dir": "runs",
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
        # the model generates samples shaped like the data's; the network's class count follows the data's
        parser.link_arguments("data.sample_shape", "model.init_args.sample_shape", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "step{step:07d}", "checkpoint.auto_insert_metric_name": False})

    def _instantiate_trainer(self, config, callbacks):
        # `--trainer.enable_checkpointing false` must drop the default checkpoint callback, not clash with it
        if config.get("enable_checkpointing") is False:
            callbacks = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and ckpt is not None and ckpt.last_model_path:
            print(f"\ncheckpoint: {ckpt.last_model_path}")
            print(f"sample it:  python -m flowmatch sample --ckpt {ckpt.last_model_path} --out samples/")
