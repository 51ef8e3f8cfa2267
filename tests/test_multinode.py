"""Two "nodes" on this machine: two torchrun launches (--nnodes 2, node ranks 0 and 1, one process each, over the
loopback address, gloo on CPU) of the real CLI with DeepSpeed ZeRO-2 on real latent shards:

* both train, and in one pass the two nodes see disjoint samples that together are the whole training split;
* global rank 0 alone logs, to one MLflow run (the other rank never opens the SQLite store: launched together,
  both used to create it at once and collide);
* the DeepSpeed checkpoint resumes on two nodes (the same MLflow run continues), and `convert-checkpoint`
  makes one file of it that a single-process `validate` reads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from cli_utils import REPO, run_cli

pytest.importorskip("deepspeed")

BATCH, STEPS = 8, 12  # 192 training samples in 12 shards: 6 shards a node, 96 samples = 12 batches of 8 each


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from flowmatch.cli.prepare import main as prepare_main

    out = tmp_path_factory.mktemp("multinode") / "shards"
    assert prepare_main(["--source", "demo", "--out", str(out), "--limit", "240", "--shard_size", "16", "--progress", "false"]) == 0
    return out


def _two_nodes(cwd: Path, shards: Path, max_steps: int, *extra: str) -> None:
    (cwd / "keys.yaml").write_text(yaml.safe_dump([{"class_path": "helpers_distributed.RecordKeys",
                                                    "init_args": {"dirpath": str(cwd / f"keys{max_steps}")}}]))
    args = ["-m", "flowmatch", "fit", "--config", str(REPO / "experiments" / "mmdit_d16.yaml"),
            "--trainer", str(REPO / "configs" / "trainer" / "deepspeed_stage_2.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.precision", "32-true",
            "--data.init_args.data_dir", str(shards), "--data.init_args.prepare_source", "null",
            "--data.init_args.batch_size", str(BATCH), "--data.init_args.num_workers", "1", "--data.init_args.steps_per_epoch", str(STEPS),
            "--data.init_args.resampled", "false", "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "6",
            "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--model.init_args.network.init_args.depth", "2", "--model.init_args.network.init_args.hidden_size", "32",
            "--model.init_args.network.init_args.num_heads", "2", "--trainer.callbacks", "keys.yaml",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "run", "--trainer.log_every_n_steps", "2",
            "--trainer.logger.init_args.experiment_name", "multinode", *extra]
    env = {**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    port = str(_free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port, *args],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (1, 0)]
    outputs = [node.communicate(timeout=500)[0] for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-5000:]


def test_two_nodes_train_resume_and_consolidate(shards, tmp_path):
    _two_nodes(tmp_path, shards, STEPS)
    seen = [json.loads((tmp_path / f"keys{STEPS}" / f"keys_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == STEPS * BATCH
    assert not set(seen[0]) & set(seen[1])  # the nodes saw disjoint samples
    assert sorted(seen[0] + seen[1]) == [f"train_{i:07d}" for i in range(2 * STEPS * BATCH)]  # together: the split, once

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert len(runs) == 1 and client.get_metric_history(runs[0].info.run_id, "train/loss")  # rank 0 alone logged
    run_id = runs[0].info.run_id
    last = tmp_path / "run" / "1" / run_id / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # a DeepSpeed checkpoint: one directory, a shard per rank

    _two_nodes(tmp_path, shards, STEPS + 4, "--ckpt_path", str(last))
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the resumed fit continued the same run
    assert max(m.step for m in client.get_metric_history(run_id, "train/loss")) == STEPS + 3  # logged every 2 steps, to step 16

    model = tmp_path / "model.ckpt"
    convert = run_cli(["convert-checkpoint", last, "--out", model], tmp_path)
    assert convert.returncode == 0, convert.stderr[-3000:]
    val = run_cli(["validate", "--config", REPO / "experiments" / "mmdit_d16.yaml", "--ckpt_path", model, "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1", "--trainer.callbacks", "[]",
                   "--data.init_args.data_dir", shards, "--data.init_args.prepare_source", "null",
                   "--data.init_args.batch_size", str(BATCH), "--data.init_args.num_workers", "0",
                   "--model.init_args.network.init_args.depth", "2", "--model.init_args.network.init_args.hidden_size", "32",
                   "--model.init_args.network.init_args.num_heads", "2"], tmp_path, timeout=300)
    assert val.returncode == 0, val.stdout[-2000:] + val.stderr[-3000:]
    assert "val/loss" in val.stdout


def test_the_slurm_script_launches_a_fit(tmp_path):
    """experiments/launch/slurm_fit.sbatch as SLURM runs it, with `srun` standing in as "run the command here" (one
    node, one task): the command it builds is a working DeepSpeed fit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "FLOWMATCH_ROOT": str(REPO), "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "1", "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
           "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = subprocess.run(["bash", str(REPO / "experiments" / "launch" / "slurm_fit.sbatch"), "experiments/toy2d_rf.yaml",
                          "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
                          "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.callbacks", "[]"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "consolidate it (DeepSpeed)" in out.stdout  # the script's ZeRO-2 trainer config was used
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # and the tracking URI it exported
    assert client.search_runs([client.get_experiment_by_name("toy2d").experiment_id])
