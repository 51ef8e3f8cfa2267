"""A finished fit can be extended exactly: ``fit --ckpt_path last.ckpt`` with a larger ``max_steps`` ends where one
uninterrupted fit to that step count ends.

The objectives return a FinishedRunCheckpoint from ``configure_callbacks`` (beside ResumeRNG). It

* writes last.ckpt at the end of a fit when the last validation came before the last step (Lightning's
  ModelCheckpoint does not), so a finished run's last.ckpt holds its final weights;
* writes a checkpoint taken at the end of a fit (or of an epoch) as the state right after its last step
  (Lightning counts the epoch as done, also when ``max_steps`` stopped it with batches left, and an extended
  fit started the next epoch: other data than the uninterrupted fit, and one epoch more on the counter).

Both touch Lightning's private state, in flowmatch.lightning_compat.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from flowmatch.lightning_compat import record_epoch_end_for_resume, save_last_at_the_end


class FinishedRunCheckpoint(L.Callback):
    """The final state of a fit in last.ckpt, resumable inside an unfinished epoch (module docstring)."""

    def on_train_end(self, trainer, pl_module) -> None:
        save_last_at_the_end(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        fn = getattr(trainer.state, "fn", None)
        if getattr(fn, "value", fn) == "fit":
            record_epoch_end_for_resume(trainer, checkpoint)
