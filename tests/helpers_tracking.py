"""Test helper: a callback that makes every training step last a while, so that a test can act mid-run."""

import time

import lightning


class SlowSteps(lightning.Callback):
    def __init__(self, seconds: float = 0.02):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
