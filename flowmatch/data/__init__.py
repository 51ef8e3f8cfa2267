"""Data: toy 2-D targets, the built-in digits demo, and latent/caption shards (writing, streaming, caption mixing).

- flowmatch.data.toy2d: 2-D toy targets and their data module
- flowmatch.data.digits: scikit-learn's digits, upscaled, with original and described captions
- flowmatch.data.shard_format: the shard and manifest format (docs/data.md)
- flowmatch.data.prepare: images + captions -> shards (``python -m flowmatch prepare``)
- flowmatch.data.facts: LatentDataFacts, what a latent data set is (manifest, encoders, autoencoder, normalisation)
- flowmatch.data.shards: LatentShardDataModule, streaming the shards with webdataset
- flowmatch.data.reference: the held-out reference batches sample metrics compare with
"""

from flowmatch.data.digits import DigitsImageDataModule
from flowmatch.data.shards import LatentShardDataModule
from flowmatch.data.toy2d import TARGET_NUM_CLASSES, TARGETS, Toy2DDataModule, sample_target

__all__ = ["TARGETS", "TARGET_NUM_CLASSES", "DigitsImageDataModule", "LatentShardDataModule", "Toy2DDataModule", "sample_target"]
