"""experiments/flux_d16.yaml as a user runs it: `fit` for a few steps of a 1 + 1 block FLUX in a fresh working
directory (it writes the demo shards itself), tracked in MLflow; `sample` of its checkpoint from prompts; and
the clear refusal when the checkpoint is validated under the MM-DiT experiment.

The full-size run (1,200 steps of configs/model/flux_demo.yaml) is measured in docs/models.md."""

from pathlib import Path

import mlflow
import pytest

from cli_utils import run_cli
from helpers_main_job import fit_in_fresh_directory

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments/flux_d16.yaml"
NET = "--model.init_args.network.init_args."
TINY = [f"{NET}num_double_blocks", "1", f"{NET}num_single_blocks", "1", f"{NET}hidden_size", "128", f"{NET}num_heads", "2"]
SHORT = [*TINY, "--trainer.max_steps", "6", "--trainer.val_check_interval", "6", "--data.init_args.steps_per_epoch", "6",
         "--data.init_args.num_workers", "1", "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def flux_job(tmp_path_factory, trained_digit_classifier):
    return fit_in_fresh_directory(tmp_path_factory.mktemp("flux_job"), trained_digit_classifier["path"], EXPERIMENT, SHORT)


def test_fit_tracks_a_flux_run_in_mlflow(flux_job):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{flux_job['work'] / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("demo_digits").experiment_id])[0]
    assert run.data.tags["model"] == "FLUX" and run.data.tags["mlflow.runName"] == "flux_d16"
    assert run.data.params["model.network.num_single_blocks"] == "1"
    for key in ("train/loss", "val/loss", "val/caption_acc_euler25_cfg1p5", "val/fd_ratio_euler25"):
        assert key in run.data.metrics, f"{key} missing from {sorted(run.data.metrics)}"


def test_sample_draws_images_from_prompts(flux_job):
    out = flux_job["work"] / "samples"
    sample = run_cli(["sample", "--ckpt", flux_job["ckpt"], "--prompts", "a 7", "--num", "2", "--steps", "2", "--guidance", "2",
                      "--out", out], cwd=flux_job["work"], timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert len(list((out / "images").glob("*.png"))) == 2 and (out / "grid.png").is_file()


def test_a_flux_checkpoint_under_the_mmdit_experiment_is_refused(flux_job):
    mmdit = run_cli(["validate", "--config", REPO / "experiments/mmdit_d16.yaml", "--ckpt_path", flux_job["ckpt"]],
                    cwd=flux_job["work"], timeout=300)
    assert mmdit.returncode == 1, mmdit.stderr[-2000:]
    assert "flowmatch.networks.flux.FLUX" in mmdit.stderr and "Traceback" not in mmdit.stderr, mmdit.stderr[-2000:]
