"""MLflow as a team would run it: a real `mlflow server` (SQLite backend, artifacts proxied) on loopback,
two tiny toy 2-D fits with different objectives logging to it through the real CLI, everything read back
through the MLflow client (params, metrics, config, sample image, final model with its EMA weights), and
the comparison report built from the server. Plus: an unreachable server is a clear error at start-up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from cli_utils import REPO, run_cli
from helpers_mlflow import free_port, start_mlflow_server, stop_mlflow_server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port with a SQLite store in a temp dir; terminated afterwards."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = start_mlflow_server(root, port, timeout=120)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(proc)


CALLBACKS = [
    {"class_path": "flowmatch.callbacks.PointSampleMetrics", "init_args": {"samplers": ["euler1", "euler4"], "num_samples": 200}},
    {"class_path": "flowmatch.callbacks.EMA", "init_args": {"decay": 0.9}},
]


def test_two_fits_on_a_server_then_compare(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from flowmatch.objectives.loading import load_objective

    (tmp_path / "callbacks.yaml").write_text(yaml.safe_dump(CALLBACKS))
    for experiment in ("toy2d_rf", "toy2d_fm"):
        out = run_cli(["fit", "--config", REPO / "experiments" / f"{experiment}.yaml", "--trainer.enable_progress_bar", "false",
                       "--trainer.logger.init_args.tracking_uri", mlflow_server, "--trainer.logger.init_args.experiment_name", "server_test",
                       "--trainer.max_steps", "40", "--trainer.val_check_interval", "20", "--trainer.log_every_n_steps", "5",
                       "--data.init_args.num_train", "1024", "--data.init_args.num_val", "256", "--trainer.callbacks", "callbacks.yaml"],
                      tmp_path)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local store

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("server_test")
    runs = {r.data.tags["objective"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"RectifiedFlow", "FlowMatching"}
    for objective, run in runs.items():
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        # tags and params: resolved config flattened, seed, git commit
        tags, params = run.data.tags, run.data.params
        assert tags["model"] == "MLPVelocity" and tags["dataset"] == "Toy2DDataModule" and tags["sampler"] == "UniformTime()"
        assert tags["eval_samplers"] == "euler1,euler4" and tags["seed"] == "0" and tags["mlflow.source.git.commit"]
        assert params["model.lr"] == "0.002" and params["trainer.max_steps"] == "40" and params["data.target"] == "8gaussians"
        assert params["seed_everything"] == "0" and "lr" not in params  # only the prefixed, flattened config
        # metrics with stable names, over steps
        m = run.data.metrics
        for key in ("train/loss", "val/loss", "val/loss_t0.125", "val/loss_t1.000", "val/w2_euler4", "val/nfe_euler4", "val/w2_euler1"):
            assert key in m, key
        assert m["val/nfe_euler4"] == 4.0
        assert len(client.get_metric_history(rid, "val/loss")) == 2
        # artifacts: the config, sample images over steps, the final model with its EMA weights
        config = yaml.safe_load(Path(client.download_artifacts(rid, "config.yaml", str(tmp_path / rid))).read_text())
        assert config["model"]["class_path"] == f"flowmatch.objectives.{objective}"
        images = [a.path for a in client.list_artifacts(rid, "images") if a.path.endswith(".png")]
        assert len(images) == 2 and all("samples+step+" in p for p in images)
        final = client.download_artifacts(rid, "model/final.ckpt", str(tmp_path / rid))
        model = load_objective(final)
        assert type(model).__name__ == objective and model.loaded_weights == "ema"

    # the comparison report, from the server
    report = tmp_path / "report"
    out = run_cli(["compare", "--tracking_uri", mlflow_server, "--experiment", "server_test", "--out", report], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    page = (report / "index.html").read_text()
    for run in runs.values():
        assert run.info.run_id in page and run.info.run_name in page
    for name in ("loss_curves.png", "loss_per_t.png", "quality_vs_nfe.png"):
        assert (report / "plots" / name).stat().st_size > 5000
    assert len(list((report / "images").glob("*.png"))) == 4  # two steps of two runs
    assert page.count("data:image/png;base64,") == 3 + 4
    assert "model.class_path" in page or "objective" in page  # the params that differ (the objective) are tabled

    # filters narrow the comparison
    out = run_cli(["compare", "--tracking_uri", mlflow_server, "--experiment", "server_test", "--out", tmp_path / "rf",
                   "--filter", "tags.objective = 'RectifiedFlow'"], tmp_path)
    assert out.returncode == 0 and "compared 1 runs" in out.stdout


def test_unreachable_server_is_an_error_before_training(tmp_path):
    port = free_port()  # nothing listens there
    start = time.time()
    out = run_cli(["fit", "--config", REPO / "experiments" / "toy2d_rf.yaml",
                   "--trainer.logger.init_args.tracking_uri", f"http://127.0.0.1:{port}"], tmp_path)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("error: the MLflow tracking server http://127.0.0.1:") and "not reachable" in err and "mlflow server" in err
    assert not (tmp_path / "runs").exists()  # nothing was built or trained
    assert time.time() - start < 60
