"""Fréchet distance (torchmetrics' FID with a custom feature network) against its closed form, and the
loading of feature networks from a path: TorchScript files, and clear errors for anything else."""

import threading
import time

import fcntl
import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from flowmatch.metrics import FeatureNetwork, FeatureNetworkError, ensure_feature_network, frechet_distance, load_feature_network


def closed_form_fd(a: np.ndarray, b: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of the sample means / covariances (float64, scipy)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def gaussian_images(n: int, mean: np.ndarray, cov: np.ndarray, seed: int) -> torch.Tensor:
    """n samples of N(mean, cov) in R^4 as 1-channel 2x2 images."""
    x = np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)
    return torch.from_numpy(x).float().reshape(n, 1, 2, 2)


def pixels() -> FeatureNetwork:
    """The identity feature network of 2x2 images: features = the 4 pixels."""
    return FeatureNetwork(nn.Flatten(), num_features=4)


A = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.3, 0.0], [0.0, 0.0, 1.0, -0.4], [0.2, 0.0, 0.0, 1.0]])
COV1 = A @ A.T
COV2 = np.diag([0.5, 2.0, 1.0, 0.3])


def test_fd_matches_the_closed_form_on_gaussian_samples():
    real = gaussian_images(20000, np.zeros(4), COV1, seed=0)
    fake = gaussian_images(20000, np.array([0.5, -0.2, 0.0, 0.3]), COV2, seed=1)
    fd = frechet_distance(real, fake, pixels(), batch_size=4096)
    expected = closed_form_fd(real.reshape(-1, 4).double().numpy(), fake.reshape(-1, 4).double().numpy())
    assert fd == pytest.approx(expected, rel=1e-4)
    assert expected > 1.0  # a non-trivial distance


def test_fd_in_the_space_of_a_fixed_linear_map():
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    net = FeatureNetwork(nn.Sequential(nn.Flatten(), linear), num_features=3)
    real = gaussian_images(8000, np.zeros(4), COV1, seed=2)
    fake = gaussian_images(8000, np.ones(4) * 0.3, COV2, seed=3)
    with torch.no_grad():
        fr, ff = linear(real.reshape(-1, 4)).double().numpy(), linear(fake.reshape(-1, 4)).double().numpy()
    assert frechet_distance(real, fake, net, batch_size=1000) == pytest.approx(closed_form_fd(fr, ff), rel=1e-4)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_a_mean_shift():
    x = gaussian_images(5000, np.zeros(4), COV1, seed=4)
    assert abs(frechet_distance(x, x, pixels())) < 1e-3
    # same covariance, mean shifted by c in each of the 4 features: FD = 4 c^2
    shifts = [0.1, 0.5, 1.0, 2.0]
    fds = [frechet_distance(x, x + c, pixels()) for c in shifts]
    assert fds == pytest.approx([4 * c**2 for c in shifts], rel=1e-3, abs=1e-3)
    assert all(a < b for a, b in zip(fds, fds[1:]))


def test_fd_checks_its_inputs():
    x = gaussian_images(10, np.zeros(4), COV1, seed=5)
    with pytest.raises(FeatureNetworkError, match="fake images"):
        frechet_distance(x, x[:1], pixels())
    with pytest.raises(FeatureNetworkError, match="differ in shape"):
        frechet_distance(x, torch.zeros(10, 1, 3, 3), pixels())


def test_feature_network_is_frozen_and_a_plain_extractor_cannot_predict():
    net = FeatureNetwork(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4)), num_features=4)
    net.train()
    assert not net.training and not net.network.training
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.randn(8, 1, 2, 2, requires_grad=True)
    out = net(x)
    assert out.shape == (8, 4) and out.dtype == torch.float32 and not out.requires_grad
    assert net.num_classes == 0
    with pytest.raises(FeatureNetworkError, match="not a classifier"):
        net.predict(x)
    with pytest.raises(FeatureNetworkError, match="num_features"):
        FeatureNetwork(nn.Flatten())


