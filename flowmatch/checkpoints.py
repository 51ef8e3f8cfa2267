"""Checkpoints: loading a trained objective back, writing files atomically, and the run state that
makes a resume exact (every rank's RNG streams).

The checkpoint carries the model's own config (class_path / init_args of objective, network and
time sampler), so nothing else is needed to rebuild it. Files are read with safe unpickling
(``weights_only=True``): a checkpoint cannot run code.

A checkpoint may also hold an exponential moving average of the weights (``checkpoint["ema"]``,
written by flowmatch.callbacks.EMA): ``load_objective(..., weights="auto")`` uses it when present.
A DeepSpeed ZeRO checkpoint is a directory; ``python -m flowmatch convert-checkpoint DIR --out FILE``
makes one file of it that everything here reads.
"""

import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from flowmatch.atomic_io import atomic_write
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from flowmatch.objectives.base import FlowObjective

Weights = Literal["auto", "ema", "raw"]


class CheckpointError(ValueError):
    """A checkpoint path that is missing, unreadable, or not a flowmatch model."""


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
        import tempfile

        with tempfile.TemporaryDirectory(prefix="flowmatch-consolidate-") as tmp:
            consolidate_deepspeed_checkpoint(path, Path(tmp) / "model.ckpt")
            return read_checkpoint(Path(tmp) / "model.ckpt", map_location)
    return read_checkpoint(path, map_location)


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


def load_objective(path: str | Path, map_location: str | torch.device = "cpu", weights: Weights = "auto") -> FlowObjective:
    """Rebuild a trained objective from a checkpoint file, in eval mode, with its weights.

    ``weights``: "auto" uses the EMA weights when the checkpoint has them, "ema" requires them,
    "raw" uses the trained weights themselves. ``model.loaded_weights`` says which were loaded.
    A DeepSpeed checkpoint directory is consolidated on the fly (convert-checkpoint does it once).
    """
    ckpt = read_weights(path, map_location)
    model = build_objective(ckpt.get("hyper_parameters", {}), source=str(path))
    model.configure_model()
    state, which = select_weights(ckpt, weights, source=str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its own model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.on_load_checkpoint(ckpt)
    model.loaded_weights = which
    return model.eval().to(map_location)


# --- DeepSpeed checkpoint directories ------------------------------------------------------------------
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


# what a consolidated checkpoint keeps of a DeepSpeed client state: Lightning's keys and flowmatch's
CONSOLIDATED_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "hyper_parameters",
                     "hparams_name", "flowmatch", "ema", "mlflow", "loops", "callbacks", "lr_schedulers", "rng_states")


def consolidate_deepspeed_checkpoint(directory: str | Path, out: str | Path) -> dict[str, Any]:
    """One checkpoint file from a DeepSpeed ZeRO (stage 1-3) checkpoint directory.

    The weights are consolidated to float32 by Lightning's convert_zero_checkpoint_to_fp32_state_dict
    (DeepSpeed's zero_to_fp32); a ZeRO-3 EMA, of which every rank saved its own shard, is joined from
    all ranks' files. The file holds no optimizer state: it is for validate / test / sample and for
    starting new runs (``model.init_args.init_weights``), and it is written atomically. Every file is
    read with safe unpickling."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    from flowmatch.callbacks.ema import consolidate_sharded_ema

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


#: plain data classes DeepSpeed pickles into its checkpoint files (no code runs when they are rebuilt)
_DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
)


def _deepspeed_safe_globals() -> list:
    import importlib

    out: list = []
    for spec in _DEEPSPEED_SAFE_GLOBALS:
        module, name = spec.split(":")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return out


# --- writing files atomically ----------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the complete new one, never a
    half-written file under the final name."""
    path = Path(path)
    with atomic_write(path) as f:
        torch.save(obj, f)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but a local checkpoint is written beside its final name and renamed.

    (Lightning's own atomic save writes into the system temp directory and moves the file; across
    filesystems that move is a copy into the final name, which a crash can leave half-written.)
    Remote URLs (s3://, gs:// ...) keep Lightning's behaviour."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        # safe unpickling unless the caller asks otherwise
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True if weights_only is None else weights_only, **kwargs)


# --- RNG state: what makes a resumed run draw the same times and noise ------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """This process's torch (and CUDA), numpy and Python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def gather_rng_states(trainer, local: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rank's RNG state, indexed by global rank (a collective call when world_size > 1)."""
    local = local if local is not None else capture_rng_state()
    if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [local]
    out: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, local)
    return out
