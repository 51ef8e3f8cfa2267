"""Pixel-image data modules whose train / val / test splits are held in memory (the autoencoders' data: the demo
digits, the scenes): the loaders they share. A subclass gives each split as a TensorDataset of (image, label) and says
how a list of its items becomes a batch; the training split is shuffled with the module's seed."""

from __future__ import annotations

import lightning
import torch
from torch.utils.data import DataLoader, TensorDataset


class SplitImageDataModule(lightning.LightningDataModule):
    """Base of the in-memory image data modules: subclasses set ``batch_size``, ``seed`` and ``num_workers`` and
    implement ``_split`` and ``_collate``."""

    batch_size: int
    seed: int
    num_workers: int

    def _split(self, split: str) -> TensorDataset:
        raise NotImplementedError

    @staticmethod
    def _collate(items) -> dict:
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(self._split(split), batch_size=self.batch_size, shuffle=shuffle, generator=gen,
                          num_workers=self.num_workers, collate_fn=self._collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
