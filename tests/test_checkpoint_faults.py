"""Checkpoints where the disk says no:

* a fit whose checkpoint directory cannot be written is refused before its first step, naming the directory
  (`error: ...`, exit 1), not with a traceback at its first save;
* a checkpoint write that fails (here a file-size limit, as a full disk fails it: EFBIG instead of ENOSPC) is a
  CheckpointError naming the file, and the previous checkpoint under that name stays intact and readable.
"""

from __future__ import annotations

import resource
import signal

import pytest
import torch

from cli_utils import REPO, run_cli


def test_an_unwritable_checkpoint_directory_is_refused_before_training(tmp_path):
    (tmp_path / "blocker").write_text("a file where the run's directory should be")
    out = run_cli(["fit", "--config", REPO / "experiments" / "toy2d_rf.yaml", "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "5",
                   "--trainer.default_root_dir", "blocker/run"], tmp_path, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert "error: cannot write checkpoints to" in out.stderr and "blocker/run/checkpoints" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "train/loss" not in out.stdout  # refused before the first step


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    from flowmatch.checkpoints import AtomicCheckpointIO, CheckpointError

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}, "step": 1}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        with pytest.raises(CheckpointError, match=r"could not write the checkpoint .*last\.ckpt: File too large.*intact"):
            io.save_checkpoint({"state_dict": {"w": torch.zeros(1 << 20)}, "step": 2}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert io.load_checkpoint(path)["step"] == 1  # the previous checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
