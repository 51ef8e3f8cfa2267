"""The main job made tiny for tests: `fit --config experiments/mmdit_d16.yaml` for 16 steps of a depth-2 MM-DiT in a
fresh working directory, then `test` of its checkpoint with three samplers (fixtures main_job / main_job_tested in
conftest.py, shared by test_main_job.py and test_compare.py)."""

import shutil
from pathlib import Path

from cli_utils import checkpoint_from_output, run_cli

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments/mmdit_d16.yaml"
TINY = ["--model.init_args.network.init_args.depth", "2"]  # hidden 128, 2 heads: ~1.2M parameters
SHORT = [*TINY, "--trainer.max_steps", "16", "--trainer.val_check_interval", "8", "--data.init_args.steps_per_epoch", "8",
         "--data.init_args.num_workers", "1", "--trainer.log_every_n_steps", "4", "--trainer.enable_progress_bar", "false"]
# `test` with fewer samplers than the experiment's ten (dopri5 on an untrained model costs ~50 NFE a sample)
TEST_SAMPLERS = """\
trainer:
  callbacks:
  - class_path: flowmatch.callbacks.EMA
    init_args: {decay: 0.999}
  - class_path: flowmatch.callbacks.ImageSampleMetrics
    init_args:
      samplers: [euler2]
      test_samplers: [euler1, "euler2:cfg=3", dopri5]
"""


def fit_in_fresh_directory(work: Path, classifier: Path, experiment: Path, args: list[str]) -> dict:
    """`fit --config EXPERIMENT ARGS` in the empty directory ``work``, with the session's trained digit classifier
    where the experiment looks for its feature network; {"work", "ckpt", "fit"}."""
    feature_net = work / "runs/feature_networks/digits_classifier/last.ckpt"
    feature_net.parent.mkdir(parents=True)
    shutil.copy(classifier, feature_net)
    fit = run_cli(["fit", "--config", experiment, *args], cwd=work, timeout=600, extra_env={"OMP_NUM_THREADS": "1"})
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-4000:]
    return {"work": work, "ckpt": checkpoint_from_output(fit.stdout), "fit": fit}
