"""A small CNN digit classifier: the demo's feature network for the Fréchet distance, and the judge
of caption adherence (does the generated image show the digit the caption asked for?).

    image (B, C, H, W) in [-1, 1]
      -> conv4x4 stride 2, BatchNorm, SiLU                     (w channels, H/2)
      -> conv3x3, BatchNorm, SiLU, 2x2 max-pool                (2w, H/4)
      -> conv3x3, BatchNorm, SiLU, 2x2 max-pool                (4w, H/8)
      -> average pool to 4x4, flatten -> Linear -> SiLU        = features (B, num_features)
      -> Linear                                                = logits (B, num_classes)

(The 32x32 demo digits are upscaled 8x8 ones: the stride-2 stem loses nothing and makes a training
step cheap on a CPU.)

Trained on the TRAIN split of the demo digits only (the split of ``prepare --source demo``), with the
platform's CLI like any other model::

    python -m flowmatch fit --config configs/classifier/digits.yaml

Training augments with random shifts of a pixel or two (background stays -1).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn


class DigitClassifierError(ValueError):
    """A classifier configuration that does not fit its data."""


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.SiLU()]


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image translated by a random whole number of pixels in [-max_shift, max_shift] along each
    axis; what moves in from outside is background (-1)."""
    if max_shift <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offset = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).to(images.device)
    dev = images.device
    rows = (offset[:, 0:1] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (offset[:, 1:2] + torch.arange(w, device=dev))[:, None, None, :]
    return padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows, cols]


class DigitClassifier(L.LightningModule):
    """Trains a small CNN on batches ``{"x0": images in [-1, 1], "label": int64}`` (DigitsImageDataModule).

    ``features(x)`` gives the ``num_features``-dim feature layer (the Fréchet distance's feature
    space), ``forward(x)`` the logits. Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``
    (and ``test/...``).
    """

    def __init__(
        self,
        image_channels: int = 1,
        num_classes: int = 10,
        num_features: int = 64,
        width: int = 16,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        max_shift: int = 2,
        sample_shape: list[int] | None = None,
    ):
        """
        Args:
            image_channels: channels of the images (1 for the digits demo).
            num_classes: number of classes (10 digits).
            num_features: width of the feature layer (the Fréchet distance's feature dimension).
            width: channels of the first conv block (doubled at each of the next two).
            lr: peak AdamW learning rate (one-cycle: warm-up then cosine decay over the run).
            weight_decay: AdamW weight decay.
            max_shift: training augmentation: largest random translation, in whole pixels (0: none).
            sample_shape: shape of one image (C, H, W); checked here, and at setup against the data's (given to
                the model by flowmatch.callbacks.data_match.MatchModelToData, which the CLI adds).
        """
        super().__init__()
        self.save_hyperparameters()
        self._check_sample_shape(sample_shape, image_channels)
        self.image_channels, self.num_classes, self.num_features = image_channels, num_classes, num_features
        self.body = nn.Sequential(
            *_conv(image_channels, width, kernel=4, stride=2),
            *_conv(width, 2 * width), nn.MaxPool2d(2),
            *_conv(2 * width, 4 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.feature_layer = nn.Sequential(nn.Linear(4 * width * 16, num_features), nn.SiLU())
        self.head = nn.Linear(num_features, num_classes)

    @staticmethod
    def _check_sample_shape(sample_shape, image_channels: int) -> None:
        if sample_shape is None:
            return
        if int(sample_shape[0]) != image_channels:
            raise DigitClassifierError(f"the data's images have {sample_shape[0]} channels but image_channels={image_channels}")
        if min(int(s) for s in sample_shape[1:]) < 8:
            raise DigitClassifierError(f"images of {list(sample_shape)} are too small: the network halves them three times (need at least 8x8)")

    def setup(self, stage: str) -> None:
        self._check_sample_shape(self.hparams.get("sample_shape"), self.image_channels)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise DigitClassifierError(f"expected images (B, {self.image_channels}, H, W), got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> features (B, num_features)."""
        self._check(x)
        return self.feature_layer(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.features(x))

    @staticmethod
    def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            return batch["x0"], batch["label"]
        return batch[0], batch[1]

    def training_step(self, batch, batch_idx):
        x, y = self._unpack(batch)
        x = random_shift(x, int(self.hparams.max_shift))
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), batch_size=x.shape[0])
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        x, y = self._unpack(batch)
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=True, batch_size=x.shape[0])
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, batch_size=x.shape[0])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=total, pct_start=0.2)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
