"""Helpers for the DeepSpeed and resume tests, importable by `python -m flowmatch fit` subprocesses
(tests/ is on their PYTHONPATH). No tests here.

``ResumableLatentsDataModule``: tests/helpers_latents.py's random latents and text conditions, with the
training order and data position of flowmatch.data.toy2d (ResumableDataPosition), so that a resumed
DeepSpeed run continues with the very next batch.
``NaNAfterSteps``: a toy network whose output turns NaN at a known training step.
``ZeroEMAProbe``: checks, inside a ZeRO-3 validation, that the model runs with the EMA weights.
"""

from __future__ import annotations

from pathlib import Path

import lightning
import torch
from torch.utils.data import DataLoader

from flowmatch.data.toy2d import ResumableDataPosition
from helpers_latents import RandomLatentsDataModule


class ResumableLatentsDataModule(ResumableDataPosition, RandomLatentsDataModule):
    def train_dataloader(self) -> DataLoader:
        sampler = self.resumable_sampler(self.train_set, self.batch_size, self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, generator=torch.Generator().manual_seed(0))


class NaNAfterSteps(torch.nn.Module):
    """A toy velocity network (flowmatch.networks.mlp.MLPVelocity inside) whose output turns NaN from
    training call ``nan_from`` on: a run that diverges at a known step."""

    def __init__(self, nan_from: int = 12, hidden: int = 32):
        super().__init__()
        from flowmatch.networks.mlp import MLPVelocity

        self.inner = MLPVelocity(hidden=hidden, depth=2, time_dim=16)
        self.nan_from = nan_from
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, z, t, cond=None):
        out = self.inner(z, t, cond)
        if self.training:
            self.calls += 1
            if int(self.calls) > self.nan_from:
                out = out * float("nan")
        return out


class ZeroEMAProbe(lightning.Callback):
    """Under DeepSpeed ZeRO-3, at each validation: join the EMA callback's per-rank shards and gather the
    model's parameters; rank 0 writes DIR/ema_step<N>.pt with the joined EMA and the largest difference
    between the weights validation runs with and the (bf16-rounded) EMA, which is 0 when the swap works."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_validation_epoch_end(self, trainer, pl_module):
        import torch.distributed as dist

        from flowmatch.strategies.zero3 import gathered, is_partitioned

        if trainer.sanity_checking or not all(is_partitioned(p) for p in pl_module.parameters()):
            return  # (only under ZeRO-3)
        ema = next(cb for cb in trainer.callbacks if type(cb).__name__ == "EMA")
        joined, worst = {}, 0.0
        for name, p in pl_module.named_parameters():
            shard = ema.ema[name]
            parts = [torch.zeros_like(shard) for _ in range(trainer.world_size)]
            dist.all_gather(parts, shard)
            joined[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).clone()
            with gathered([p]):
                full = p.data.float().clone()
            worst = max(worst, float((full - joined[name].to(p.dtype).float()).abs().max()))
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            torch.save({"max_diff": worst, "ema": joined}, self.dirpath / f"ema_step{trainer.global_step}.pt")
