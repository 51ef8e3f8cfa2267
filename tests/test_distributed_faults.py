"""A 2-process run (DDP over gloo on CPU, toy 2-D rectified flow, the real CLI) that loses a process:

* rank 1 killed (SIGKILL) after the first checkpoint: rank 0 exits within seconds with status 1 and a clear
  `error: another process of this distributed run went away ...` naming the last checkpoint, no traceback;
  that checkpoint is intact, and the run resumes from it on 2 processes;
* rank 0 killed: rank 1 does not hang either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from cli_utils import REPO

FIT = ["fit", "--config", str(REPO / "experiments" / "toy2d_rf.yaml"), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
       "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.val_check_interval", "100000", "--trainer.callbacks", "[]",
       "--data.init_args.num_train", "4096", "--checkpoint.every_n_train_steps", "20", "--trainer.default_root_dir", "run"]
BOUND_S = 60  # a dead peer is seen within seconds over gloo; this only keeps a regression from hanging the suite


def _launch(cwd: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "flowmatch", *FIT, *extra], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _rank1_of(proc: subprocess.Popen) -> int:
    """Lightning's launcher starts rank 1 as a child of rank 0 (the process we started)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _wait_for_checkpoint(cwd: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list((cwd / "run" / "checkpoints").glob("step*.ckpt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.2)
    time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status != "Z"


def test_rank_killed_the_survivor_stops_clearly_and_the_run_resumes(tmp_path):
    proc = _launch(tmp_path, "--trainer.max_steps", "100000")
    _wait_for_checkpoint(tmp_path, proc)
    os.kill(_rank1_of(proc), signal.SIGKILL)
    start = time.time()
    try:
        _, err = proc.communicate(timeout=BOUND_S)
    finally:
        proc.kill()
    print(f"rank 0 exited {time.time() - start:.1f} s after rank 1 was killed")
    assert proc.returncode == 1
    assert "error: another process of this distributed run went away (rank 0 of 2 saw:" in err, err[-3000:]
    assert "Traceback" not in err and "--ckpt_path run/checkpoints/last.ckpt" in err, err[-3000:]

    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)  # intact, whole
    step = saved["global_step"]
    assert step > 0 and step % 20 == 0
    resumed = _launch(tmp_path, "--trainer.max_steps", str(step + 6), "--ckpt_path", "run/checkpoints/last.ckpt")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step + 6


def test_rank_zero_killed_rank_one_does_not_hang(tmp_path):
    proc = _launch(tmp_path, "--trainer.max_steps", "100000")
    _wait_for_checkpoint(tmp_path, proc)
    rank1 = _rank1_of(proc)
    proc.kill()
    proc.wait()  # (not communicate: rank 1 holds the same pipes open while it lives)
    deadline = time.time() + BOUND_S
    while _alive(rank1) and time.time() < deadline:
        time.sleep(0.2)
    alive = _alive(rank1)
    if alive:
        os.kill(rank1, signal.SIGKILL)
    proc.stdout.close()
    proc.stderr.close()
    assert not alive, f"rank 1 still running {BOUND_S} s after rank 0 was killed"
