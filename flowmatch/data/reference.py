"""Held-out reference data for sample metrics: the first ``n`` samples of a split of latent shards.

The same samples on every call (shard order, the caption mixing of epoch 0, one reader in the main
process), so numbers are comparable across validations and runs. Metrics callbacks call these with
the data module; the data module only streams.
"""

from __future__ import annotations

import torch

from flowmatch.data.shard_format import ShardFormatError

_COUNTS = ("_read", "_skipped", "_shard_errors")


def reference_batch(datamodule, n: int, split: str = "val") -> dict:
    """The first ``n`` samples of ``split`` of a LatentShardDataModule as one batch, with their conditions
    ({"x0", "cond", "caption", "synthetic", "key", "label"}); the same on every call. For a data set with
    aspect-ratio buckets: the first ``n`` of the bucket of the default sample shape (one shape a batch)."""
    if datamodule.facts.buckets:
        shape = tuple(datamodule.sample_shape)
        batch = next((b for b in reference_buckets(datamodule, split).values() if tuple(b["x0"].shape[1:]) == shape), None)
        if batch is None:
            raise ShardFormatError(f"the {split} split holds no sample of the default shape {shape}")
        return {k: v[:n] for k, v in batch.items() if k != "cond"} | {"cond": {k: v[:n] for k, v in batch["cond"].items()}}
    loader = datamodule.dataloader(split, rank=0, world_size=1, num_workers=0)
    loader.sizes = None  # one batch of n, not the split's batch plan
    loader.batch_size = n
    for batch in loader:
        for k in _COUNTS:
            batch.pop(k)
        if datamodule.facts.encodes_on_the_fly:
            batch["cond"] = datamodule.facts.encode(batch["caption"])
        return batch
    raise ShardFormatError(f"the {split} split yielded no samples")


def reference_samples(datamodule, n: int, split: str = "val", return_labels: bool = False):
    """``n`` held-out normalised latents (n, C, h, w) (and labels, -1 where unknown) for metrics in latent space."""
    batch = reference_batch(datamodule, n, split)
    labels = batch.get("label", torch.full((batch["x0"].shape[0],), -1, dtype=torch.int64))
    return (batch["x0"], labels) if return_labels else batch["x0"]


def reference_images(datamodule, n: int, split: str = "val") -> torch.Tensor:
    """``n`` held-out images (n, C_img, H, W) in [-1, 1], decoded from the split's latents, for image metrics."""
    return datamodule.facts.decode(reference_batch(datamodule, n, split)["x0"])


def reference_buckets(datamodule, split: str = "val") -> dict[str, dict]:
    """Every sample of ``split`` of a data set with aspect-ratio buckets, as one batch per bucket ({bucket name: batch},
    in the manifest's bucket order); the same on every call."""
    loader = datamodule.dataloader(split, rank=0, world_size=1, num_workers=0)
    loader.sizes = {}  # no plan: each bucket's samples wait in its own list, flushed as one batch at the end
    loader.batch_size = (datamodule.num_samples(split) or 1 << 20) + 1
    out = {}
    for batch in loader:
        for k in _COUNTS:
            batch.pop(k)
        if datamodule.facts.encodes_on_the_fly:
            batch["cond"] = datamodule.facts.encode(batch["caption"])
        out[batch["bucket"]] = batch
    if not out:
        raise ShardFormatError(f"the {split} split yielded no samples")
    order = [b["name"] for b in datamodule.facts.buckets]
    return {name: out[name] for name in order if name in out}
