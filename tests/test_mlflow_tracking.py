"""Tracking pieces in-process: the tracking-URI check (a real HTTP server on loopback), the config
flattening and tags, and the progress bar's whole-run rate and ETA."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from flowmatch.tracking.mlflow_config import _with_args, flatten_config
from flowmatch.tracking.progress import StepProgressBar
from flowmatch.tracking.server import TrackingServerError, check_tracking_uri


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    servers = []

    def start(status: int) -> str:
        handler = type("H", (_Health,), {"status": status})
        server = HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_tracking_uri_check(http_server):
    check_tracking_uri("sqlite:///mlflow.db")  # local stores are not checked
    check_tracking_uri("postgresql://user@db/mlflow")
    check_tracking_uri(http_server(200))
    with pytest.raises(TrackingServerError, match="HTTP 500"):
        check_tracking_uri(http_server(500))
    dead = http_server(200)
    with pytest.raises(TrackingServerError, match="not reachable.*mlflow server"):
        check_tracking_uri(dead.rsplit(":", 1)[0] + ":1")


def test_flattened_params_and_sampler_tag():
    cfg = {"model": {"class_path": "flowmatch.objectives.RectifiedFlow",
                     "init_args": {"lr": 0.002, "betas": [0.9, 0.999],
                                   "time_sampler": {"class_path": "flowmatch.time_samplers.LogitNormalTime", "init_args": {"m": 0.0, "s": 1.0}}}}}
    flat = flatten_config(cfg)
    assert flat["model.lr"] == "0.002" and flat["model.betas"] == "[0.9, 0.999]"
    assert flat["model.time_sampler.class_path"] == "flowmatch.time_samplers.LogitNormalTime" and flat["model.time_sampler.s"] == "1.0"
    assert _with_args(cfg["model"]["init_args"]["time_sampler"]) == "LogitNormalTime(m=0.0, s=1.0)"


def test_progress_bar_counts_steps_with_rate_and_eta(tmp_path, capsys):
    from flowmatch.networks.mlp import MLPVelocity
    from flowmatch.objectives import RectifiedFlow

    torch.manual_seed(0)
    model = RectifiedFlow(MLPVelocity(hidden=8, depth=1, time_dim=4), lr=1e-3)
    data = DataLoader([{"x0": x} for x in torch.randn(24, 2)], batch_size=8)  # 3 batches an epoch: 4 epochs
    bar = StepProgressBar()
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[bar], default_root_dir=tmp_path)
    trainer.fit(model, data)
    assert bar.train_progress_bar.total == 12 and bar.train_progress_bar.n == 12  # one bar over the run, not per epoch
    text = capsys.readouterr().out
    assert re.search(r"12/12 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+step/s", text), text[-500:]  # elapsed<remaining, steps/s
    assert "Epoch 3" in text


@pytest.mark.parametrize("outcome", ["success", "failed"])
def test_an_evaluation_in_the_training_run_keeps_its_status_and_end_time(tmp_path, outcome):
    """A test that crashes inside a finished training run must not make the run look failed (studies look for FINISHED)."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from flowmatch.tracking.evaluation_run import log_at_checkpoint_step, log_evaluation_into_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp, run_name="fit").info.run_id
    client.set_terminated(run_id, "FINISHED")
    before = client.get_run(run_id).info
    logger = MLFlowLogger(tracking_uri=uri, run_id=run_id)
    log_at_checkpoint_step(logger, 1200)
    log_evaluation_into_run(logger, "test")
    logger.log_metrics({"test/loss": 0.5}, step=0)  # what Lightning passes in a test (only fit restores its step)
    logger.finalize(outcome)
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.end_time
    assert after.data.tags["flowmatch.test_status"] == ("FAILED" if outcome == "failed" else "FINISHED")
    assert after.data.metrics["test/loss"] == 0.5
    assert [m.step for m in client.get_metric_history(run_id, "test/loss")] == [1200]
    plain = MLFlowLogger(tracking_uri=uri, run_id=run_id)  # Lightning's own logger would end the run again
    plain.log_metrics({"test/loss": 0.5}, step=16)
    plain.finalize("failed")
    assert client.get_run(run_id).info.status == "FAILED"
