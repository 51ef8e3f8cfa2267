"""A trained objective back from its checkpoint: the model config it carries, then its weights.

The checkpoint carries the model's own config (class_path / init_args of objective, network and time
sampler, saved by ``python -m flowmatch fit``), so nothing else is needed to rebuild it. Reading the
file (safely), DeepSpeed directories and the choice of EMA or raw weights are flowmatch.checkpoints'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowmatch.adapters.fine_tuning import base_path_of, stored_layout
from flowmatch.checkpoints import CheckpointError, Weights, read_weights, select_weights
from flowmatch.objectives.generator import FlowGenerator


def build_objective(hparams: dict[str, Any], source: str = "checkpoint", keep_init_weights: bool = False) -> FlowGenerator:
    """Instantiate the objective (with its network) from the hyper-parameters the CLI saved.

    ``keep_init_weights``: keep the run's init_weights (a fine-tuning checkpoint reads its frozen base from there)."""
    from jsonargparse import ArgumentParser

    if "_class_path" not in hparams or "network" not in hparams:
        raise CheckpointError(
            f"{source} does not carry its model config (no '_class_path' / 'network' in its hyper-parameters); "
            "was it written by `python -m flowmatch fit`?"
        )
    # init_weights only seeded the original run; the checkpoint's own weights replace them anyway
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_") and (keep_init_weights or k != "init_weights")}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(FlowGenerator, "model", fail_untyped=False)
    cfg = parser.parse_object({"model": {"class_path": hparams["_class_path"], "init_args": init_args}})
    return parser.instantiate_classes(cfg).model


def load_objective(path: str | Path, map_location: str | torch.device = "cpu", weights: Weights = "auto") -> FlowGenerator:
    """Rebuild a trained objective from a checkpoint file, in eval mode, with its weights.

    ``weights``: "auto" uses the EMA weights when the checkpoint has them, "ema" requires them,
    "raw" uses the trained weights themselves. ``model.loaded_weights`` says which were loaded.
    A DeepSpeed checkpoint directory is consolidated on the fly (convert-checkpoint does it once).
    A fine-tuning checkpoint (a LoRA run's) holds the trained part only: its base is read again from the
    init_weights file it records, which must still be there and hold the same base.
    """
    ckpt = read_weights(path, map_location)
    hparams = dict(ckpt.get("hyper_parameters", {}))
    base = base_path_of(ckpt)
    if base is not None:  # a fine-tuning checkpoint: the frozen base is read from its init_weights again
        if not base.exists():
            raise CheckpointError(f"{path} holds only the fine-tuned part of its network (e.g. a LoRA adapter); its frozen "
                                  f"base is read from init_weights {base}, which does not exist: put the base checkpoint there")
        hparams["init_weights"] = str(base)
        adapter = hparams.get("adapter")
        if isinstance(adapter, dict) and adapter.get("init"):  # the layout is the checkpoint's; the init file is not needed
            hparams["adapter"] = {**adapter, "init": None}
    model = build_objective(hparams, source=str(path), keep_init_weights=base is not None)
    model.stored_lora_layout = stored_layout(ckpt)
    model.configure_model()
    state, which = select_weights(ckpt, weights, source=str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its own model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.on_load_checkpoint(ckpt)
    model.loaded_weights = which
    return model.eval().to(map_location)
