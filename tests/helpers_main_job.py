"""The main job made tiny for tests: `fit --config experiments/mmdit_d16.yaml` for 16 steps of a depth-2 MM-DiT in a
fresh working directory, then `test` of its checkpoint with three samplers (fixtures main_job / main_job_tested in
conftest.py, shared by test_main_job.py and test_compare.py)."""

from pathlib import Path

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
