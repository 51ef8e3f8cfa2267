"""A run whose checkpoints cannot be written is refused before its first step.

The objectives return a WritableCheckpoints from ``configure_callbacks``. When the fit starts (the checkpoint
directories are known by then) it writes and removes a probe file in each one, on every rank: an unwritable or
missing-and-uncreatable directory is a CheckpointError naming it, printed by the CLI as ``error: ...``, instead
of a traceback at the first save after minutes of training. A write that fails later (a full disk) is a
CheckpointError too, and leaves the previous checkpoint intact (flowmatch.checkpoints.writing).
"""

from __future__ import annotations

import lightning as L

from flowmatch.checkpoints.writing import probe_writable


class WritableCheckpoints(L.Callback):
    """Probe every checkpoint directory when the fit starts (module docstring)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        for callback in trainer.checkpoint_callbacks:
            directory = getattr(callback, "dirpath", None)
            if directory and "://" not in str(directory):  # remote stores are checked by their own clients
                probe_writable(directory)
