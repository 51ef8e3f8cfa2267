"""Writing checkpoint files atomically: a crash leaves the previous file or the complete new one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from flowmatch.atomic_io import atomic_write
from flowmatch.checkpoints.errors import CheckpointError
from flowmatch.error_chain import causes


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
        try:
            atomic_torch_save(checkpoint, path)
        except (OSError, RuntimeError) as err:  # a full disk, a directory gone read-only: say where, and that nothing was lost
            cause = next((e for e in causes(err) if isinstance(e, OSError)), None)  # (torch.save: a RuntimeError over it)
            if cause is None:
                raise
            raise CheckpointError(f"could not write the checkpoint {path}: {cause.strerror or cause}; the training stopped, "
                                  f"the previous checkpoint under that name (if any) is intact") from err

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        # safe unpickling unless the caller asks otherwise
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True if weights_only is None else weights_only, **kwargs)


def probe_writable(directory: str | Path) -> None:
    """Create ``directory`` if needed and write and remove a probe file in it: a run whose checkpoints could
    not be written is refused before its first step (CheckpointError naming the directory), not at its first save."""
    directory = Path(directory)
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"flowmatch")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoints to {directory}: {err.strerror or err} "
                              f"(choose another --trainer.default_root_dir or --checkpoint.dirpath)") from err
