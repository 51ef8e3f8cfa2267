"""Exponential moving average (EMA) of the weights, owned and checkpointed by a callback.

The callback keeps its own float32 copy of every trainable parameter and updates it after each
optimizer step: ``ema <- decay * ema + (1 - decay) * weight`` (with the usual warm-up
``decay_n = min(decay, (1 + n) / (10 + n))`` after n updates). It works with every strategy:

* single process, DDP, DeepSpeed ZeRO-1/2: the copy is the full parameter (the same on every rank);
* DeepSpeed ZeRO-3: each rank averages only its own shard of each parameter (``param.ds_tensor``),
  so the EMA is sharded exactly like the weights and costs 4 bytes per parameter / world size.

For validation, test and the sample metrics in them, the EMA weights are swapped into the model
and the raw weights swapped back afterwards (``use_for_eval``); training always updates the raw
weights. The EMA goes into every checkpoint as ``checkpoint["ema"]`` (under ZeRO-3 each rank's
model-state file holds its shard; ``python -m flowmatch convert-checkpoint`` consolidates them), so
``python -m flowmatch sample`` and ``flowmatch.objectives.loading.load_objective`` use it by default.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from flowmatch.checkpoints.deepspeed_dirs import consolidate_sharded_ema  # noqa: F401 (joins the shards this callback writes)
from flowmatch.strategies.zero3 import is_partitioned, local_tensor, refresh_after_shard_write


class EMA(L.Callback):
    """EMA of the trainable weights (see this module's docstring).

    Args:
        decay: the decay of the average (0.9999 for long runs; 0.999 for runs of a few thousand steps).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after n updates, so early weights do not dominate.
        update_every: update every this many optimizer steps (the decay is applied per update).
        start_step: no updates before this optimizer step (the EMA is then a copy of the weights).
        use_for_eval: swap the EMA weights in for validation / test (and the sample metrics in them).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, update_every: int = 1, start_step: int = 0, use_for_eval: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.decay, self.warmup, self.update_every, self.start_step = decay, warmup, update_every, start_step
        self.use_for_eval = use_for_eval
        self.num_updates = 0
        self.ema: dict[str, torch.Tensor] = {}  # parameter name -> float32 copy of this rank's part
        self.sharded = False
        self._loaded: dict[str, Any] | None = None
        self._backup: dict[str, torch.Tensor] | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return "EMA"

    # --- the parameters and their local parts --------------------------------------------------------
    @staticmethod
    def _params(pl_module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def _ensure(self, trainer, pl_module) -> None:
        """Have an average: the checkpoint's once one was loaded (which may happen after fit start:
        DeepSpeed restores after its setup), else a copy of the current weights."""
        if self._loaded is not None or not self.ema:
            self.ema = {}
            self._initialise(pl_module, trainer.world_size, trainer.global_rank)

    def _initialise(self, pl_module, world_size: int, rank: int) -> None:
        """Create the average: from the loaded checkpoint state if any, else from the current weights."""
        params = self._params(pl_module)
        self.sharded = any(is_partitioned(p) for _, p in params)
        loaded, self._loaded = self._loaded, None
        with torch.no_grad():
            if loaded is None:
                self.ema = {n: local_tensor(p).detach().float().clone() for n, p in params}
                return
            self.num_updates = int(loaded.get("num_updates", 0))
            saved = loaded["state_dict"]
            missing = [n for n, _ in params if n not in saved]
            if missing:
                raise KeyError(f"the checkpoint's EMA has no entry for parameters {missing[:5]} (was it saved by another model?)")
            if loaded.get("sharded"):
                if not self.sharded or loaded.get("world_size") != world_size:
                    raise ValueError(
                        f"the checkpoint holds a ZeRO-3 EMA sharded over {loaded.get('world_size')} ranks; this run is "
                        f"{'ZeRO-3 over ' + str(world_size) + ' ranks' if self.sharded else 'not ZeRO-3'}. Consolidate it with "
                        "python -m flowmatch convert-checkpoint and resume from the file."
                    )
                self.ema = {n: saved[n].to(local_tensor(p).device, torch.float32).clone() for n, p in params}
            else:
                self.ema = {n: _local_part(saved[n], p, rank).to(local_tensor(p).device, torch.float32) for n, p in params}
            for n, p in params:
                if self.ema[n].shape != local_tensor(p).shape:
                    raise ValueError(f"EMA entry {n} has shape {tuple(self.ema[n].shape)}, the parameter's part {tuple(local_tensor(p).shape)}")

    # --- training: update after each optimizer step ----------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._ensure(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # after any restore

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._ensure(trainer, pl_module)
        step = trainer.global_step
        if step == self._last_step:  # accumulating gradients: no optimizer step yet
            return
        self._last_step = step
        if step < self.start_step or step % self.update_every:
            return
        decay = self.current_decay()
        for name, p in self._params(pl_module):
            self.ema[name].lerp_(local_tensor(p).float(), 1.0 - decay)
        self.num_updates += 1

    # --- evaluation with the EMA weights -------------------------------------------------------------------
    @torch.no_grad()
    def swap_in(self, pl_module) -> bool:
        """Put the EMA weights into the model, keeping the raw ones aside. False if there is no EMA."""
        if self._backup is not None or not self.ema:
            return False
        params = self._params(pl_module)
        self._backup = {}
        for name, p in params:
            local = local_tensor(p)
            self._backup[name] = local.detach().clone()
            local.copy_(self.ema[name].to(local.dtype))
        if self.sharded:
            refresh_after_shard_write([p for _, p in params])
        return True

    @torch.no_grad()
    def swap_out(self, pl_module) -> None:
        """Put the raw weights back (bit for bit)."""
        if self._backup is None:
            return
        params = self._params(pl_module)
        for name, p in params:
            local_tensor(p).copy_(self._backup[name])
        self._backup = None
        if self.sharded:
            refresh_after_shard_write([p for _, p in params])

    def _eval_start(self, trainer, pl_module) -> None:
        if not self.use_for_eval:
            return
        fitting = trainer.state.fn == "fit"
        if self._loaded is not None or (fitting and not self.ema):
            self._ensure(trainer, pl_module)  # e.g. validate / test of a checkpoint that has an EMA
        if self.ema:  # (validate / test of a checkpoint without one: the raw weights)
            self.swap_in(pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.swap_out(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self.swap_out(pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.swap_out(pl_module)  # never leave EMA weights in the model being trained

    # --- checkpoints -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not self.ema:
            return
        if self._backup is not None and not self.sharded and "state_dict" in checkpoint:
            # saved while the EMA weights are swapped in: the checkpoint's weights must be the raw ones
            for name, raw in self._backup.items():
                if name in checkpoint["state_dict"]:
                    checkpoint["state_dict"][name] = raw.detach().cpu().clone()
        params = dict(self._params(pl_module))
        checkpoint["ema"] = {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "sharded": self.sharded,
            "world_size": trainer.world_size,
            "rank": trainer.global_rank,
            "state_dict": {n: t.detach().cpu().clone() for n, t in self.ema.items()},
            # full shapes, to consolidate ZeRO-3 shards later
            "shapes": {n: list(getattr(p, "ds_shape", p.shape)) for n, p in params.items()},
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        ema = checkpoint.get("ema")
        if isinstance(ema, dict) and ema.get("state_dict"):
            self._loaded = ema  # taken up at the next hook that needs it (the model may still move to its device)
            self.num_updates = int(ema.get("num_updates", 0))


def _local_part(full: torch.Tensor, param: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's part of a full (consolidated) EMA tensor: all of it, or its ZeRO-3 shard."""
    if not is_partitioned(param):
        return full.clone()
    part = param.ds_tensor.numel()
    flat = full.flatten()
    shard = flat[rank * part : (rank + 1) * part]
    if shard.numel() < part:  # the last ranks' shards are padded with zeros
        shard = torch.cat([shard, flat.new_zeros(part - shard.numel())])
    return shard.clone().view_as(param.ds_tensor)