class ThreeChannelFeatures(nn.Module):
    """Stands in for a local Inception exported to TorchScript: RGB images -> pooled features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("expected RGB images")
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_torchscript_feature_network_repeats_grey_images_to_rgb(tmp_path):
    torch.manual_seed(0)
    module = ThreeChannelFeatures()
    torch.jit.save(torch.jit.script(module), str(tmp_path / "rgb.pt"))
    net = load_feature_network(str(tmp_path / "rgb.pt"), image_channels=1, image_size=16)
    assert (net.num_features, net.in_channels, net.num_classes) == (5, 3, 0)
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(net(x), module(x.repeat(1, 3, 1, 1)), atol=1e-6)
    assert frechet_distance(x, -x, net) > 0

    grey = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(1))  # takes the 1-channel images as they are
    torch.jit.save(torch.jit.script(grey), str(tmp_path / "grey.pt"))
    net = load_feature_network(str(tmp_path / "grey.pt"), image_channels=1, image_size=16)
    assert (net.num_features, net.in_channels) == (16, 1)


def _tiny_autoencoder_checkpoint(path) -> None:
    """A real Lightning checkpoint of another model: the AutoencoderModule after one training step."""
    from flowmatch.autoencoders.conv import AutoencoderModule

    torch.manual_seed(0)
    model = AutoencoderModule(latent_channels=2, base_channels=4, downsample=2)
    loader = torch.utils.data.DataLoader(torch.rand(4, 1, 8, 8) * 2 - 1, batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, loader)
    trainer.save_checkpoint(path)


def test_load_feature_network_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FeatureNetworkError, match="nope.ckpt: no such file"):
        load_feature_network(str(missing))

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureNetworkError, match="garbage.ckpt.*not a readable"):
        load_feature_network(str(garbage))

    other = tmp_path / "autoencoder.ckpt"
    _tiny_autoencoder_checkpoint(other)
    with pytest.raises(FeatureNetworkError, match="autoencoder.ckpt is not a checkpoint of flowmatch.classifiers.DigitClassifier"):
        load_feature_network(str(other))

    # as the CLI writes it: the model's class path is recorded, and named in the error
    ckpt = torch.load(other, weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "flowmatch.autoencoders.conv.AutoencoderModule"
    torch.save(ckpt, other)
    with pytest.raises(FeatureNetworkError, match="is a checkpoint of flowmatch.autoencoders.conv.AutoencoderModule, not of"):
        load_feature_network(str(other))


def test_ensure_feature_network_without_training(tmp_path, capsys):
    present = tmp_path / "fn.ckpt"
    present.write_bytes(b"x")
    assert ensure_feature_network(str(present), "configs/does-not-matter.yaml") == str(present)
    assert capsys.readouterr().out == ""  # nothing to do, nothing said
    with pytest.raises(FeatureNetworkError, match="missing.ckpt: no such file, and no training config"):
        ensure_feature_network(str(tmp_path / "missing.ckpt"), None)
    with pytest.raises(FeatureNetworkError, match="nowhere.yaml does not exist"):
        ensure_feature_network(str(tmp_path / "missing.ckpt"), str(tmp_path / "nowhere.yaml"))


def test_ensure_feature_network_waits_for_the_process_that_holds_the_lock(tmp_path):
    """While another process trains (holds the lock), a caller waits, then finds the file and trains nothing."""
    target = tmp_path / "fn.ckpt"
    config = tmp_path / "would_fail.yaml"
    config.write_text("model: {class_path: no.such.Model}\n")  # training with it would fail: it must not run
    result: dict = {}
    with open(tmp_path / "fn.ckpt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.setdefault("path", ensure_feature_network(str(target), str(config))))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # blocked on the lock
        target.write_bytes(b"trained elsewhere")
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(timeout=30)
    assert result["path"] == str(target) and target.read_bytes() == b"trained elsewhere"
