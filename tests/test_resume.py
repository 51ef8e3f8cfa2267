"""Checkpoints and resume through the real CLI (toy 2-D rectified flow, subprocesses):

* N steps, checkpoint, resume, M more steps ends at exactly the weights (and EMA) of N + M steps in one
  go: optimizer state, learning-rate warm-up, step counter, data position and every RNG stream continue;
* a fit killed with SIGKILL resumes from its last checkpoint, finishes, and MLflow shows one continued run
  with the metrics from before the checkpoint kept;
* a NaN loss stops the run with `error:` (exit 1), names the step and keeps the last good checkpoint;
* checkpoint files are written atomically: a failing write leaves the previous file intact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cli_utils import REPO, run_cli

TOY = REPO / "experiments" / "toy2d_rf.yaml"


def _callbacks(tmp_path: Path, name: str, weights_dir: Path | None = None, decay: float = 0.9) -> Path:
    cbs = [
        {"class_path": "flowmatch.callbacks.PointSampleMetrics", "init_args": {"samplers": ["euler2"], "num_samples": 100}},
        {"class_path": "flowmatch.callbacks.EMA", "init_args": {"decay": decay}},
    ]
    if weights_dir is not None:
        cbs.append({"class_path": "helpers_latents.SaveNetworkWeights", "init_args": {"dirpath": str(weights_dir)}})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cbs))
    return path


def _fit(tmp_path: Path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    out = run_cli(["fit", "--config", TOY, "--trainer.enable_progress_bar", "false", *args], tmp_path, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


# 1024 points in batches of 256: 4 batches an epoch, so 31 steps cross several epochs; validation every
# 7 steps and a learning-rate warm-up over 30 steps, so the resume point (18) is mid-epoch and mid-warm-up
RUN = ["--trainer.logger", "false", "--data.init_args.num_train", "1024", "--trainer.val_check_interval", "7",
       "--model.init_args.warmup_steps", "30", "--trainer.max_steps", "31",
       "--checkpoint.every_n_train_steps", "9", "--checkpoint.save_top_k", "-1"]


def test_resume_equals_uninterrupted_run(tmp_path):
    _fit(tmp_path, *RUN, "--trainer.callbacks", _callbacks(tmp_path, "a", tmp_path / "wa"), "--trainer.default_root_dir", "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step0000018.ckpt"
    saved = torch.load(ckpt, weights_only=True)  # safe unpickling: everything in it is plain data
    assert saved["global_step"] == 18 and saved["Toy2DDataModule"] == {"epoch": 4, "batches": 2}
    assert len(saved["rng_states"]) == 1 and "ema" in saved and saved["lr_schedulers"]

    _fit(tmp_path, *RUN, "--trainer.callbacks", _callbacks(tmp_path, "b", tmp_path / "wb"), "--trainer.default_root_dir", "b",
         "--ckpt_path", str(ckpt))
    a, b = (torch.load(tmp_path / w / "end.pt", weights_only=True) for w in ("wa", "wb"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resume: max weight difference after 18 + 13 vs 31 steps: {diff}")
    assert diff <= 1e-6

    # the step-27 checkpoints of both runs agree too: EMA, optimizer moments, scheduler, data position
    ca, cb = (torch.load(tmp_path / r / "checkpoints" / "step0000027.ckpt", weights_only=True) for r in "ab")
    for k, v in ca["ema"]["state_dict"].items():
        assert torch.allclose(v, cb["ema"]["state_dict"][k], atol=1e-6, rtol=0), k
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        for key in sa:
            assert torch.allclose(sa[key], sb[key], atol=1e-6, rtol=0), key
    assert ca["lr_schedulers"] == cb["lr_schedulers"] and ca["Toy2DDataModule"] == cb["Toy2DDataModule"]


def _wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(root.glob(path_glob)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the fit ended (status {proc.returncode}) before writing {path_glob}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {path_glob} after {timeout} s")


def test_sigkill_then_resume_continues_the_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from flowmatch.checkpoints import read_checkpoint

    args = ["fit", "--config", TOY, "--trainer.enable_progress_bar", "false", "--trainer.callbacks", _callbacks(tmp_path, "cb"),
            "--data.init_args.num_train", "2048", "--trainer.max_steps", "150", "--trainer.val_check_interval", "50",
            "--trainer.log_every_n_steps", "5", "--checkpoint.every_n_train_steps", "10", "--checkpoint.dirpath", "ckpts",
            "--trainer.logger.init_args.experiment_name", "killed"]
    env = {**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "flowmatch", *map(str, args)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for("ckpts/step0000030.ckpt", tmp_path, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the fit finished before it could be killed"

    ckpts = tmp_path / "ckpts"
    for path in ckpts.glob("*.ckpt"):  # a kill during a write leaves at most a hidden temporary file,
        read_checkpoint(path)  # never a half-written file under a checkpoint's name
    last = read_checkpoint(ckpts / "last.ckpt")
    killed_at = last["global_step"]
    assert killed_at >= 20 and killed_at % 10 == 0  # (last.ckpt is written just after step0000030.ckpt)
    run_id = last["mlflow"]["run_id"]

    # resume, with a longer budget (a changed param: MLflow keeps the original and records the change)
    out = run_cli([*args, "--trainer.max_steps", "160", "--ckpt_path", "ckpts/last.ckpt"], tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert run_id in out.stdout  # "MLflow run: <the same id>"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the fit's sqlite:///mlflow.db, in its working directory
    exp = client.get_experiment_by_name("killed")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run, continued
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["flowmatch.resumed_at_step"] == str(killed_at)
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train/loss")})
    assert steps[0] < killed_at and steps[-1] >= 155  # logged before the checkpoint: kept; then continued to the end
    assert max(m.step for m in client.get_metric_history(run_id, "val/loss")) >= 149
    assert run.data.params["trainer.max_steps"] == "150" and run.data.tags["flowmatch.changed_params"] == "trainer.max_steps"
    assert f"config_resumed_step{killed_at}.yaml" in [a.path for a in client.list_artifacts(run_id)]
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 160
    assert not list(ckpts.glob(".*.tmp-*"))  # the next writes cleared any temporary file the kill left


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from flowmatch.checkpoints import read_checkpoint

    network = {"class_path": "test_resume_helpers.NaNAfterSteps", "init_args": {"nan_from": 12}}
    (tmp_path / "net.yaml").write_text(yaml.safe_dump(network))
    out = run_cli(["fit", "--config", TOY, "--model.init_args.network", "net.yaml", "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "50", "--trainer.val_check_interval", "40",
                   "--checkpoint.every_n_train_steps", "5", "--checkpoint.dirpath", "ckpts"], tmp_path)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("error: training loss is nan at global step 12")
    assert "ckpts/last.ckpt" in err or "step0000010" in err
    kept = read_checkpoint(tmp_path / "ckpts" / "last.ckpt")
    assert kept["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_checkpoint_writes_are_atomic(tmp_path):
    from flowmatch.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "step": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "broken": _Unpicklable()}, path)
    assert io.load_checkpoint(path)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # and no temporary file is left
    # loading is safe unpickling: a checkpoint that would run code is refused
    torch.save({"state_dict": {}, "evil": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        io.load_checkpoint(tmp_path / "evil.ckpt")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))
