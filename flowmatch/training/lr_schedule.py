"""The learning-rate schedule of every objective: linear warm-up, then constant or a cosine decay.

    factor(step) = (step + 1) / warmup_steps                                    while step < warmup_steps
                 = final + (1 - final) (1 + cos(pi p)) / 2,  p = (step - warmup_steps) / (decay_steps - warmup_steps)
                                                                                until decay_steps (p = 1 after it)
The optimizer's LR is lr * factor. With decay_steps = 0 the LR stays at lr after warm-up (SD3's constant
schedule). The decay ends at an explicit step, not at the trainer's max_steps, so a finished run that is
extended goes on at the final LR instead of jumping back up, and a resumed run follows the same curve.
"""

from __future__ import annotations

import math
from functools import partial

import torch


def check_schedule(warmup_steps: int, decay_steps: int, final_ratio: float) -> None:
    """Clear errors for a schedule that cannot be followed, naming the argument."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if decay_steps < 0 or (decay_steps and decay_steps <= warmup_steps):
        raise ValueError(f"lr_decay_steps must be 0 (no decay) or larger than warmup_steps ({warmup_steps}), got {decay_steps}")
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"lr_final_ratio must lie in [0, 1] (the final LR as a fraction of lr), got {final_ratio}")


def lr_factor(step: int, warmup_steps: int, decay_steps: int, final_ratio: float) -> float:
    """The LR multiplier after ``step`` optimizer steps (see the module docstring)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not decay_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: int, final_ratio: float):
    """A per-step LambdaLR following :func:`lr_factor` (for Lightning: interval "step")."""
    check_schedule(warmup_steps, decay_steps, final_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=warmup_steps, decay_steps=decay_steps, final_ratio=final_ratio))
