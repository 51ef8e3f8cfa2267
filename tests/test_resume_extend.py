"""Extending a finished run: `fit --ckpt_path last.ckpt` of a run that reached its `max_steps`, with a larger
`max_steps`, ends exactly where one uninterrupted run to that step count ends (toy 2-D rectified flow, real CLI).

A fit stopped by `max_steps` inside an epoch runs Lightning's epoch-end hooks, and its last checkpoint used to
count that epoch as done: the extended fit then started the next epoch (other data than the uninterrupted run,
and one epoch more on the counter; a relative weight difference of 0.13 after 100 + 100 steps of
experiments/toy2d_rf.yaml). flowmatch.lightning_compat now writes such a checkpoint as the mid-epoch state it
is. The run is extended from the end of an epoch, from inside one, and from a step that validated.
"""

from __future__ import annotations

import pytest
import torch

from cli_utils import REPO, run_cli

TOY = REPO / "experiments" / "toy2d_rf.yaml"
# 1024 points in batches of 256: 4 batches an epoch; validation every 7 steps; the warm-up is over by step 8
RUN = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.init_args.num_train", "1024",
       "--trainer.val_check_interval", "7", "--model.init_args.warmup_steps", "8", "--seed_everything", "7",
       "--trainer.callbacks", "[]"]
TOTAL = 17


def _fit(cwd, root: str, max_steps: int, *extra) -> dict:
    out = run_cli(["fit", "--config", TOY, *RUN, "--trainer.max_steps", str(max_steps), "--trainer.default_root_dir", root, *extra],
                  cwd, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return torch.load(cwd / root / "checkpoints" / "last.ckpt", weights_only=True)


def _relative_difference(a: dict, b: dict) -> float:
    num = sum((a[k].float() - b[k].float()).pow(2).sum() for k in a)
    den = sum(a[k].float().pow(2).sum() for k in a)
    return float((num / den).sqrt())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    return _fit(cwd, "straight", TOTAL)


@pytest.mark.parametrize("first", [8, 10, 14], ids=["at_an_epoch_end", "mid_epoch", "at_a_validation"])
def test_a_finished_run_extended_equals_the_uninterrupted_run(straight, tmp_path, first):
    finished = _fit(tmp_path, "run", first)
    assert finished["global_step"] == first
    # where the finished run says it stands: inside epoch first // 4 after first % 4 batches (an epoch end: the next)
    assert finished["Toy2DDataModule"] == {"epoch": first // 4, "batches": first % 4}
    extended = _fit(tmp_path, "run", TOTAL, "--ckpt_path", str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    diff = _relative_difference(straight["state_dict"], extended["state_dict"])
    print(f"{first} + {TOTAL - first} steps vs {TOTAL} in one run: relative weight difference {diff:.2e}")
    assert diff <= 1e-6
    assert extended["global_step"] == straight["global_step"] == TOTAL
    assert extended["epoch"] == straight["epoch"] == TOTAL // 4  # the same epoch on the counter
    assert extended["Toy2DDataModule"] == straight["Toy2DDataModule"] == {"epoch": TOTAL // 4, "batches": TOTAL % 4}
    for sa, sb in zip(straight["optimizer_states"][0]["state"].values(), extended["optimizer_states"][0]["state"].values()):
        for key in sa:
            assert torch.allclose(sa[key], sb[key], atol=1e-6, rtol=0), key
