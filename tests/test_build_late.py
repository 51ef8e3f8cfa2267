"""Every backbone, built through the platform's CLI, is built late: in the objective's ``configure_model``.

The CLI hands the objective a factory for the network config (``network: {class_path, init_args}``), not
a network. Lightning calls ``configure_model`` inside the strategy's context, after the ``setup`` hooks;
DeepSpeed ZeRO-3 shards the parameters there as they are created. So: after the CLI has instantiated
everything, no network exists; in ``setup`` still none; by ``on_fit_start`` it does, of the configured
class, and one training step runs. Each model config is the repository's own, shrunk to one block.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "configs" / "model"
SHRINK = ["--model.init_args.network.init_args.depth", "1"]
LATENTS = ["--data", "helpers_latents.RandomLatentsDataModule", "--data.channels", "16", "--data.size", "8",
           "--data.pooled_dim", "384", "--data.context_dim", "384", "--data.num_tokens", "5"]
TOY = ["--data", "flowmatch.data.toy2d.Toy2DDataModule", "--data.batch_size", "8"]
BACKBONES = {  # name -> (network config, its class, data and size arguments)
    "mlp": (MODELS / "mlp_toy.yaml", "MLPVelocity", [*TOY, "--model.init_args.network.init_args.hidden", "8", *SHRINK]),
    "dit": (MODELS / "arch" / "dit.yaml", "DiT", [*LATENTS, *SHRINK]),
    "crossdit": (MODELS / "arch" / "crossdit.yaml", "CrossDiT", [*LATENTS, *SHRINK]),
    "mmdit": (MODELS / "arch" / "mmdit_2sets.yaml", "MMDiT", [*LATENTS, *SHRINK]),
    "mmdit_3sets": (MODELS / "arch" / "mmdit_3sets.yaml", "MMDiT", [*LATENTS, *SHRINK]),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _network(module: torch.nn.Module) -> torch.nn.Module | None:
    """The objective's network submodule, if it exists (read without triggering a lazy build)."""
    return dict(module.named_children()).get("net")


class RecordBuild(lightning.Callback):
    """Whether the network existed at ``setup`` (before configure_model) and at ``on_fit_start`` (after it)."""

    def __init__(self):
        self.at_setup = self.at_fit_start = None

    def setup(self, trainer, pl_module, stage):
        self.at_setup = _network(pl_module)

    def on_fit_start(self, trainer, pl_module):
        self.at_fit_start = _network(pl_module)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_cli_builds_the_network_in_configure_model(name, tmp_path, monkeypatch):
    from flowmatch.cli.lightning_cli import FlowCLI

    config, class_name, extra = BACKBONES[name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    monkeypatch.setattr(sys, "argv", ["python -m flowmatch"])  # pytest's own arguments are not the CLI's
    args = ["--model", "flowmatch.objectives.RectifiedFlow", "--model.init_args.network", str(config), *extra,
            "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.callbacks", "null", "--final_model.log", "false"]
    cli = FlowCLI(args=args, run=False)  # what `fit` instantiates, before it runs
    objective = cli.model
    assert _network(objective) is None, "the CLI built the network before configure_model"
    assert not any(type(m).__name__ == class_name for m in objective.modules())
    record = RecordBuild()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(objective, datamodule=cli.datamodule)
    assert record.at_setup is None  # Lightning's setup hooks run before configure_model
    assert type(record.at_fit_start).__name__ == class_name and record.at_fit_start is _network(objective)
    assert cli.trainer.global_step == 1
