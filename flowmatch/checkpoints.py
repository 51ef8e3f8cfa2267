"""Loading a trained objective back from a checkpoint written by `python -m flowmatch fit`.

The checkpoint carries the model's own config (class_path / init_args of objective, network and
time sampler), so nothing else is needed to rebuild it. Files are read with safe unpickling
(``weights_only=True``): a checkpoint cannot run code.
"""

from pathlib import Path
from typing import Any

import torch

from flowmatch.objectives.base import FlowObjective


class CheckpointError(ValueError):
    """A checkpoint path that is missing, unreadable, or not a flowmatch model."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file (a DeepSpeed checkpoint must be converted first)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for garbage input
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def build_objective(hparams: dict[str, Any], source: str = "checkpoint") -> FlowObjective:
    """Instantiate the objective (with its network) from the hyper-parameters the CLI saved."""
    from jsonargparse import ArgumentParser

    if "_class_path" not in hparams or "network" not in hparams:
        raise CheckpointError(
            f"{source} does not carry its model config (no '_class_path' / 'network' in its hyper-parameters); "
            "was it written by `python -m flowmatch fit`?"
        )
    # init_weights only seeded the original run; the checkpoint's own weights replace them anyway
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_") and k != "init_weights"}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(FlowObjective, "model", fail_untyped=False)
    cfg = parser.parse_object({"model": {"class_path": hparams["_class_path"], "init_args": init_args}})
    return parser.instantiate_classes(cfg).model


def load_objective(path: str | Path, map_location: str | torch.device = "cpu") -> FlowObjective:
    """Rebuild a trained objective from a checkpoint file, in eval mode, with its weights."""
    ckpt = read_checkpoint(path, map_location)
    model = build_objective(ckpt.get("hyper_parameters", {}), source=str(path))
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its own model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.on_load_checkpoint(ckpt)
    return model.eval().to(map_location)
