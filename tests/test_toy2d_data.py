"""The 2-D toy targets and their data module (real samplers, real DataLoaders)."""

import math

import lightning
import pytest
import torch

from flowmatch.data import TARGET_NUM_CLASSES, TARGETS, Toy2DDataModule, sample_target
from flowmatch.data.toy2d import EIGHT_GAUSSIANS_CENTERS, EIGHT_GAUSSIANS_STD


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_shape_dtype_determinism_and_spread(name):
    x, y = sample_target(name, 4000, seed=3)
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert y.shape == (4000,) and y.dtype == torch.int64
    # Same seed -> identical; different seed -> different points.
    x2, y2 = sample_target(name, 4000, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sample_target(name, 4000, seed=4)[0])
    # Comparable spread, roughly within [-4, 4].
    assert x.abs().max() < 5.0
    assert 0.7 < x.std(dim=0).max() < 3.0
    assert x.mean(dim=0).abs().max() < 0.6
    assert set(y.unique().tolist()) == set(range(TARGET_NUM_CLASSES[name]))


def test_eight_gaussians_cluster_around_their_centres():
    x, y = sample_target("8gaussians", 8000, seed=0)
    centres = torch.as_tensor(EIGHT_GAUSSIANS_CENTERS, dtype=torch.float32)
    assert len(y.unique()) == 8
    assert torch.allclose(centres.norm(dim=1), torch.full((8,), 4 / 1.414), atol=1e-5)
    for k in range(8):
        pts = x[y == k]
        assert abs(len(pts) - 1000) < 150  # equal weights
        assert torch.allclose(pts.mean(dim=0), centres[k], atol=0.06)
        assert pts.std(dim=0).sub(EIGHT_GAUSSIANS_STD).abs().max() < 0.04
    # Nearly every point is closest to its own mode's centre.
    nearest = torch.cdist(x, centres).argmin(dim=1)
    assert (nearest == y).float().mean() > 0.99


def test_checkerboard_labels_are_squares_and_moons_labels_are_moons():
    x, y = sample_target("checkerboard", 4000, seed=1)
    col, row = torch.floor(x[:, 0] / 2) + 2, torch.floor(x[:, 1] / 2) + 2
    assert torch.all((col + row) % 2 == 0)  # only the filled squares of the board
    assert torch.equal(y, (col * 2 + torch.div(row, 2, rounding_mode="floor")).long())
    x, y = sample_target("moons", 4000, seed=1)
    # The upper moon (label 0) lies mostly above the lower one (label 1).
    assert x[y == 0, 1].mean() > x[y == 1, 1].mean() + 1.0


def test_unknown_target_names_it_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'spiral'.*8gaussians.*checkerboard.*moons.*swissroll"):
        sample_target("spiral", 10)
    with pytest.raises(ValueError, match="spiral"):
        Toy2DDataModule(target="spiral")


def _shared_points(a, b):
    """Number of points (rows) that occur in both a and b."""
    return len(set(map(tuple, a.tolist())) & set(map(tuple, b.tolist())))


def _all_points(loader):
    return torch.cat([batch["x0"] for batch in loader])


def test_splits_are_disjoint_and_reference_samples_are_held_out_and_stable():
    dm = Toy2DDataModule(target="moons", num_train=3000, num_val=500, num_test=400, batch_size=128)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = _all_points(dm.train_dataloader()), _all_points(dm.val_dataloader()), _all_points(dm.test_dataloader())
    assert train.shape == (3000, 2) and val.shape == (500, 2) and test.shape == (400, 2)
    for a, b in ((train, val), (train, test), (val, test)):
        assert _shared_points(a, b) == 0
    # Reference samples: the same each call, and with n = num_val exactly the validation set.
    ref = dm.reference_samples(500)
    assert ref.shape == (500, 2) and torch.equal(ref, dm.reference_samples(500))
    assert torch.equal(ref, dm._dataset("val").points)
    pts, labels = dm.reference_samples(100, split="test", return_labels=True)
    assert pts.shape == (100, 2) and labels.dtype == torch.int64
    assert _shared_points(dm.reference_samples(300, split="test"), train) == 0
    assert _shared_points(train, train) == len(train)  # (the check does find shared points)


def test_unconditional_batches():
    dm = Toy2DDataModule(num_train=1000, num_val=300, batch_size=64)
    assert dm.dim == 2 and dm.sample_shape == (2,) and dm.num_classes == 0
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x0"}
    assert batch["x0"].shape == (64, 2) and batch["x0"].dtype == torch.float32


def test_conditional_batches_and_deterministic_eval_loaders():
    dm = Toy2DDataModule(target="checkerboard", num_train=1000, num_val=300, batch_size=64, conditional=True)
    assert dm.num_classes == 8
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x0", "cond"}
    assert batch["cond"].shape == (64,) and batch["cond"].dtype == torch.int64
    assert 0 <= int(batch["cond"].min()) and int(batch["cond"].max()) < dm.num_classes
    # val is not shuffled: two passes give the same batches, in the same order.
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(first) == math.ceil(300 / 64)
    for a, b in zip(first, second):
        assert torch.equal(a["x0"], b["x0"]) and torch.equal(a["cond"], b["cond"])
    # train is shuffled: consecutive epochs (passes over the one loader Lightning keeps) see
    # different orders, but the set of points is fixed.
    train_loader = dm.train_dataloader()
    e1, e2 = _all_points(train_loader), _all_points(train_loader)
    assert not torch.equal(e1, e2)
    assert torch.equal(e1.sort(dim=0).values, e2.sort(dim=0).values)
    # The same seed rebuilds the same data module.
    dm2 = Toy2DDataModule(target="checkerboard", num_train=1000, num_val=300, batch_size=64, conditional=True)
    assert torch.equal(dm2.reference_samples(300), dm.reference_samples(300))


def test_datamodule_drives_a_lightning_trainer(tmp_path):
    """A tiny rectified-flow model written here fits one epoch through Lightning's own loop."""
    from flowmatch.networks.mlp import MLPVelocity

    class TinyRF(lightning.LightningModule):
        def __init__(self, num_classes):
            super().__init__()
            self.net = MLPVelocity(hidden=32, depth=2, time_dim=16, num_classes=num_classes)

        def _loss(self, batch):
            x0 = batch["x0"]
            t, eps = torch.rand(x0.shape[0]), torch.randn_like(x0)
            zt = (1 - t[:, None]) * x0 + t[:, None] * eps  # t = 0 data, t = 1 noise
            return (self.net(zt, t, batch.get("cond")) - (eps - x0)).pow(2).mean()

        def training_step(self, batch, _):
            return self._loss(batch)

        def validation_step(self, batch, _):
            self.log("val/loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    dm = Toy2DDataModule(num_train=512, num_val=128, batch_size=128, conditional=True)
    trainer = lightning.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(TinyRF(dm.num_classes), datamodule=dm)
    assert trainer.global_step == 4
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
