"""Exact resume: every rank's RNG streams travel in the checkpoint, and evaluation leaves them untouched.

The objectives return a ResumeRNG from ``configure_callbacks``, so every run has exactly one. It

* gives every rank its own stream at the start of training (``seed_everything`` seeds all ranks alike);
* saves every rank's RNG state into each checkpoint (``checkpoint["rng_states"]``, one entry per global
  rank) and restores this rank's just before the first resumed training step;
* saves the state when validation starts and restores it when validation ends, so validation (and the
  sample metrics inside it) never shifts the training stream; a checkpoint written during validation
  holds the stream validation will return to.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from flowmatch.checkpoints.rng import capture_rng_state, gather_rng_states, restore_rng_state

RNG_STATES_KEY = "rng_states"


class ResumeRNG(L.Callback):
    """One RNG stream per rank, exact across resume, untouched by evaluation (see this module's docstring)."""

    def __init__(self):
        self._to_restore: dict[str, Any] | None = None  # from the checkpoint, used at the first resumed step
        self._before_eval: dict[str, Any] | None = None  # the training stream while validation runs

    # --- training ----------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1 and self._to_restore is None:
            # every rank draws its own times and noise (seed_everything gives all ranks the same seed)
            torch.manual_seed(torch.initial_seed() + 1_000_003 * trainer.global_rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._to_restore is not None:  # first step after a resume: continue the saved RNG streams
            restore_rng_state(self._to_restore)
            self._to_restore = None

    # --- validation does not shift the training stream -------------------------------------------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        self._before_eval = capture_rng_state()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._before_eval is not None:
            restore_rng_state(self._before_eval)
            self._before_eval = None

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        fn = getattr(trainer.state, "fn", None)
        if getattr(fn, "value", fn) == "fit":
            # inside validation the training stream is the one saved when validation started
            checkpoint[RNG_STATES_KEY] = gather_rng_states(trainer, self._before_eval)  # one entry per rank

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(RNG_STATES_KEY)
        if not states:
            return
        if len(states) == trainer.world_size:
            self._to_restore = states[trainer.global_rank]
        else:
            rank_zero_warn(f"the checkpoint holds RNG states of {len(states)} ranks, this run has {trainer.world_size}: "
                           "the random stream restarts from the seed (the run continues, not bit-exactly)")
