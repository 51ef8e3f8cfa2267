"""DeepSpeed checkpoint directories (a tag folder of per-rank ``*model_states.pt`` files) and their
consolidation into one checkpoint file that everything else reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from flowmatch.checkpoints.errors import CheckpointError
from flowmatch.checkpoints.safe_loading import forced_safe_loading, safe_load
from flowmatch.checkpoints.writing import atomic_torch_save

# what a consolidated checkpoint keeps of a DeepSpeed client state: Lightning's keys and flowmatch's
CONSOLIDATED_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "hyper_parameters",
                     "hparams_name", "flowmatch", "ema", "mlflow", "loops", "callbacks", "lr_schedulers", "rng_states",
                     "fine_tuning", "frozen_base")


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A directory as DeepSpeed (Lightning's DeepSpeedStrategy) writes a checkpoint: a tag folder of *model_states.pt."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*model_states.pt")))


def deepspeed_model_state_files(directory: str | Path) -> list[Path]:
    """The per-rank model-state files of a DeepSpeed checkpoint directory (rank 0 first)."""
    directory = Path(directory)
    latest = directory / "latest"
    tag = latest.read_text().strip() if latest.is_file() else "checkpoint"
    tag_dir = directory / tag
    if not tag_dir.is_dir():
        raise CheckpointError(f"{directory} is not a DeepSpeed checkpoint directory (no {tag_dir.name}/ inside)")
    files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=lambda p: int(p.name.split("_")[3]))
    if not files:
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model-state files (*model_states.pt)")
    return files


def consolidate_sharded_ema(rank_states: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the per-rank ZeRO-3 EMA shards of one checkpoint (``checkpoint["ema"]`` of every rank's
    file, in any order) into full tensors."""
    if not rank_states:
        raise ValueError("no EMA states to consolidate")
    ranks = sorted(rank_states, key=lambda s: s.get("rank", 0))
    first = ranks[0]
    if not first.get("sharded"):
        return dict(first)
    if len(ranks) != first.get("world_size"):
        raise ValueError(f"expected EMA shards of {first.get('world_size')} ranks, found {len(ranks)}")
    full = {}
    for name, shape in first["shapes"].items():
        numel = 1
        for d in shape:
            numel *= int(d)
        flat = torch.cat([s["state_dict"][name].flatten() for s in ranks])
        full[name] = flat[:numel].view(*shape).clone()
    out = {k: v for k, v in first.items() if k not in ("state_dict", "rank")}
    out.update(sharded=False, state_dict=full, consolidated_from=len(ranks))
    return out


def consolidate_deepspeed_checkpoint(directory: str | Path, out: str | Path) -> dict[str, Any]:
    """One checkpoint file from a DeepSpeed ZeRO (stage 1-3) checkpoint directory.

    The weights are consolidated to float32 by Lightning's convert_zero_checkpoint_to_fp32_state_dict
    (DeepSpeed's zero_to_fp32); a ZeRO-3 EMA, of which every rank saved its own shard, is joined from
    all ranks' files. The file holds no optimizer state: it is for validate / test / sample and for
    starting new runs (``model.init_args.init_weights``), and it is written atomically. Every file is
    read with safe unpickling."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    directory, out = Path(directory), Path(out)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (a DeepSpeed checkpoint is a directory of per-rank files)")
    rank_files = deepspeed_model_state_files(directory)
    tmp = out.with_name(f".{out.name}.convert-{os.getpid()}")
    try:
        with forced_safe_loading():
            try:
                client_state = convert_zero_checkpoint_to_fp32_state_dict(str(directory), str(tmp))
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"{directory} could not be consolidated ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    ckpt = {k: v for k, v in client_state.items() if k in CONSOLIDATED_KEYS}
    ema = ckpt.get("ema")
    if isinstance(ema, dict) and ema.get("sharded"):
        ckpt["ema"] = consolidate_sharded_ema([safe_load(f).get("ema") for f in rank_files])
    ckpt.pop("rng_states", None)  # per-rank streams of a run that this file does not resume
    atomic_torch_save(ckpt, out)
    return ckpt
