"""Counting what the data pipeline had to skip, reporting it, and stopping when too much is bad.

Inside a loader worker, :class:`SkipLog` turns each bad sample (missing key, wrong latent shape,
unreadable array) and each bad shard (truncated or corrupt tar, unreadable URL) into a warning
that names the shard and key, and counts it. The counts ride along with the next sample out of
the worker (fields ``_read`` / ``_skipped`` / ``_shard_errors`` of a batch: workers are separate processes,
and what they yield is the only way back; counted when read, so a shuffle buffer that reads ahead does
not distort the share), so the data module in the main process sums them (:class:`DataHealth`) whatever the number of workers, removes them from the
batch before the model sees it, and raises :class:`DataQualityError` once more than
``max_bad_fraction`` of what was read was bad. :class:`DataHealthLogger` (added to the trainer by
the CLI, like the progress bar; add it yourself to a Trainer built in Python) logs ``data/skipped``, ``data/shard_errors`` and ``data/bad_fraction``.
"""

from __future__ import annotations

import warnings

import lightning
import torch


class DataQualityError(RuntimeError):
    """Too large a share of the streamed data was unreadable: training stops with this error."""


class DataWarning(UserWarning):
    """A skipped sample or shard (the message names the shard and key)."""


class SkipLog:
    """Worker-local: warns about and counts skipped samples and shard errors since the last drain."""

    def __init__(self, max_messages: int = 20):
        self.max_messages = max_messages
        self.read = self.skipped = self.shard_errors = self.shown = 0

    def _warn(self, message: str) -> None:
        self.shown += 1
        if self.shown <= self.max_messages:
            warnings.warn(message, DataWarning, stacklevel=3)
        elif self.shown == self.max_messages + 1:
            warnings.warn("further skipped samples are counted but not shown", DataWarning, stacklevel=3)

    def sample(self, err: Exception) -> None:
        self.skipped += 1
        self._warn(f"skipped a sample: {err}")

    def shard(self, exn: Exception) -> bool:
        """A webdataset exception handler: warn, count, go on with the next shard.

        webdataset calls it at the level of a tar member (args: "message @ file"), of a shard (args end
        with the URL) or of the URL opener. A member-level error abandons the rest of that shard (return
        False ends the shard's tar iterator, so the same broken stream is not reported twice); at the
        other levels the stream goes on with the next shard (return True).
        """
        self.shard_errors += 1
        parts = [str(a) for a in exn.args if isinstance(a, str)]
        self._warn(f"skipped the rest of a shard after {type(exn).__name__}: {' | '.join(parts) or exn!r}")
        member_level = len(exn.args) == 1 and " @ " in str(exn.args[0])
        return not member_level

    def good(self) -> None:
        self.read += 1

    def drain(self) -> tuple[int, int, int]:
        """(good samples read, samples skipped, shard errors) since the last drain."""
        out = (self.read, self.skipped, self.shard_errors)
        self.read = self.skipped = self.shard_errors = 0
        return out


class DataHealth:
    """Main process: totals per stage ("train", "val", "test") of good samples read, samples skipped and shard errors."""

    def __init__(self, max_bad_fraction: float = 0.01, min_samples: int = 256):
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.counts: dict[str, dict[str, int]] = {}

    def update(self, stage: str, read: int, skipped: int, shard_errors: int) -> None:
        c = self.counts.setdefault(stage, {"samples": 0, "skipped": 0, "shard_errors": 0})
        c["samples"] += read
        c["skipped"] += skipped
        c["shard_errors"] += shard_errors

    def total(self, field: str) -> int:
        return sum(c[field] for c in self.counts.values())

    def bad_fraction(self, stage: str | None = None) -> float:
        cs = [self.counts[stage]] if stage is not None and stage in self.counts else list(self.counts.values()) if stage is None else []
        bad = sum(c["skipped"] + c["shard_errors"] for c in cs)
        seen = sum(c["samples"] for c in cs) + bad
        return bad / seen if seen else 0.0

    def too_bad(self, stage: str) -> bool:
        c = self.counts.get(stage)
        if c is None:
            return False
        seen = c["samples"] + c["skipped"] + c["shard_errors"]
        return seen >= self.min_samples and self.bad_fraction(stage) > self.max_bad_fraction

    def error(self, stage: str, where: str) -> DataQualityError:
        c = self.counts[stage]
        return DataQualityError(
            f"{where}: {c['skipped']} samples and {c['shard_errors']} shards were unreadable against {c['samples']} good samples "
            f"({self.bad_fraction(stage):.1%} bad, more than max_bad_fraction={self.max_bad_fraction:.1%}); the warnings above name "
            f"the shards and keys. Fix or remove them, or raise max_bad_fraction."
        )


class DataHealthLogger(lightning.Callback):
    """Logs the data module's skip counts: data/skipped, data/shard_errors, data/bad_fraction (summed over ranks)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        health = getattr(trainer.datamodule, "health", None)
        if not isinstance(health, DataHealth) or trainer.global_step % max(1, trainer.log_every_n_steps):
            return
        values = {"data/skipped": health.total("skipped"), "data/shard_errors": health.total("shard_errors"), "data/samples": health.total("samples")}
        for name, value in values.items():  # running totals of this rank, summed over ranks
            pl_module.log(name, torch.tensor(float(value)), on_step=True, on_epoch=False, reduce_fx="sum",
                          sync_dist=trainer.world_size > 1, batch_size=1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        health = getattr(trainer.datamodule, "health", None)
        if isinstance(health, DataHealth):
            pl_module.log("data/bad_fraction", health.bad_fraction(), on_step=False, on_epoch=True, batch_size=1)
