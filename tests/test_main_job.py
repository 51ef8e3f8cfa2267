"""The main job's wiring, end to end, as a user runs it: `fit --config experiments/mmdit_d16.yaml` in a fresh
working directory (it writes the demo shards itself), with overrides that make it a few steps of a depth-2
MM-DiT; then `test` of its checkpoint (the table of Fréchet distance and caption adherence per sampler),
`sample` with prompts, and the errors for a checkpoint of another objective or model.

The full-size run (1,200 steps of the depth-4 model) and its targets are measured in docs/main_job.md."""

from pathlib import Path

import mlflow
import pytest
from PIL import Image

from cli_utils import run_cli
from helpers_main_job import EXPERIMENT, TEST_SAMPLERS, TINY

REPO = Path(__file__).resolve().parents[1]


def _run(work: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo_digits").experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def test_fit_prepares_the_demo_and_tracks_sample_quality_in_mlflow(main_job):
    work = main_job["work"]
    assert (work / "data/demo/manifest.json").is_file()  # written by the job itself (prepare_source: demo)
    client, runs = _run(work)
    fit_run = runs[0]
    metrics = fit_run.data.metrics
    for key in ("train/loss", "val/loss", "val/loss_t0.125", "val/loss_t1.000", "val/fd_real", "val/fd_euler25", "val/fd_ratio_euler25_cfg1p5",
                "val/caption_acc_euler25", "val/caption_acc_euler25_cfg1p5", "val/caption_acc_syn_euler25_cfg1p5", "val/nfe_euler25_cfg1p5"):
        assert key in metrics, f"{key} missing from {sorted(metrics)}"
    assert metrics["val/nfe_euler25_cfg1p5"] == 50 and metrics["val/nfe_euler25"] == 25  # guidance: 2 network passes per step
    assert 0.0 <= metrics["val/caption_acc_euler25_cfg1p5"] <= 1.0 and metrics["val/fd_real"] > 0
    assert metrics["val/fd_ratio_euler25"] == pytest.approx(metrics["val/fd_euler25"] / metrics["val/fd_real"], rel=1e-5)
    assert len(client.get_metric_history(fit_run.info.run_id, "val/fd_euler25_cfg1p5")) == 2  # at steps 8 and 16
    params, tags = fit_run.data.params, fit_run.data.tags
    assert (tags["objective"], tags["model"], tags["time_sampler"]) == ("RectifiedFlow", "MMDiT", "LogitNormalTime")
    assert params["model.network.qk_norm"] == "True" and params["model.time_sampler.s"] == "1.0"
    images = [a.path for a in client.list_artifacts(fit_run.info.run_id, "images") if a.path.endswith(".png")]
    val_grids = sorted(p for p in images if p.rsplit("/", 1)[-1].startswith("samples+"))  # (not `test`'s test_samples)
    assert val_grids, images  # the sample grid of each validation
    grid = Image.open(client.download_artifacts(fit_run.info.run_id, val_grids[-1], str(work)))
    assert grid.size == (10 * 34 + 2, 3 * 34 + 2)  # 10 class captions; rows: real held-out digits, then each sampler


def test_test_prints_the_table_and_logs_stable_names(main_job, main_job_tested):
    work = main_job["work"]
    out = main_job_tested.stdout
    assert "test: sample quality (EMA weights; FD of real vs real held-out halves" in out
    table = out[out.index("test: sample quality"):].splitlines()
    assert "caption acc" in table[1] and "FD/real" in table[1]
    assert [row.split()[0] for row in table[3:6]] == ["euler1", "euler2_cfg3", "dopri5"]
    assert [int(row.split()[1]) for row in table[3:5]] == [1, 4]  # NFE: network evaluations per image, guidance's 2 passes a step
    client, runs = _run(work)
    # the test logged into the run that trained the checkpoint: one run, its test metrics beside its val metrics
    assert len(runs) == 1, [(r.info.run_name, r.data.tags.get("stage")) for r in runs]
    run = runs[0]
    metrics, tags = run.data.metrics, run.data.tags
    for key in ("test/loss", "test/fd_real", "test/fd_euler1", "test/caption_acc_euler2_cfg3", "test/caption_acc_syn_dopri5", "test/nfe_dopri5",
                "val/loss", "val/fd_euler25"):
        assert key in metrics, f"{key} missing from {sorted(metrics)}"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/loss")] == [16]  # at the checkpoint's step
    assert run.info.status == "FINISHED" and tags["stage"] == "fit"  # the training run stays what it was
    assert tags["flowmatch.test_at_step"] == "16" and tags["flowmatch.test_status"] == "FINISHED"
    assert "config_test_step16.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert any("test_samples" in a.path for a in client.list_artifacts(run.info.run_id, "images"))


def test_validate_of_a_checkpoint_from_another_store_logs_a_linked_run(main_job, tmp_path):
    work = main_job["work"]
    (work / "test_samplers.yaml").write_text(TEST_SAMPLERS)
    _, runs = _run(work)
    other = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    val = run_cli(["validate", "--config", EXPERIMENT, "--config", "test_samplers.yaml", *TINY, "--ckpt_path", main_job["ckpt"],
                   "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.tracking_uri", other], cwd=work, timeout=600,
                  extra_env={"OMP_NUM_THREADS": "1"})
    assert val.returncode == 0, val.stderr[-4000:]
    assert f"the checkpoint's MLflow run {runs[0].info.run_id} is not in {other}" in val.stderr
    client = mlflow.MlflowClient(tracking_uri=other)
    [run] = client.search_runs([client.get_experiment_by_name("demo_digits").experiment_id])
    assert run.data.tags["flowmatch.evaluates_run"] == runs[0].info.run_id and run.data.tags["stage"] == "validate"
    assert "val/fd_euler2" in run.data.metrics


def test_sample_draws_images_for_prompts(main_job):
    work = main_job["work"]
    out = work / "samples"
    sample = run_cli(["sample", "--ckpt", main_job["ckpt"], "--prompts", "a 7", "a thick three", "--num", "2", "--steps", "3",
                      "--guidance", "3", "--out", out], cwd=work, timeout=300)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert len(list((out / "images").glob("*.png"))) == 4 and (out / "grid.png").is_file()


def test_a_checkpoint_of_another_objective_or_model_is_refused(main_job):
    work, ckpt = main_job["work"], main_job["ckpt"]
    fm = run_cli(["test", "--config", REPO / "experiments/fm_mmdit_d16.yaml", *TINY, "--ckpt_path", ckpt], cwd=work, timeout=300)
    assert fm.returncode == 1
    assert "model: config 'flowmatch.objectives.FlowMatching', checkpoint 'flowmatch.objectives.RectifiedFlow'" in fm.stderr
    deeper = run_cli(["validate", "--config", EXPERIMENT, "--ckpt_path", ckpt], cwd=work, timeout=300)  # the config's depth 4
    assert deeper.returncode == 1 and "network.depth: config 4, checkpoint 2" in deeper.stderr
    assert "Traceback" not in fm.stderr + deeper.stderr
