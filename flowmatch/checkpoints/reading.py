"""Reading a checkpoint (a file, or a DeepSpeed directory) with safe unpickling."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from flowmatch.checkpoints.deepspeed_dirs import consolidate_deepspeed_checkpoint, deepspeed_model_state_files, is_deepspeed_checkpoint
from flowmatch.checkpoints.errors import CheckpointError
from flowmatch.checkpoints.safe_loading import safe_load


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, read with safe unpickling.

    A DeepSpeed checkpoint directory reads as its Lightning state (rank 0's model-state file) with
    an empty ``state_dict`` and ``deepspeed_directory: True``: enough to check it, resume it, or
    read its config; ``read_weights`` consolidates its weights when they are needed."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        if not is_deepspeed_checkpoint(path):
            raise CheckpointError(f"{path} is a directory, not a checkpoint file or a DeepSpeed checkpoint directory")
        ckpt = read_client_state(path)
        ckpt["state_dict"] = {}
        ckpt["deepspeed_directory"] = True
        return ckpt
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for garbage input
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def read_weights(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Like read_checkpoint, but a DeepSpeed directory is consolidated first (weights in float32,
    a ZeRO-3 EMA joined), so ``state_dict`` (and ``ema``) hold the whole model."""
    path = Path(path)
    if path.is_dir() and is_deepspeed_checkpoint(path):
        with tempfile.TemporaryDirectory(prefix="flowmatch-consolidate-") as tmp:
            consolidate_deepspeed_checkpoint(path, Path(tmp) / "model.ckpt")
            return read_checkpoint(Path(tmp) / "model.ckpt", map_location)
    return read_checkpoint(path, map_location)


def read_client_state(path: str | Path) -> dict[str, Any]:
    """The Lightning-side state of a checkpoint (everything but the weights is enough): the file
    itself, or rank 0's model-state file of a DeepSpeed directory. Safe unpickling either way."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        file = deepspeed_model_state_files(path)[0]
        return safe_load(file)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint")
    return ckpt
