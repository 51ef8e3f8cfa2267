"""torch.load with safe unpickling (``weights_only=True``), also where DeepSpeed asks for less.

DeepSpeed pickles a few plain data classes into its files; they are allowed by name, nothing else is.
"""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from flowmatch.checkpoints.errors import CheckpointError

#: plain data classes DeepSpeed pickles into its checkpoint files (no code runs when they are rebuilt)
_DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
)


def _deepspeed_safe_globals() -> list:
    out: list = []
    for spec in _DEEPSPEED_SAFE_GLOBALS:
        module, name = spec.split(":")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return out


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load with weights_only=True, allowing the few plain types DeepSpeed pickles into its files."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable checkpoint file ({type(err).__name__}: {str(err).splitlines()[0]})") from None


@contextmanager
def forced_safe_loading():
    """Every torch.load inside this context unpickles with weights_only=True, even where a library
    (DeepSpeed's checkpoint engine, its zero_to_fp32) asks for weights_only=False; the few plain
    DeepSpeed types its files hold are allowed."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old
