"""DeepSpeed ZeRO as a Lightning strategy that also runs on CPU processes (gloo), and saves atomically.

``DeepSpeedZeRO`` is Lightning's ``DeepSpeedStrategy`` with three additions:

* **CPU**: with ``accelerator: cpu`` it skips Lightning's "CUDA only" check, initialises the process
  group with gloo, and reports the root device as ``cpu:<local_rank>`` (DeepSpeed wants a device
  index). On a GPU nothing of this applies: the same config runs Lightning's code unchanged.
* **ZeRO-3 construction**: the objective builds its network in ``configure_model``, inside
  ``deepspeed.zero.Init``, so every parameter is sharded as it is created. A network that
  re-initialises its submodules' weights after building them (``initialize_weights()``, as DiT and
  MM-DiT do) would touch already-sharded parameters; that call is deferred until the network is
  built and then run with the network's parameters gathered (``flowmatch.strategies.zero3``).
* **Safe loading**: resuming reads DeepSpeed's files with ``weights_only=True`` unpickling.
* **Atomic checkpoints**: a ZeRO checkpoint is a directory of per-rank shards. It is written to
  ``<path>.tmp`` and swapped into place only after every rank has finished, so an interrupted save
  never leaves a half-written directory where the previous good checkpoint was.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from flowmatch.strategies.zero3 import deferred_weight_init


def _disable_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory CPU collective (a C++ build of about a
    minute on first use); gloo's collectives serve the CPU path. FLOWMATCH_DS_SHM_COMM=1 keeps it."""
    if os.environ.get("FLOWMATCH_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


class DeepSpeedZeRO(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy (ZeRO stage 1/2/3, offload), also on CPU; see this module's docstring.

    Takes every argument of ``lightning.pytorch.strategies.DeepSpeedStrategy``; the defaults differ in
    one place: ``logging_batch_size_per_gpu`` is 1 (DeepSpeed only uses it for its throughput log; the
    "auto" default would build the training data loader an extra time to read its batch size).
    """

    strategy_name = "flowmatch_deepspeed"

    def __init__(self, *args: Any, logging_batch_size_per_gpu: int | str = 1, **kwargs: Any) -> None:
        super().__init__(*args, logging_batch_size_per_gpu=logging_batch_size_per_gpu, **kwargs)

    # --- CPU processes ---------------------------------------------------------------------------
    @property
    def on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self.on_cpu:
            return super().setup_environment()  # Lightning's own checks, CUDA
        _disable_cpu_shm_comm_op()
        if self.parallel_devices:  # cpu:0, cpu:1, ...: DeepSpeed and Lightning's checks want an index per process
            self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "only supported on CUDA GPUs"

    def _get_process_group_backend(self) -> str:
        if self.on_cpu:
            return self._process_group_backend or "gloo"
        return super()._get_process_group_backend()

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        if device.type == "cpu" and device.index is None:
            return torch.device("cpu", self.local_rank)  # DeepSpeed reads the device index
        return device

    # --- ZeRO-3: shard at construction ---------------------------------------------------------------
    @contextmanager
    def model_sharded_context(self):
        with super().model_sharded_context():
            with deferred_weight_init(enabled=self.zero_stage_3):
                yield

    # --- checkpoints: safe loading, atomic directories ---------------------------------------------
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from flowmatch.checkpoints.safe_loading import forced_safe_loading

        with forced_safe_loading():  # DeepSpeed's engine asks torch.load for weights_only=False
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        filepath = self.broadcast(str(filepath))
        final = Path(filepath)
        tmp = final.with_name(final.name + ".tmp")
        # global rank 0 acts first; then each other node's local rank 0, for node-local checkpoint storage
        # (on a shared filesystem there is nothing left for them to do)
        self._on_each_filesystem(lambda: shutil.rmtree(tmp) if tmp.exists() else None, "tmp_clean")  # an interrupted save's
        # a fine-tuning run's module state leaves out its frozen base (read from init_weights again): DeepSpeed must not
        # record the frozen parameters either, or its consolidation would look for them
        frozen = getattr(self.lightning_module, "_frozen_from_base", lambda: set())()
        self.exclude_frozen_parameters = self.exclude_frozen_parameters or bool(frozen)
        super().save_checkpoint(checkpoint, str(tmp), storage_options=storage_options)
        self.barrier("flowmatch_ckpt_written")
        self._on_each_filesystem(lambda: swap_directory_into_place(tmp, final) if tmp.exists() else None, "renamed")

    def _on_each_filesystem(self, action, name: str) -> None:
        if self.is_global_zero:
            action()
        self.barrier(f"flowmatch_ckpt_{name}_0")
        if self.local_rank == 0 and not self.is_global_zero:
            action()
        self.barrier(f"flowmatch_ckpt_{name}")


def swap_directory_into_place(tmp: Path, final: Path) -> None:
    """Replace directory ``final`` by the complete directory ``tmp``.

    The old directory is first renamed to ``<final>.old`` and removed only after ``tmp`` has taken its
    name, so at every instant one complete checkpoint exists (``final`` or, for an instant, ``.old``).
    """
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists() or final.is_symlink():
        if final.is_dir() and not final.is_symlink():
            os.replace(final, old)
        else:
            final.unlink()
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
