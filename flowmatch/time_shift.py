"""Shifts of the training times towards the noise end, kept apart from the time sampler's density.

A time sampler says how t is drawn (uniform, logit-normal, ...); a shift then maps each draw through
s(t) = alpha t / (1 + (alpha - 1) t) (SD3 §5.3.2, docs/spec.md §4), which pushes times towards t = 1
(noise): at a higher resolution more pixels keep more signal at the same noise level, so the same
density must sit at noisier times. Time convention: t = 0 data, t = 1 noise.

* :class:`ConstantShift` - a fixed alpha (SD3 trains and samples 1024^2 with alpha = 3);
* :class:`SD3ResolutionShift` - SD3's rule alpha = base_alpha sqrt(m / n) for m pixels against a
  schedule tuned at n, read from each batch's latent shape;
* :class:`FluxShift` (formerly :class:`ResolutionShift`, a name old configs still use) - FLUX's
  alpha = e^mu, mu linear in the latent token count, read from each batch's shape (as FLUX's
  reference code does for sampling, and kohya-ss/sd-scripts' ``--timestep_sampling flux_shift`` for training).

Training and sampling share the rule: :func:`sampling_shift` is the alpha of the sampling time grid
for a latent shape, so a model sampled at another size uses the shift its training rule gives there.

The shifted times have density pi'(t') = pi(s^-1(t')) / s'(s^-1(t')) where pi is the sampler's
density (``TimeShift.density``), for weightings that read the density of the training times.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from flowmatch.sampling.time_grid import flux_mu, shift_time
from flowmatch.time_samplers import TimeSampler

Shape = Sequence[int] | torch.Size | None


class TimeShift:
    """Base class: ``alpha(sample_shape)`` is the shift for a batch of that shape; ``apply`` shifts times."""

    def alpha(self, sample_shape: Shape = None) -> float:
        raise NotImplementedError

    def apply(self, t: torch.Tensor, sample_shape: Shape = None) -> torch.Tensor:
        """s(t) = alpha t / (1 + (alpha - 1) t), in t's dtype (float32 stays float32); fixes 0 and 1."""
        return shift_time(t, self.alpha(sample_shape))

    def inverse(self, t: torch.Tensor, sample_shape: Shape = None) -> torch.Tensor:
        """s^-1(t') = t' / (alpha - (alpha - 1) t'): the base time that ``apply`` maps to t'."""
        a = self.alpha(sample_shape)
        return t / (a - (a - 1) * t)

    def cdf(self, t: torch.Tensor, base: TimeSampler, sample_shape: Shape = None) -> torch.Tensor:
        """CDF of the shifted times: F(s^-1(t')) with F the base sampler's CDF (s is increasing)."""
        return base.cdf(self.inverse(t, sample_shape))

    def density(self, t: torch.Tensor, base: TimeSampler, sample_shape: Shape = None) -> torch.Tensor:
        """Density of the shifted times, pi'(t') = pi(u) / s'(u) with u = s^-1(t') (change of variables).

        s'(u) = alpha / (1 + (alpha - 1) u)^2 = (alpha - (alpha - 1) t')^2 / alpha, hence
        pi'(t') = pi(u) alpha / (alpha - (alpha - 1) t')^2. ``base`` is the time sampler whose draws are shifted.
        """
        a = self.alpha(sample_shape)
        return base.density(self.inverse(t, sample_shape)) * a / (a - (a - 1) * t) ** 2


class ConstantShift(TimeShift):
    """The same shift alpha for every batch (alpha = 1: no shift). SD3 uses alpha = 3 at 1024^2."""

    def __init__(self, alpha: float = 3.0):
        if not alpha > 0:
            raise ValueError(f"ConstantShift alpha must be > 0, got {alpha!r}")
        self._alpha = float(alpha)

    def alpha(self, sample_shape: Shape = None) -> float:
        return self._alpha

    def __repr__(self) -> str:
        return f"ConstantShift(alpha={self._alpha!r})"


def latent_batch_hw(sample_shape: Shape, rule: str) -> tuple[int, int]:
    """(H, W) of a latent batch shape (B, C, H, W); a clear error naming ``rule`` for anything else."""
    if sample_shape is None or len(sample_shape) != 4:
        raise ValueError(f"{rule} reads the resolution from a latent batch shaped (B, C, H, W); got shape "
                         f"{None if sample_shape is None else tuple(sample_shape)}")
    return int(sample_shape[2]), int(sample_shape[3])


class SD3ResolutionShift(TimeShift):
    """SD3's resolution shift (§5.3.2): alpha = base_alpha * sqrt(pixels / base_pixels).

    A schedule tuned at ``base_pixels`` (with shift ``base_alpha`` there) is used at ``pixels`` =
    H * W * downsample^2 image pixels, H x W the latent size and ``downsample`` the autoencoder's factor
    (SD3's VAE: 8; the demo's space_to_depth:4: 4). The paper's formula (defaults, tuned at 256^2 with no
    shift) gives alpha 1, 2, 4 at 256^2, 512^2, 1024^2; SD3's chosen 3.0 at 1024^2 is
    ``SD3ResolutionShift(base_pixels=1024 * 1024, base_alpha=3.0)`` (0.75 at 256^2, 1.5 at 512^2).
    """

    def __init__(self, base_pixels: int = 256 * 256, base_alpha: float = 1.0, downsample: int = 8):
        if not base_pixels > 0:
            raise ValueError(f"SD3ResolutionShift base_pixels must be > 0, got {base_pixels!r}")
        if not base_alpha > 0:
            raise ValueError(f"SD3ResolutionShift base_alpha must be > 0, got {base_alpha!r}")
        if not (isinstance(downsample, int) and not isinstance(downsample, bool) and downsample >= 1):
            raise ValueError(f"SD3ResolutionShift downsample must be an integer >= 1 (the autoencoder's factor), got {downsample!r}")
        self.base_pixels, self.base_alpha, self.downsample = int(base_pixels), float(base_alpha), downsample

    def pixels(self, sample_shape: Shape) -> int:
        """Image pixels of a latent batch shaped (B, C, H, W): H * W * downsample^2."""
        h, w = latent_batch_hw(sample_shape, type(self).__name__)
        return h * w * self.downsample**2

    def alpha(self, sample_shape: Shape = None) -> float:
        return self.base_alpha * math.sqrt(self.pixels(sample_shape) / self.base_pixels)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_pixels={self.base_pixels!r}, base_alpha={self.base_alpha!r}, "
                f"downsample={self.downsample!r})")


class FluxShift(TimeShift):
    """FLUX's resolution-dependent shift: alpha = e^mu, mu = flux_mu(tokens) linear in the token count.

    mu goes from ``base_shift`` at ``base_tokens`` to ``max_shift`` at ``max_tokens`` (extrapolated
    linearly outside). Tokens are counted from the latent batch shape (B, C, H, W) as FLUX packs
    latents: (H / patch_size) * (W / patch_size), patch_size 2. FLUX.1 (VAE 8x down): a 512^2 image is
    a 64x64 latent, 1024 tokens, mu = 0.63, alpha ~ 1.88; 1024^2 gives 4096 tokens, alpha = e^1.15 ~ 3.16.
    """

    def __init__(self, base_shift: float = 0.5, max_shift: float = 1.15, base_tokens: int = 256, max_tokens: int = 4096,
                 patch_size: int = 2):
        if not max_tokens > base_tokens > 0:
            raise ValueError(f"{type(self).__name__} needs 0 < base_tokens < max_tokens, got base_tokens={base_tokens!r}, "
                             f"max_tokens={max_tokens!r}")
        if not (isinstance(patch_size, int) and patch_size >= 1):
            raise ValueError(f"{type(self).__name__} patch_size must be an integer >= 1, got {patch_size!r}")
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.base_tokens, self.max_tokens = int(base_tokens), int(max_tokens)
        self.patch_size = patch_size

    def num_tokens(self, sample_shape: Shape) -> int:
        """(H / patch_size) * (W / patch_size) of a latent batch shaped (B, C, H, W)."""
        h, w = latent_batch_hw(sample_shape, type(self).__name__)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"{type(self).__name__}: latent height and width must be divisible by patch_size={self.patch_size}; "
                             f"got shape {tuple(sample_shape)} (H={h}, W={w})")
        return (h // self.patch_size) * (w // self.patch_size)

    def mu(self, sample_shape: Shape) -> float:
        return flux_mu(self.num_tokens(sample_shape), self.base_tokens, self.max_tokens, self.base_shift, self.max_shift)

    def alpha(self, sample_shape: Shape = None) -> float:
        return math.exp(self.mu(sample_shape))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_shift={self.base_shift!r}, max_shift={self.max_shift!r}, base_tokens={self.base_tokens!r}, "
                f"max_tokens={self.max_tokens!r}, patch_size={self.patch_size!r})")


class ResolutionShift(FluxShift):
    """:class:`FluxShift` under its former name, so that configs and checkpoints naming it keep loading."""


def sampling_shift(time_shift: TimeShift | None, latent_shape: Shape) -> float:
    """alpha of the sampling time grid for latents of ``latent_shape``: the training rule evaluated there.

    ``latent_shape`` is a batch shape (B, C, H, W) or one sample's (C, H, W); no training shift gives 1.0
    (no shift). A rule that reads the resolution needs an image-like shape (its error says so).
    """
    if time_shift is None:
        return 1.0
    shape = tuple(latent_shape) if latent_shape is not None else None
    if shape is not None and len(shape) == 3:
        shape = (1, *shape)
    return float(time_shift.alpha(shape))
