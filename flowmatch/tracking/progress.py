"""A training progress bar whose rate and ETA cover the whole run.

Lightning's TQDM bar already prints the rate and the remaining time, but per epoch: it restarts at
every epoch, and for a streamed data set of unknown length (webdataset) it has no total, hence no
ETA. With ``trainer.max_steps`` set, this bar counts optimizer steps up to ``max_steps`` instead:
"Epoch 3:  41%|####  | 2050/5000 [10:02<14:26, 3.40step/s, train/loss=0.512]". A resumed run
starts the bar at the step it resumes from, so the rate and the ETA stay right.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDMProgressBar, counting steps to ``max_steps`` (see this module's docstring)."""

    def _by_steps(self, trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self._by_steps(trainer):
            bar = self.train_progress_bar
            bar.unit = "step"
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step  # resumed runs: the rate counts only this run's steps
            _update_n(bar, trainer.global_step)

    def on_train_epoch_start(self, trainer, *args) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = trainer.global_step
        bar = self.train_progress_bar
        if bar is not None and self._should_update(n, bar.total):
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
