"""A diverged run stops before its weights are updated, and says so in its record.

A NaN / infinite training loss raises NonFiniteLossError before the optimizer step, so no NaN
weights are ever written; every rank stops together. Rank 0 first logs ``train/diverged_at_step``
straight to the loggers (``self.log`` would be flushed only after a step that never completes):
the studies count such a run as a result, not as a crash.
"""

from __future__ import annotations

import torch

DIVERGED_METRIC = "train/diverged_at_step"  # logged once, just before NonFiniteLossError stops the run


class NonFiniteLossError(RuntimeError):
    """Raised (before any weight update) when the training loss is NaN or infinite."""


def stop_if_not_finite(module, loss: torch.Tensor, batch_idx: int) -> None:
    """Raise NonFiniteLossError if ``loss`` (of ``module``'s training step ``batch_idx``) is not finite on any rank."""
    bad = not bool(torch.isfinite(loss))
    trainer = module._trainer  # None outside a Trainer (module.trainer would raise)
    if trainer is not None and trainer.world_size > 1:  # every rank stops together
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
    if not bad:
        return
    ckpt = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
    last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    kept = f" The last good checkpoint is kept: {last}." if last else " No checkpoint had been written yet."
    if trainer is not None and getattr(trainer, "is_global_zero", False):  # the run's record says it diverged, and when
        for logger in trainer.loggers:
            logger.log_metrics({DIVERGED_METRIC: float(module.global_step)}, step=module.global_step)
    raise NonFiniteLossError(
        f"training loss is {loss.item()} at global step {module.global_step} (batch {batch_idx}); "
        f"stopping before the update so no NaN weights are written.{kept} Lower the learning rate "
        f"(lr={module.hparams.lr}), enable gradient clipping (trainer.gradient_clip_val), or check the data."
    )
