"""The demo's feature network: the digit classifier trained by the platform's CLI on the train split,
loaded back by path, and trained on demand by ensure_feature_network."""

import contextlib
import io
from pathlib import Path

import pytest
import torch

from flowmatch.classifiers import DigitClassifier, DigitClassifierError
from flowmatch.classifiers.digits import random_shift
from flowmatch.data.digits import load_digit_images, split_indices
from flowmatch.metrics import ensure_feature_network, frechet_distance, load_feature_network

CONFIG = Path(__file__).resolve().parents[1] / "configs/classifier/digits.yaml"


@pytest.fixture
def trained(trained_digit_classifier):
    """ensure_feature_network trained the classifier with the CLI (tests/conftest.py, once per session)."""
    return trained_digit_classifier


def test_ensure_trains_the_classifier_with_the_cli_then_is_a_no_op(trained):
    target = trained["target"]
    assert trained["path"] == str(target) and target.is_file()
    assert "training it with" in trained["printed"] and "fit --config" in trained["printed"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".digits.ckpt.train-")]  # the work folder is gone
    ckpt = torch.load(target, weights_only=True)
    assert ckpt["hyper_parameters"]["_class_path"] == "flowmatch.classifiers.DigitClassifier"
    assert ckpt["hyper_parameters"]["sample_shape"] == [1, 32, 32]  # linked from the data module by the CLI
    assert (trained["workdir"] / "mlflow.db").is_file()  # the run is tracked in the working directory's store

    before = target.stat().st_mtime_ns
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert ensure_feature_network(str(target), str(CONFIG)) == str(target)
    assert target.stat().st_mtime_ns == before and printed.getvalue() == ""


def test_the_trained_classifier_is_accurate_on_the_held_out_digits(trained):
    net = load_feature_network(trained["path"])
    assert (net.num_features, net.num_classes) == (64, 10)
    images, labels = load_digit_images(32)
    test = split_indices(len(labels), seed=0)["test"]
    x = torch.from_numpy(images[test])
    predicted = net.predict(x)
    assert predicted.dtype == torch.int64 and predicted.shape == (len(test),)
    accuracy = float((predicted.numpy() == labels[test]).mean())
    assert accuracy >= 0.9, accuracy
    feats = net(x)
    assert feats.shape == (len(test), 64) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    # held-out digits sit closer to the training digits than noise does, in this feature space
    train = torch.from_numpy(images[split_indices(len(labels), seed=0)["train"]])
    assert frechet_distance(train, x, net) < 0.2 * frechet_distance(train, torch.rand_like(x) * 2 - 1, net)


def test_classifier_shapes_and_errors():
    torch.manual_seed(0)
    model = DigitClassifier(width=4, num_features=12, sample_shape=[1, 32, 32]).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert model.features(x).shape == (3, 12) and model(x).shape == (3, 10)
    assert DigitClassifier(width=4).eval()(torch.rand(2, 1, 16, 16)).shape == (2, 10)  # any size from 8x8 up
    with pytest.raises(DigitClassifierError, match="3 channels but image_channels=1"):
        DigitClassifier(sample_shape=[3, 32, 32])
    with pytest.raises(DigitClassifierError, match="too small"):
        DigitClassifier(sample_shape=[1, 4, 4])
    with pytest.raises(DigitClassifierError, match=r"expected images \(B, 1, H, W\)"):
        model(torch.zeros(2, 3, 32, 32))


def test_random_shift_moves_digits_and_keeps_the_background():
    images, _ = load_digit_images(32)
    x = torch.from_numpy(images[:64])
    shifted = random_shift(x, 2, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape and shifted.min() >= -1 and shifted.max() <= 1
    assert not torch.equal(shifted, x)
    # a whole-pixel shift: every image equals its original moved by some (dy, dx) in [-2, 2]^2
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    for i in range(8):
        assert any(torch.equal(shifted[i, 0], padded[i, 0, dy : dy + 32, dx : dx + 32]) for dy in range(5) for dx in range(5))
    assert torch.equal(random_shift(x, 0), x)
