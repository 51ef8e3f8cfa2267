"""Data: toy 2-D targets (and, beside them, the image-latent shards and their data modules)."""

from flowmatch.data.toy2d import TARGET_NUM_CLASSES, TARGETS, Toy2DDataModule, sample_target

__all__ = ["TARGETS", "TARGET_NUM_CLASSES", "Toy2DDataModule", "sample_target"]
