"""The demo digits: upscaling, fixed splits, and a describer whose words carry what the label does not."""

import numpy as np
import pytest
import torch

from flowmatch.data import digits
from flowmatch.data.digits import (
    DigitsImageDataModule,
    describe_digits,
    digit_features,
    load_digit_images,
    original_caption,
    split_indices,
)


@pytest.fixture(scope="module")
def data():
    images, labels = load_digit_images(32)
    return images, labels, describe_digits(images, labels), digit_features(images)


def test_images_and_original_captions(data):
    images, labels, _, _ = data
    assert images.shape == (1797, 1, 32, 32) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() <= 1.0
    assert original_caption(7) == "a 7" and original_caption(8) == "an 8"


def test_splits_are_fixed_disjoint_and_cover_everything():
    a, b = split_indices(1797, seed=0), split_indices(1797, seed=0)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (1437, 180, 180)
    together = np.concatenate([a["train"], a["val"], a["test"]])
    assert len(np.unique(together)) == 1797
    assert not np.array_equal(split_indices(1797, seed=1)["val"], a["val"])


def test_describer_is_deterministic_and_names_the_digit(data):
    images, labels, captions, _ = data
    assert describe_digits(images[:50], labels[:50]) == captions[:50]
    assert "seven" in captions[int(np.flatnonzero(labels == 7)[0])]
    assert len(set(captions)) > 500  # far richer than the 10 labels
    assert " digit " in describe_digits(images[:1])[0]  # without labels the noun is "digit"


def test_category_boundaries_are_the_tertiles(data):
    f = data[3]
    for values, lo, hi in ((f["stroke"], digits.STROKE_THIN, digits.STROKE_THICK), (np.abs(f["slant"]), digits.SLANT_SLIGHT, digits.SLANT_STRONG)):
        share_low, share_high = (values < lo).mean(), (values > hi).mean()
        assert 0.28 < share_low < 0.38 and 0.28 < share_high < 0.38


def test_stroke_word_tracks_measured_ink_within_each_digit(data):
    """The thickness word carries information the label does not: within a class, 'thick' digits hold more ink."""
    _, labels, captions, f = data
    thick = np.array(["thick" in c.split(",")[0] for c in captions])
    thin = np.array(["thin" in c.split(",")[0] for c in captions])
    wins = 0
    for d in range(10):
        sel = labels == d
        if (thick & sel).sum() >= 5 and (thin & sel).sum() >= 5:
            wins += f["ink"][thick & sel].mean() > f["ink"][thin & sel].mean()
    assert wins >= 9
    # and over all digits the word ranks the ink: rank correlation well above zero
    score = thick.astype(float) - thin.astype(float)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert np.corrcoef(ranks(score), ranks(f["ink"]))[0, 1] > 0.4


def test_slant_word_follows_measured_slant(data):
    _, _, captions, f = data
    right = np.array(["right-leaning" in c for c in captions])
    left = np.array(["left-leaning" in c for c in captions])
    upright = np.array(["upright" in c for c in captions])
    assert (f["slant"][right] > 0).all() and (f["slant"][left] < 0).all()
    assert np.abs(f["slant"][upright]).max() < np.abs(f["slant"][right | left]).min()


def test_image_data_module_batches_for_the_autoencoder():
    dm = DigitsImageDataModule(batch_size=16)
    assert dm.sample_shape == [1, 32, 32]
    batch = next(iter(dm.train_dataloader()))
    assert batch["x0"].shape == (16, 1, 32, 32) and batch["label"].dtype == torch.int64
    assert len(dm.val_dataloader().dataset) == 180
    assert dm.reference_images(4, "test").shape == (4, 1, 32, 32)
