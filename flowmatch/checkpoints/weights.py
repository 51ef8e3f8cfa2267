"""Which weights of a checkpoint to load: the trained ones ("raw") or their moving average ("ema")."""

from __future__ import annotations

from typing import Any, Literal

import torch

from flowmatch.checkpoints.errors import CheckpointError

Weights = Literal["auto", "ema", "raw"]


def has_ema(ckpt: dict[str, Any]) -> bool:
    return isinstance(ckpt.get("ema"), dict) and bool(ckpt["ema"].get("state_dict"))


def select_weights(ckpt: dict[str, Any], weights: Weights = "auto", source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict to load, with EMA weights swapped in for "ema" (and for "auto" when present).

    Returns (state_dict, "ema" | "raw")."""
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be auto, ema or raw, got {weights!r}")
    state = ckpt["state_dict"]
    if weights == "raw" or (weights == "auto" and not has_ema(ckpt)):
        return state, "raw"
    if not has_ema(ckpt):
        raise CheckpointError(f"{source} holds no EMA weights (train with the flowmatch.callbacks.EMA callback, or use --weights raw)")
    ema = ckpt["ema"]
    if ema.get("sharded"):
        raise CheckpointError(f"{source} holds one rank's shard of the ZeRO-3 EMA weights: consolidate it first "
                              "with python -m flowmatch convert-checkpoint")
    unknown = sorted(set(ema["state_dict"]) - set(state))
    if unknown:
        raise CheckpointError(f"{source}: EMA weights for parameters the model does not have: {unknown[:5]}")
    merged = dict(state)
    for name, value in ema["state_dict"].items():
        merged[name] = value.to(state[name].dtype)
    return merged, "ema"
