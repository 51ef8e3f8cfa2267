"""Refuse, before any weight is loaded, a checkpoint of another objective or of another network.

Called from the objectives' ``on_load_checkpoint`` (Lightning calls it before it loads the weights; a
callback's hook would come after them), so a mismatch reads as a CheckpointError naming what differs
instead of a long state-dict error.
"""

from __future__ import annotations

from typing import Any

from flowmatch.checkpoints.errors import CheckpointError
from flowmatch.training.checkpoint_record import saved_objective


def check_checkpoint_fits(module, checkpoint: dict[str, Any], accepted_objectives: tuple[str, ...]) -> None:
    """Raise CheckpointError if ``checkpoint`` was trained with an objective not in ``accepted_objectives``
    (the module's class name and its former names) or holds weights that do not fit ``module``."""
    saved = saved_objective(checkpoint)
    name = type(module).__name__
    if saved is not None and saved not in accepted_objectives:
        raise CheckpointError(f"the checkpoint was trained with the objective {saved}, but this run's model is "
                              f"{name}: use the config it was trained with (or init_weights to start from its network)")
    state = checkpoint.get("state_dict")
    if not state:
        return  # DeepSpeed checkpoints keep the weights in their own shard files
    module.configure_model()
    if any(hasattr(p, "ds_numel") for p in module.parameters()):
        return  # ZeRO-3 partitioned parameters: DeepSpeed checks the shapes itself
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{label} {items[:4]}{' ...' if len(items) > 4 else ''}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", wrong)) if items]
        raise CheckpointError(f"the checkpoint's network does not fit this run's {type(module.net).__name__}: " + "; ".join(parts) +
                              ". Use the config (network sizes) the checkpoint was trained with.")
