"""Test helpers importable by `python -m flowmatch fit` subprocesses (put tests/ on PYTHONPATH).

``RandomLatentsDataModule``: a tiny in-memory data module of random latents and text conditions,
shaped like the real latent/caption data: {"x0": (B, C, H, W), "cond": {"pooled": (B, P), "tokens": (B, L, D)}}.
``SaveNetworkWeights``: a callback that writes the network's weights as training starts (before the
first optimizer step) and as it ends, so a test can check what a run started from.
"""

from __future__ import annotations

from pathlib import Path

import lightning
import torch
from torch.utils.data import DataLoader, Dataset


class _RandomLatents(Dataset):
    def __init__(self, num: int, shape: tuple[int, int, int], pooled_dim: int, num_tokens: int, context_dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(num, *shape, generator=g)
        self.pooled = torch.randn(num, pooled_dim, generator=g)
        self.tokens = torch.randn(num, num_tokens, context_dim, generator=g)

    def __len__(self) -> int:
        return self.x0.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"x0": self.x0[i], "cond": {"pooled": self.pooled[i], "tokens": self.tokens[i]}}


class RandomLatentsDataModule(lightning.LightningDataModule):
    """Random float32 latents (C, H, W) with pooled (P,) and token (L, D) text conditions."""

    def __init__(self, channels: int = 4, size: int = 8, pooled_dim: int = 16, context_dim: int = 32, num_tokens: int = 5,
                 num_train: int = 16, num_val: int = 4, batch_size: int = 4, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.channels, self.size = channels, size
        self.batch_size = batch_size
        dims = (pooled_dim, num_tokens, context_dim)
        self.train_set = _RandomLatents(num_train, (channels, size, size), *dims, seed=seed)
        self.val_set = _RandomLatents(num_val, (channels, size, size), *dims, seed=seed + 1)

    @property
    def sample_shape(self) -> list[int]:
        return [self.channels, self.size, self.size]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class SaveNetworkWeights(lightning.Callback):
    """Writes DIRPATH/start.pt (network state before the first optimizer step) and DIRPATH/end.pt."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self._saved_start = False

    def _save(self, pl_module, name: str) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}
        torch.save(state, self.dirpath / name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._saved_start:
            self._save(pl_module, "start.pt")
            self._saved_start = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(pl_module, "end.pt")
