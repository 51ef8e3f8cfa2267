"""The CLI as a user calls it (subprocesses): help, print_config, fit -> validate -> sample, bad input."""

import json

import mlflow
import numpy as np
import pytest
import torch

from cli_utils import REPO, checkpoint_from_output, run_cli
from flowmatch.cli.main import main as flowmatch_main

TOY = REPO / "experiments" / "toy2d_rf.yaml"
SHORT = ["--trainer.max_steps", "120", "--trainer.val_check_interval", "60", "--trainer.enable_progress_bar", "false",
         "--data.init_args.num_train", "4000", "--data.init_args.num_val", "512"]


def test_top_level_help_lists_every_command(tmp_path):
    out = run_cli(["--help"], tmp_path)
    assert out.returncode == 0
    for command in ("fit", "validate", "test", "predict", "sample", "import-sd3", "prepare", "compare"):
        assert command in out.stdout


def test_every_command_has_help(tmp_path, capsys):
    out = run_cli(["fit", "--help"], tmp_path)  # as a user runs it
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout
    for command in ("validate", "test", "predict", "sample"):  # the others in this process: one import, not four
        try:
            code = flowmatch_main([command, "--help"])
        except SystemExit as exited:  # argparse's help exits
            code = exited.code
        assert code in (0, None), command
        assert "--config" in capsys.readouterr().out, command


def test_print_config_resolves_nested_files_and_interpolation(tmp_path):
    # a second config that uses OmegaConf interpolation across the merged config
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    warmup_steps: ${trainer.max_steps}\n")
    out = run_cli(["fit", "--config", TOY, "--config", extra, "--trainer.max_steps", "77", "--print_config"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "class_path: flowmatch.networks.mlp.MLPVelocity" in out.stdout  # configs/model/mlp_toy.yaml was read
    assert "warmup_steps: 77" in out.stdout
    assert "tracking_uri: sqlite:///mlflow.db" in out.stdout


@pytest.mark.parametrize(
    "override, named",
    [
        (["--model.init_args.lrr", "0.1"], "lrr"),  # unknown key
        (["--model.init_args.lr", "fast"], "lr"),  # wrong type
        (["--model.class_path", "flowmatch.objectives.NoSuchObjective"], "NoSuchObjective"),  # unknown objective
        (["--model.init_args.weighting", "bogus"], "bogus"),  # unknown loss weighting
    ],
)
def test_bad_config_exits_nonzero_and_names_the_key(tmp_path, override, named):
    out = run_cli(["fit", "--config", TOY, *override, "--trainer.max_steps", "1"], tmp_path)
    assert out.returncode != 0
    assert named in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_bad_checkpoint_paths_are_reported(tmp_path):
    out = run_cli(["validate", "--config", TOY, "--ckpt_path", "missing.ckpt"], tmp_path)
    assert out.returncode != 0 and "checkpoint not found: missing.ckpt" in out.stderr
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    out = run_cli(["sample", "--ckpt", "notes.ckpt", "--out", "s"], tmp_path)
    assert out.returncode != 0 and "notes.ckpt is not a readable PyTorch checkpoint" in out.stderr
    assert not (tmp_path / "s").exists()


def test_fit_validate_sample_roundtrip_with_mlflow(tmp_path):
    fit = run_cli(["fit", "--config", TOY, *SHORT], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / checkpoint_from_output(fit.stdout)
    assert ckpt.exists()

    # the run is in the local MLflow store with config, params, tags, metrics and the sample picture
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("toy2d").experiment_id])
    assert run.data.tags["objective"] == "RectifiedFlow" and run.data.tags["model"] == "MLPVelocity"
    assert run.data.params["model.lr"] == "0.002"
    for key in ("train/loss", "val/loss", "val/loss_t0.125", "val/loss_t1.000", "val/w2_euler8", "val/nfe_dopri5"):
        assert key in run.data.metrics, key
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts and "images" in artifacts
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2  # validated at steps 60 and 120

    val = run_cli(["validate", "--config", TOY, *SHORT, "--ckpt_path", ckpt], tmp_path)
    assert val.returncode == 0, val.stderr[-3000:]
    assert "val/loss" in val.stdout and "val/w2_dopri5" in val.stdout

    # a checkpoint of another network than the config's is refused, not silently evaluated
    other = run_cli(["validate", "--config", TOY, *SHORT, "--ckpt_path", ckpt, "--model.init_args.network.init_args.hidden", "32"], tmp_path)
    assert other.returncode != 0 and "was trained with another model than this config's" in other.stderr, other.stderr[-3000:]

    pred = run_cli(["predict", "--config", TOY, *SHORT, "--ckpt_path", ckpt, "--trainer.logger", "false"], tmp_path)
    assert pred.returncode == 0, pred.stderr[-3000:]

    out = tmp_path / "samples"
    smp = run_cli(["sample", "--ckpt", ckpt, "--steps", "8", "--solver", "euler", "--num", "500", "--out", out], tmp_path)
    assert smp.returncode == 0, smp.stderr[-3000:]
    samples = np.load(out / "samples.npy")
    assert samples.shape == (500, 2) and np.isfinite(samples).all()
    info = json.loads((out / "samples.json").read_text())
    assert info["nfe"] == 8 and info["sampler"] == "euler8"
    assert (out / "samples.png").stat().st_size > 1000

    # same seed, same samples; heun reports 2 NFE per step
    again = run_cli(["sample", "--ckpt", ckpt, "--steps", "8", "--num", "500", "--out", tmp_path / "again"], tmp_path)
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npy"), samples)
    heun = run_cli(["sample", "--ckpt", ckpt, "--solver", "heun", "--steps", "4", "--num", "100", "--out", tmp_path / "heun"], tmp_path)
    assert json.loads((tmp_path / "heun" / "samples.json").read_text())["nfe"] == 8, heun.stderr


def test_nan_loss_stops_the_run_without_writing_nan_weights(tmp_path):
    # an absurd learning rate blows the weights up within a few steps
    out = run_cli(["fit", "--config", TOY, *SHORT, "--model.init_args.lr", "1e30", "--model.init_args.warmup_steps", "0",
                   "--trainer.logger", "false"], tmp_path)
    assert out.returncode == 1
    assert "training loss is" in out.stderr and "global step" in out.stderr
    for ckpt in tmp_path.rglob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt
