"""Fréchet distance between generated and reference images in the feature space of a network given by path.

    FD = ||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))

with (mu, S) the mean and covariance of the features of the real and the generated images. The
computation is torchmetrics' ``FrechetInceptionDistance`` with a custom feature module: a
:class:`FeatureNetwork`, which takes float images (B, C, H, W) in [-1, 1] and returns float
features (B, num_features).

The feature network comes from a local path (nothing loads from a hub):

* a checkpoint of :class:`flowmatch.classifiers.DigitClassifier` written by ``python -m flowmatch fit``
  (the demo's feature network; ``ensure_feature_network`` trains it when it is missing), whose
  predictions also judge caption adherence (:meth:`FeatureNetwork.predict`);
* a TorchScript file (``torch.jit.save``) mapping float images (B, C, H, W) in [-1, 1] to features
  (B, D), e.g. a local Inception network wrapped so that it resizes / renormalises its input itself.
  Single-channel images are repeated to 3 channels when the scripted network does not take 1 channel.
  A TorchScript file is code: load only files you trust.
"""

from __future__ import annotations

import fcntl
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

#: the class paths under which the CLI records a DigitClassifier in a checkpoint
DIGIT_CLASSIFIER_CLASS_PATHS = ("flowmatch.classifiers.DigitClassifier", "flowmatch.classifiers.digits.DigitClassifier")


class FeatureNetworkError(ValueError):
    """A feature network path that is missing, unreadable, or not a feature network."""


class FeatureNetwork(nn.Module):
    """A frozen feature extractor for the Fréchet distance (and, if it is a classifier, a judge of labels).

    Args:
        network: a module with a ``features(images)`` method (a classifier such as DigitClassifier, whose
            ``forward`` gives logits), or a module whose ``forward(images)`` gives the features.
        num_features: feature dimension (default: ``network.num_features``).
        in_channels: channels the network takes; 1-channel images are repeated to 3 when this is 3
            (default: the images are passed as they are).
        source: where the network came from (for messages).

    ``forward(images)``: float (B, C, H, W) in [-1, 1] -> float32 (B, num_features). Always in eval
    mode and without gradients.
    """

    def __init__(self, network: nn.Module, num_features: int | None = None, in_channels: int | None = None, source: str = "<module>"):
        super().__init__()
        if num_features is None:
            num_features = getattr(network, "num_features", None)
        if not isinstance(num_features, int) or num_features < 1:
            raise FeatureNetworkError(f"feature network {source}: give num_features (it has no integer num_features attribute)")
        self.network = network.eval()
        for param in network.parameters():  # (a ScriptModule has no requires_grad_)
            param.requires_grad_(False)
        self.num_features = int(num_features)  # torchmetrics reads it instead of probing with a 299x299 image
        self.in_channels = in_channels
        self.source = source
        self._has_features = callable(getattr(network, "features", None))
        classes = getattr(network, "num_classes", 0)
        self._num_classes = int(classes) if self._has_features and isinstance(classes, int) else 0

    @property
    def num_classes(self) -> int:
        """Classes the wrapped network predicts (0: it is a plain feature extractor)."""
        return self._num_classes

    def train(self, mode: bool = True) -> "FeatureNetwork":
        return super().train(False)  # frozen: BatchNorm statistics never move

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise FeatureNetworkError(f"feature network {self.source}: expected images (B, C, H, W), got shape {tuple(images.shape)}")
        images = images.float()
        if self.in_channels is not None and images.shape[1] != self.in_channels:
            if images.shape[1] == 1 and self.in_channels == 3:
                return images.repeat(1, 3, 1, 1)
            raise FeatureNetworkError(f"feature network {self.source} takes {self.in_channels}-channel images, got {images.shape[1]}")
        return images

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._prepare(images)
        feats = self.network.features(x) if self._has_features else self.network(x)
        feats = feats.reshape(feats.shape[0], -1).float()
        if feats.shape != (images.shape[0], self.num_features):
            raise FeatureNetworkError(f"feature network {self.source} returned features {tuple(feats.shape)}, "
                                      f"expected ({images.shape[0]}, {self.num_features})")
        return feats

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted labels, int64 (B,) (only for a classifier: ``num_classes > 0``)."""
        if not self.num_classes:
            raise FeatureNetworkError(f"feature network {self.source} is not a classifier: it cannot predict labels "
                                      "(use a DigitClassifier checkpoint)")
        return self.network(self._prepare(images)).argmax(dim=1)


# --- loading ----------------------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") for name in z.namelist())


def _load_torchscript(path: Path, image_channels: int, image_size: int, map_location) -> FeatureNetwork:
    try:
        net = torch.jit.load(str(path), map_location=map_location).eval()
    except Exception as err:
        raise FeatureNetworkError(f"feature network {path}: not a loadable TorchScript file ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    errors = []
    for channels in [image_channels, 3] if image_channels == 1 else [image_channels]:  # 1-channel images may go in repeated to 3
        probe = torch.zeros(2, channels, image_size, image_size, device=map_location)
        try:
            with torch.no_grad():
                out = net(probe)
        except Exception as err:
            errors.append(f"{channels} channels: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != 2:
            raise FeatureNetworkError(f"feature network {path}: the TorchScript module must map images (B, C, H, W) to features (B, D); "
                                      f"it returned {type(out).__name__} {tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
        return FeatureNetwork(net, num_features=int(out[0].numel()), in_channels=channels, source=str(path))
    raise FeatureNetworkError(f"feature network {path}: the TorchScript module does not take images of {image_channels} channels, "
                              f"{image_size}x{image_size} in [-1, 1] ({'; '.join(errors)})")


def _load_classifier(path: Path, map_location) -> FeatureNetwork:
    from flowmatch.checkpoints import CheckpointError, read_weights, select_weights
    from flowmatch.classifiers.digits import DigitClassifier

    try:
        ckpt = read_weights(path, map_location)
    except CheckpointError as err:
        raise FeatureNetworkError(f"feature network {path}: {err}") from None
    hparams = dict(ckpt.get("hyper_parameters") or {})
    class_path = hparams.get("_class_path")
    if class_path is not None and class_path not in DIGIT_CLASSIFIER_CLASS_PATHS:
        raise FeatureNetworkError(f"feature network {path} is a checkpoint of {class_path}, not of flowmatch.classifiers.DigitClassifier "
                                  "(train one: python -m flowmatch fit --config configs/classifier/digits.yaml)")
    accepted = set(inspect.signature(DigitClassifier.__init__).parameters) - {"self"}
    try:
        model = DigitClassifier(**{k: v for k, v in hparams.items() if k in accepted})
        state, _ = select_weights(ckpt, "auto", source=str(path))
        model.load_state_dict(state, strict=True)
    except (CheckpointError, RuntimeError, TypeError, ValueError) as err:
        raise FeatureNetworkError(f"feature network {path} is not a checkpoint of flowmatch.classifiers.DigitClassifier "
                                  f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return FeatureNetwork(model.to(map_location), source=str(path))


def load_feature_network(path: str, image_channels: int = 1, image_size: int = 32, map_location: str | torch.device = "cpu") -> FeatureNetwork:
    """The feature network stored at ``path``: a DigitClassifier checkpoint written by ``fit``
    (read with safe unpickling) or a TorchScript file mapping images to features.

    ``image_channels`` / ``image_size`` describe the images the TorchScript network will see: it is
    probed once with such a batch to learn its feature dimension (and whether 1-channel images must be
    repeated to 3 channels)."""
    p = Path(path)
    if not p.exists():
        raise FeatureNetworkError(f"feature network {path}: no such file (train the demo's with "
                                  "python -m flowmatch fit --config configs/classifier/digits.yaml, or give a TorchScript file)")
    if p.is_file() and _is_torchscript(p):
        return _load_torchscript(p, image_channels, image_size, map_location)
    return _load_classifier(p, map_location)


# --- training the demo's feature network on demand ----------------------------------------------------------
def ensure_feature_network(path: str, train_config: str | None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """``path`` itself if it exists; otherwise train the classifier of ``train_config`` with the
    platform's CLI (``python -m flowmatch fit --config train_config [overrides]`` in a fresh process,
    in this working directory, so the run is tracked like any other) and put its last checkpoint at
    ``path``. A file lock beside ``path`` makes concurrent callers train once; the others wait for it."""
    out = Path(path)
    if out.exists():
        return str(path)
    if train_config is None:
        raise FeatureNetworkError(f"feature network {path}: no such file, and no training config to make it "
                                  "(e.g. configs/classifier/digits.yaml)")
    train_config = _resolve_config(train_config)
    if not Path(train_config).is_file():
        raise FeatureNetworkError(f"feature network {path} is missing and its training config {train_config} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if out.exists():  # another process trained it while this one waited
                return str(path)
            _train_into(out, train_config, list(overrides))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(path)


def _resolve_config(path: str) -> str:
    """A config path as given, or relative to the repository when the working directory has no such file
    (so "configs/classifier/digits.yaml" works from any directory)."""
    if Path(path).is_file() or Path(path).is_absolute():
        return path
    import flowmatch

    in_repo = Path(flowmatch.__file__).resolve().parents[1] / path
    return str(in_repo) if in_repo.is_file() else path


def _train_into(out: Path, train_config: str, overrides: list[str]) -> None:
    import flowmatch

    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.train-", dir=out.parent))
    cmd = [sys.executable, "-m", "flowmatch", "fit", "--config", str(train_config), *overrides,
           "--checkpoint.dirpath", str(workdir), "--checkpoint.save_last", "true", "--trainer.enable_progress_bar", "false"]
    print(f"feature network {out} not found: training it with  {' '.join(cmd[1:])}", flush=True)
    package_root = str(Path(flowmatch.__file__).resolve().parents[1])  # the child runs this very flowmatch
    env = {**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        last = workdir / "last.ckpt"
        if proc.returncode != 0 or not last.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise FeatureNetworkError(f"training the feature network {out} failed (exit status {proc.returncode}): "
                                      f"{' '.join(cmd[1:])}\n{tail}")
        os.replace(last, out)  # same directory: the finished file appears at once, never half-written
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"feature network trained: {out}", flush=True)


# --- the distance -------------------------------------------------------------------------------------------
def frechet_metric(feature_net: FeatureNetwork, reset_real_features: bool = True):
    """torchmetrics' FrechetInceptionDistance on ``feature_net`` (update with float images in [-1, 1]).
    With ``reset_real_features=False`` the real images' statistics survive ``reset()`` (compute them once)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=feature_net, reset_real_features=reset_real_features, normalize=False)


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, feature_net: FeatureNetwork, batch_size: int = 256) -> float:
    """Fréchet distance between two sets of images (float (N, C, H, W) in [-1, 1]) in ``feature_net``'s feature space.

    Each set needs at least 2 images; the covariances are full rank only with more images than
    features (the distance is still defined, but noisier)."""
    for name, images in (("real", real), ("fake", fake)):
        if images.ndim != 4 or images.shape[0] < 2:
            raise FeatureNetworkError(f"frechet_distance: {name} images must be (N >= 2, C, H, W), got {tuple(images.shape)}")
    if real.shape[1:] != fake.shape[1:]:
        raise FeatureNetworkError(f"frechet_distance: real images {tuple(real.shape[1:])} and fake images {tuple(fake.shape[1:])} differ in shape")
    device = _device_of(feature_net)
    metric = frechet_metric(feature_net).to(device)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, images.shape[0], batch_size):
            metric.update(images[i : i + batch_size].to(device, torch.float32), real=is_real)
    return float(metric.compute())
