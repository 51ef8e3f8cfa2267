"""The MLflow tracking server going away mid-run (a real `mlflow server`, killed with SIGKILL, the real CLI):

* it comes back while the run goes on: training never stops, the loss of tracking and its return are each said
  once, and the run's train/loss curve in MLflow has every logged step (the kept values were sent with their
  steps); the run ends FINISHED;
* it is still away when the run ends: the run finishes (status 0) and says where the kept values are; once the
  server is back, `python -m flowmatch sync-metrics FILE` sends them and the curve is complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cli_utils import REPO, run_cli
from helpers_mlflow import free_port, start_mlflow_server, stop_mlflow_server

STEPS, EVERY = 400, 10


def _fit(tmp_path: Path, uri: str, name: str) -> subprocess.Popen:
    env = {**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "OMP_NUM_THREADS": "1", "FLOWMATCH_TRACKING_PROBE_S": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "flowmatch", "fit", "--config", str(REPO / "experiments" / "toy2d_rf.yaml"),
           "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.tracking_uri", uri,
           "--trainer.logger.init_args.experiment_name", "outage", "--trainer.logger.init_args.run_name", name,
           "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", str(EVERY), "--trainer.val_check_interval", "200",
           "--data.init_args.num_train", "2048", "--trainer.default_root_dir", name,
           "--trainer.callbacks+=helpers_tracking.SlowSteps", "--trainer.callbacks.seconds", "0.05"]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_logged_loss(client, name: str, fit: subprocess.Popen) -> str:
    deadline = time.time() + 240
    while time.time() < deadline:
        assert fit.poll() is None, fit.communicate()[1][-3000:]
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'") if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
            return runs[0].info.run_id
        time.sleep(0.3)
    raise AssertionError("no train/loss reached the server")


def _complete_curve(client, run_id: str) -> list[int]:
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(EVERY - 1, STEPS, EVERY)), steps  # every logged step, none twice, no gap
    return steps


def test_tracking_server_away_mid_run(tmp_path):
    from mlflow.tracking import MlflowClient

    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    client = MlflowClient(uri)
    try:
        # 1. the server comes back during the run
        fit = _fit(tmp_path, uri, "back_mid_run")
        run_id = _wait_for_logged_loss(client, "back_mid_run", fit)
        stop_mlflow_server(server, kill=True)
        time.sleep(3)
        server = start_mlflow_server(root, port)
        out, err = fit.communicate(timeout=400)
        assert fit.returncode == 0, err[-3000:]
        assert err.count("lost the MLflow tracking server") == 1 and err.count("answers again after") == 1, err[-3000:]
        steps = _complete_curve(client, run_id)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert not (tmp_path / "back_mid_run" / "unsent_metrics.jsonl").exists()
        print(f"server away mid-run: {len(steps)} train/loss steps in MLflow, none missing")

        # 2. the server is still away when the run ends: the kept values wait in a file, sync-metrics sends them
        fit = _fit(tmp_path, uri, "away_at_end")
        run_id = _wait_for_logged_loss(client, "away_at_end", fit)
        stop_mlflow_server(server, kill=True)
        out, err = fit.communicate(timeout=400)
        assert fit.returncode == 0, err[-3000:]
        unsent = tmp_path / "away_at_end" / "unsent_metrics.jsonl"
        assert "is still away at the end of the run" in err and f"sync-metrics {Path('away_at_end') / 'unsent_metrics.jsonl'}" in err, err[-3000:]
        server = start_mlflow_server(root, port)
        sync = run_cli(["sync-metrics", unsent], tmp_path)
        assert sync.returncode == 0 and "sent " in sync.stdout, sync.stderr[-2000:]
        _complete_curve(client, run_id)
        assert not unsent.exists() and unsent.with_name(unsent.name + ".sent").exists()
    finally:
        stop_mlflow_server(server, kill=True)
