"""Each toy experiment, trained by the real CLI on a short budget, generates the target distribution."""

import json

import numpy as np
import pytest
import torch

from cli_utils import REPO, checkpoint_from_output, run_cli
from flowmatch.data.toy2d import sample_target
from flowmatch.metrics import wasserstein2_exact


@pytest.mark.parametrize("objective", ["rf", "fm", "eps"])
def test_toy_experiment_learns_the_target(tmp_path, objective):
    config = REPO / "experiments" / f"toy2d_{objective}.yaml"
    fit = run_cli(["fit", "--config", config, "--trainer.max_steps", "1000", "--trainer.val_check_interval", "1000",
                   "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "null"], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / checkpoint_from_output(fit.stdout)
    out = tmp_path / "samples"
    smp = run_cli(["sample", "--ckpt", ckpt, "--solver", "dopri5", "--num", "1000", "--seed", "7", "--out", out], tmp_path)
    assert smp.returncode == 0, smp.stderr[-3000:]
    samples = torch.from_numpy(np.load(out / "samples.npy"))
    fresh, _ = sample_target("8gaussians", 1000, seed=999)  # never seen in training
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(3))
    other, _ = sample_target("8gaussians", 1000, seed=998)
    w2_model, w2_noise = wasserstein2_exact(samples, fresh), wasserstein2_exact(noise, fresh)
    w2_floor = wasserstein2_exact(other, fresh)  # two finite samples of the target itself: ~0.31
    info = json.loads((out / "samples.json").read_text())
    print(f"{objective}: W2 model {w2_model:.3f}, noise {w2_noise:.3f}, target-vs-target {w2_floor:.3f}, dopri5 NFE {info['nfe']}")
    assert w2_model < 0.35 * w2_noise  # noise is ~1.6 from the target
    assert w2_model < 1.6 * w2_floor


def test_class_conditional_toy_with_guidance(tmp_path):
    """Labels flow from the data through the network's dropout to guided sampling: label k lands on mode k."""
    config = REPO / "experiments" / "toy2d_rf.yaml"
    fit = run_cli(["fit", "--config", config, "--trainer.max_steps", "500", "--trainer.val_check_interval", "500",
                   "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "null", "--trainer.logger", "false",
                   "--data.init_args.conditional", "true", "--model.init_args.network.init_args.num_classes", "8"], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / checkpoint_from_output(fit.stdout)
    points, labels = sample_target("8gaussians", 4000, seed=5)
    centres = torch.stack([points[labels == k].mean(0) for k in range(8)])
    for label in (0, 3):
        out = tmp_path / f"label{label}"
        smp = run_cli(["sample", "--ckpt", ckpt, "--labels", f"[{label}]", "--guidance", "2", "--steps", "20",
                       "--num", "400", "--out", out], tmp_path)
        assert smp.returncode == 0, smp.stderr[-3000:]
        x = torch.from_numpy(np.load(out / "samples.npy"))
        nearest = torch.cdist(x, centres).argmin(1)
        share = (nearest == label).float().mean().item()
        print(f"label {label}: {share:.1%} of guided samples at mode {label}")
        assert share > 0.9
    bad = run_cli(["sample", "--ckpt", ckpt, "--labels", "[8]", "--out", tmp_path / "bad"], tmp_path)
    assert bad.returncode != 0 and "out of range" in bad.stderr
