"""Training-time shifts (flowmatch.time_shift): SD3's constant shift, SD3's sqrt rule and FLUX's mu rule.

The papers' numbers of SD3's and FLUX's rules at 256^2, 512^2 and 1024^2 images, a KS test of shifted draws
against the closed-form CDF for every base density and rule, closed forms of FLUX's mu, the density of shifted draws, FlowLoss's draws with and without a shift (the
random stream unchanged), FLUX's sampling grid against diffusers' FluxPipeline + FlowMatchEulerDiscreteScheduler,
a training step of RectifiedFlow with the shift, and the shift set from a YAML config.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flowmatch.objectives import FlowLoss, RectifiedFlow
from flowmatch.parametrisation import VelocityPrediction
from flowmatch.paths.linear import RectifiedFlowPath
from flowmatch.sampling.time_grid import flux_mu, flux_time_shift, shift_time, time_grid
from flowmatch.time_samplers import CosMapTime, LogitNormalTime, ModeTime, UniformTime
from flowmatch.time_shift import ConstantShift, FluxShift, ResolutionShift, SD3ResolutionShift, TimeShift, sampling_shift

REPO = Path(__file__).resolve().parents[1]


def latent(side: int, channels: int = 16, batch: int = 2) -> torch.Size:
    return torch.Size((batch, channels, side, side))


# --- closed forms ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side, tokens, mu", [(32, 256, 0.5), (128, 4096, 1.15), (64, 1024, 0.5 + 0.65 * 768 / 3840)])
def test_resolution_shift_reads_fluxs_mu_from_the_latent_shape(side, tokens, mu):
    shift = ResolutionShift()
    assert shift.num_tokens(latent(side)) == tokens
    assert shift.mu(latent(side)) == pytest.approx(mu, abs=1e-12)
    assert shift.alpha(latent(side)) == pytest.approx(math.exp(mu), rel=1e-12)
    t = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(shift.apply(t, latent(side)), flux_time_shift(mu, t), rtol=1e-6, atol=1e-7)


def test_512_pixel_flux_latents_give_mu_063_and_alpha_18776():
    shift = ResolutionShift()
    assert shift.mu(latent(64)) == pytest.approx(0.63, abs=1e-12)
    assert shift.alpha(latent(64)) == pytest.approx(1.8776, abs=1e-4)


def test_tokens_of_non_square_latents_and_other_patch_sizes():
    assert ResolutionShift().num_tokens((1, 16, 32, 64)) == 16 * 32
    assert ResolutionShift(patch_size=1).num_tokens((1, 4, 16, 16)) == 256
    assert ResolutionShift(patch_size=1).alpha((1, 4, 16, 16)) == pytest.approx(math.exp(0.5))
    # the line is extrapolated beyond max_tokens, as FLUX's get_lin_function does
    assert ResolutionShift().mu(latent(256)) == pytest.approx(flux_mu(128 * 128))


def test_constant_shift_is_sd3s_shift_and_alpha_one_is_the_identity():
    t = torch.rand(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ConstantShift(1.0).apply(t), t)
    torch.testing.assert_close(ConstantShift(3.0).apply(t, latent(128)), shift_time(t, 3.0), rtol=0, atol=0)
    assert ConstantShift(3.0).alpha(None) == 3.0 == ConstantShift(3.0).alpha(latent(8))


@pytest.mark.parametrize("shift, shape", [(ConstantShift(3.0), None), (ResolutionShift(), latent(64))])
def test_apply_keeps_float32_fixes_the_ends_and_inverse_undoes_it(shift, shape):
    t = torch.linspace(0, 1, 101)
    out = shift.apply(t, shape)
    assert out.dtype == torch.float32
    assert out[0] == 0 and out[-1] == 1 and (out[1:-1] > t[1:-1]).all()  # alpha > 1 pushes towards noise
    torch.testing.assert_close(shift.inverse(out, shape), t, rtol=0, atol=1e-6)
    assert shift.apply(t.double(), shape).dtype == torch.float64


def test_bad_shapes_and_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(4, 2\)"):
        ResolutionShift().alpha((4, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*None"):
        ResolutionShift().alpha(None)
    with pytest.raises(ValueError, match=r"divisible by patch_size=2.*\(1, 16, 33, 32\)"):
        ResolutionShift().alpha((1, 16, 33, 32))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ConstantShift(0.0)
    with pytest.raises(ValueError, match="base_tokens < max_tokens"):
        ResolutionShift(base_tokens=4096, max_tokens=256)
    with pytest.raises(ValueError, match="patch_size"):
        ResolutionShift(patch_size=0)


def test_reprs_are_readable():
    assert repr(ConstantShift(3)) == "ConstantShift(alpha=3.0)"
    assert repr(ResolutionShift(max_shift=1.2)) == ("ResolutionShift(base_shift=0.5, max_shift=1.2, base_tokens=256, "
                                                   "max_tokens=4096, patch_size=2)")


# --- the density of shifted times --------------------------------------------------------------------------------
BASES = [UniformTime(), LogitNormalTime(0.0, 1.0), ModeTime(1.29), CosMapTime()]


@pytest.mark.parametrize("base", BASES, ids=lambda b: type(b).__name__)
@pytest.mark.parametrize("shift, shape", [(ConstantShift(3.0), None), (ResolutionShift(), latent(64)), (ConstantShift(0.5), None)],
                         ids=["const3", "flux512", "const0.5"])
def test_shifted_density_integrates_to_one_and_agrees_with_its_cdf(base, shift, shape):
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)[1:-1]
    pdf = shift.density(t, base, shape)
    assert torch.isfinite(pdf).all() and (pdf >= 0).all()
    # the cdf at the first and last grid points covers the ends, where some densities are integrable spikes
    ends = shift.cdf(t[:1], base, shape) + 1 - shift.cdf(t[-1:], base, shape)
    assert (torch.trapezoid(pdf, t) + ends).item() == pytest.approx(1.0, abs=2e-3)
    # d/dt of the shifted cdf is the shifted density
    mid = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-5
    numeric = (shift.cdf(mid + h, base, shape) - shift.cdf(mid - h, base, shape)) / (2 * h)
    torch.testing.assert_close(numeric, shift.density(mid, base, shape), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("base", [LogitNormalTime(0.0, 1.0), UniformTime()], ids=lambda b: type(b).__name__)
def test_shifted_density_matches_a_histogram_of_shifted_draws(base):
    shift, shape = ResolutionShift(), latent(128)  # 1024^2 images: alpha = e^1.15
    n = 200_000
    draws = shift.apply(base.sample(n, generator=torch.Generator().manual_seed(0)), shape).double()
    edges = torch.linspace(0, 1, 21, dtype=torch.float64)
    observed = torch.histc(draws, bins=20, min=0, max=1) / n
    fine = torch.linspace(0, 1, 20 * 400 + 1, dtype=torch.float64)[1:-1]
    pdf = shift.density(fine, base, shape)
    expected = torch.stack([torch.trapezoid(pdf[(fine >= lo) & (fine <= hi)], fine[(fine >= lo) & (fine <= hi)])
                            for lo, hi in zip(edges[:-1], edges[1:])])
    assert (observed - expected).abs().max().item() < 3e-3  # ~6 standard errors of a 5% bin with 200k draws
    # and the unshifted density would not fit: the shift moved mass to the noise end
    unshifted = base.cdf(edges[1:]) - base.cdf(edges[:-1])
    assert (observed - unshifted).abs().max().item() > 0.02


# --- SD3's and FLUX's rules: the papers' numbers -----------------------------------------------------------------
def image_latent(pixels: int, downsample: int = 8, channels: int = 16) -> torch.Size:
    """The latent batch shape of a square image of side ``pixels`` (SD3 / FLUX VAEs: 8x down, 16 channels)."""
    return latent(pixels // downsample, channels=channels)


@pytest.mark.parametrize("pixels, paper, sd3_variant", [(256, 1.0, 0.75), (512, 2.0, 1.5), (1024, 4.0, 3.0)])
def test_sd3_rule_gives_the_papers_alpha_at_256_512_1024(pixels, paper, sd3_variant):
    """alpha = sqrt(m / n) tuned at 256^2 (SD3 §5.3.2), and SD3's own choice of 3.0 at 1024^2 as the base."""
    assert SD3ResolutionShift().alpha(image_latent(pixels)) == pytest.approx(paper, rel=1e-12)
    chosen = SD3ResolutionShift(base_pixels=1024 * 1024, base_alpha=3.0)
    assert chosen.alpha(image_latent(pixels)) == pytest.approx(sd3_variant, rel=1e-12)
    # the demo autoencoder (space_to_depth:4) downsamples 4x: the same image, a latent twice as large per side
    assert SD3ResolutionShift(downsample=4).alpha(image_latent(pixels, downsample=4)) == pytest.approx(paper, rel=1e-12)
    assert sampling_shift(SD3ResolutionShift(), image_latent(pixels)[1:]) == pytest.approx(paper, rel=1e-12)  # (C, H, W)


@pytest.mark.parametrize("pixels, tokens, mu, alpha", [(256, 256, 0.5, math.exp(0.5)), (512, 1024, 0.63, 1.8776),
                                                       (1024, 4096, 1.15, 3.1582)])
def test_flux_rule_gives_the_papers_mu_at_256_512_1024(pixels, tokens, mu, alpha):
    """FLUX.1: VAE 8x down, 2x2 packing; mu from 0.5 at 256 tokens to 1.15 at 4096."""
    shape = image_latent(pixels)
    assert FluxShift().num_tokens(shape) == tokens
    assert FluxShift().mu(shape) == pytest.approx(mu, abs=1e-12)
    assert FluxShift().alpha(shape) == pytest.approx(alpha, abs=1e-4)
    assert ResolutionShift().alpha(shape) == FluxShift().alpha(shape) == sampling_shift(FluxShift(), shape)


def test_sd3_rule_on_non_square_latents_and_sampling_shift_without_a_rule():
    assert SD3ResolutionShift(downsample=4).pixels((2, 16, 8, 16)) == 32 * 64
    assert SD3ResolutionShift(downsample=4).alpha((2, 16, 8, 16)) == pytest.approx(math.sqrt(32 * 64 / 65536))
    assert sampling_shift(None, (16, 64, 64)) == 1.0 == sampling_shift(None, None)
    assert sampling_shift(ConstantShift(3.0), (16, 8, 8)) == 3.0


def test_sd3_rule_refuses_bad_arguments_and_shapes_by_name():
    with pytest.raises(ValueError, match="base_pixels must be > 0"):
        SD3ResolutionShift(base_pixels=0)
    with pytest.raises(ValueError, match="base_alpha must be > 0"):
        SD3ResolutionShift(base_alpha=-1.0)
    with pytest.raises(ValueError, match="downsample must be an integer >= 1"):
        SD3ResolutionShift(downsample=0)
    with pytest.raises(ValueError, match="downsample must be an integer >= 1"):
        SD3ResolutionShift(downsample=2.5)
    with pytest.raises(ValueError, match=r"SD3ResolutionShift reads .*\(B, C, H, W\).*\(4, 2\)"):
        SD3ResolutionShift().alpha((4, 2))
    with pytest.raises(ValueError, match=r"FluxShift reads .*None"):
        sampling_shift(FluxShift(), None)


def test_flux_shift_and_its_former_name_are_the_same_rule():
    assert isinstance(ResolutionShift(), FluxShift)
    assert repr(FluxShift()) == repr(ResolutionShift()).replace("ResolutionShift", "FluxShift")
    assert repr(SD3ResolutionShift(base_pixels=1024 * 1024, base_alpha=3)) == (
        "SD3ResolutionShift(base_pixels=1048576, base_alpha=3.0, downsample=8)")


# --- KS test: shifted draws follow TimeShift.cdf ---------------------------------------------------------------
RULES = [(ConstantShift(3.0), None), (SD3ResolutionShift(), image_latent(512)), (FluxShift(), image_latent(1024))]


@pytest.mark.parametrize("base", BASES, ids=lambda b: type(b).__name__)
@pytest.mark.parametrize("shift, shape", RULES, ids=["const3", "sd3_512", "flux_1024"])
def test_shifted_draws_pass_a_ks_test_against_the_closed_form_cdf(base, shift, shape):
    """FlowLoss.draw_times (sampler draws, then the shift) against TimeShift.cdf; the unshifted cdf is rejected."""
    from scipy.stats import kstest

    n = 20_000
    torch.manual_seed(11)
    draws = FlowLoss(RectifiedFlowPath(), VelocityPrediction(), base, time_shift=shift).draw_times(n, sample_shape=shape)
    draws = draws.double().numpy()
    shifted = kstest(draws, lambda x: shift.cdf(torch.as_tensor(x, dtype=torch.float64), base, shape).numpy())
    assert shifted.pvalue > 1e-3 and shifted.statistic < 1.36 / math.sqrt(n)
    unshifted = kstest(draws, lambda x: base.cdf(torch.as_tensor(x, dtype=torch.float64)).numpy())
    assert unshifted.statistic > 5 * 1.36 / math.sqrt(n)  # the test can tell: alpha 2 to 3.2 moves a lot of mass


# --- FlowLoss draws ---------------------------------------------------------------------------------------------
def _loss(**kw) -> FlowLoss:
    return FlowLoss(RectifiedFlowPath(), VelocityPrediction(), LogitNormalTime(0.0, 1.0), **kw)


class Recorder(torch.nn.Module):
    """A 1x1 convolution that remembers the times it was called with."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        self.seen: list[torch.Tensor] = []

    def forward(self, z, t, cond=None):
        self.seen.append(t.detach().clone())
        return self.conv(z) * t[:, None, None, None]


def test_without_a_shift_the_draws_are_exactly_as_before():
    x0 = torch.randn(6, 4, 8, 8)
    results = []
    for loss in (_loss(), _loss(time_shift=None)):
        torch.manual_seed(7)
        net = Recorder()
        torch.manual_seed(7)
        per_sample = loss.training_loss(net, x0)
        results.append((net.seen[0], per_sample.detach(), torch.randn(3)))
    (t_a, l_a, next_a), (t_b, l_b, next_b) = results
    assert torch.equal(t_a, t_b) and torch.equal(l_a, l_b) and torch.equal(next_a, next_b)
    torch.manual_seed(7)
    assert torch.equal(t_a, LogitNormalTime(0.0, 1.0).sample(6))  # the sampler's own draws, unshifted
    assert repr(_loss(time_shift=None)) == repr(_loss())  # no shift: the repr of before


@pytest.mark.parametrize("shift", [ConstantShift(3.0), ResolutionShift()], ids=repr)
def test_with_a_shift_the_same_draws_are_shifted_and_the_stream_is_unchanged(shift):
    shape = latent(64, channels=4, batch=5)
    torch.manual_seed(3)
    base = LogitNormalTime(0.0, 1.0).sample(5)
    after = torch.randn(2)
    torch.manual_seed(3)
    t = _loss(time_shift=shift).draw_times(5, sample_shape=shape)
    assert torch.equal(torch.randn(2), after)
    assert t.dtype == torch.float32
    assert torch.equal(t, shift_time(base, shift.alpha(shape)))
    # training_loss hands the batch's own shape to the shift, then draws the noise as before
    x0 = torch.randn(shape)
    net = Recorder()
    torch.manual_seed(3)
    loss = _loss(time_shift=shift).training_loss(net, x0)
    assert torch.equal(net.seen[0], t) and torch.isfinite(loss).all()


def test_a_resolution_shift_without_the_batch_shape_says_what_it_needs():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        _loss(time_shift=ResolutionShift()).draw_times(4)
    x0 = torch.randn(4, 2)  # 2-D toy data has no resolution
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        _loss(time_shift=ResolutionShift()).training_loss(Recorder(), x0)


def test_shifted_draws_stay_strictly_inside_zero_one():
    t = _loss(time_shift=ConstantShift(1e4)).draw_times(10_000)
    assert t.max() < 1 and t.min() > 0


# --- FLUX's sampling grid equals diffusers' ----------------------------------------------------------------------
@pytest.mark.parametrize("steps", [28, 50])
@pytest.mark.parametrize("image", [512, 1024])
def test_fluxs_sigma_grid_equals_diffusers_flux_pipeline(image, steps):
    """FluxPipeline.__call__: sigmas = linspace(1, 1/N, N), mu = calculate_shift(packed sequence length),
    retrieve_timesteps(scheduler, N, sigmas=sigmas, mu=mu); the scheduler shifts them and appends 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps

    # FLUX.1-dev's scheduler config
    config = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
                  shift=3.0, use_dynamic_shifting=True)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    side = image // 8  # FLUX's VAE downsamples 8x
    latents = torch.zeros(1, 16, side, side)
    seq_len = FluxPipeline._pack_latents(latents, 1, 16, side, side).shape[1]
    mu = calculate_shift(seq_len, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"], config["max_shift"])
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    theirs = scheduler.sigmas.double()

    shift = ResolutionShift()
    assert shift.num_tokens(latents.shape) == seq_len and shift.mu(latents.shape) == pytest.approx(mu, abs=1e-12)
    ours = time_grid(steps, shift=shift.alpha(latents.shape), kind="plain")
    assert ours.shape == theirs.shape and ours[-1] == 0 == theirs[-1]
    assert (ours - theirs).abs().max().item() < 1e-6  # diffusers works in float32
    sd3 = time_grid(steps, shift=shift.alpha(latents.shape), kind="sd3")
    assert (sd3 - theirs).abs().max().item() > 1e-2  # SD3's grid (low end shifted twice) is another one

    # the training shift is the scheduler's own time shift at the same mu
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(shift.apply(t, latents.shape), scheduler.time_shift(mu, 1.0, t), rtol=1e-12, atol=1e-12)


# --- end to end: a training step of RectifiedFlow with the shift -------------------------------------------------
def test_rectified_flow_trains_a_step_with_fluxs_shift():
    from flowmatch.networks.dit import DiT

    torch.manual_seed(0)
    net = DiT(size=None, patch_size=2, depth=1, hidden_size=32, num_heads=2, in_channels=4, input_size=16)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    model = RectifiedFlow(net, time_sampler=LogitNormalTime(0.0, 1.0), time_shift=ResolutionShift(), lr=1e-3)
    assert isinstance(model.objective.time_shift, ResolutionShift)
    x0 = torch.randn(3, 4, 16, 16)  # 64 tokens: mu below base_shift, alpha = e^(0.5 - 0.65 * 192 / 3840)
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    torch.manual_seed(4)
    loss = model.training_step({"x0": x0}, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    optimizer.step()

    torch.manual_seed(4)
    base = LogitNormalTime(0.0, 1.0).sample(3)
    alpha = math.exp(0.5 - 0.65 * 192 / 3840)
    torch.testing.assert_close(seen[0], shift_time(base, alpha), rtol=0, atol=0)
    torch.manual_seed(4)
    torch.testing.assert_close(model.objective.draw_times(3, sample_shape=x0.shape), seen[0], rtol=0, atol=0)


def test_eps_ddpm_takes_a_shift_too():
    from flowmatch.objectives import EpsDDPM

    model = EpsDDPM(Recorder(), time_shift=ConstantShift(3.0))
    torch.manual_seed(1)
    base = UniformTime().sample(4)
    torch.manual_seed(1)
    assert torch.equal(model.objective.draw_times(4), shift_time(base, 3.0))


# --- set from a YAML config --------------------------------------------------------------------------------------
SNIPPET = """
model:
  init_args:
    time_shift:
      class_path: flowmatch.time_shift.ResolutionShift
      init_args: {max_shift: 1.15}
"""


RESOLVED = {
    "ResolutionShift": {"base_shift": 0.5, "max_shift": 1.15, "base_tokens": 256, "max_tokens": 4096, "patch_size": 2},
    "FluxShift": {"base_shift": 0.5, "max_shift": 1.15, "base_tokens": 256, "max_tokens": 4096, "patch_size": 2},
    "SD3ResolutionShift": {"base_pixels": 1048576, "base_alpha": 3.0, "downsample": 4},
}


@pytest.mark.parametrize("name, init_args", [("ResolutionShift", "{max_shift: 1.15}"), ("FluxShift", "{}"),
                                             ("SD3ResolutionShift", "{base_pixels: 1048576, base_alpha: 3.0, downsample: 4}")])
def test_the_cli_resolves_a_time_shift_from_yaml(tmp_path, monkeypatch, name, init_args):
    from flowmatch.cli.lightning_cli import FlowCLI

    (tmp_path / "shift.yaml").write_text(SNIPPET.replace("ResolutionShift", name).replace("{max_shift: 1.15}", init_args))
    monkeypatch.chdir(REPO)  # the experiment's relative paths are written for the repository root
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            FlowCLI(args=["fit", "--config", "experiments/mmdit_d16.yaml", "--config", str(tmp_path / "shift.yaml"), "--print_config"])
        except SystemExit as stop:
            code = stop.code
    assert code in (0, None), err.getvalue()[-3000:]
    text = out.getvalue()
    resolved = yaml.safe_load(text[text.index("# lightning.pytorch"):])
    assert resolved["model"]["init_args"]["time_shift"] == {"class_path": f"flowmatch.time_shift.{name}", "init_args": RESOLVED[name]}
    assert resolved["model"]["init_args"]["time_sampler"]["class_path"] == "flowmatch.time_samplers.LogitNormalTime"


def test_a_saved_config_rebuilds_the_shift_and_a_non_shift_is_refused():
    """How a checkpoint's model config is instantiated (flowmatch.objectives.loading.build_objective)."""
    from flowmatch.objectives.loading import build_objective

    hparams = {"_class_path": "flowmatch.objectives.RectifiedFlow",
               "network": {"class_path": "flowmatch.networks.mlp.MLPVelocity", "init_args": {"hidden": 8, "depth": 1, "time_dim": 4}},
               "time_shift": yaml.safe_load(SNIPPET)["model"]["init_args"]["time_shift"]}
    model = build_objective(dict(hparams, time_shift={"class_path": "flowmatch.time_shift.ResolutionShift",
                                                      "init_args": {"max_shift": 1.3}}))
    assert isinstance(model.time_shift, ResolutionShift) and model.time_shift.max_shift == 1.3
    assert isinstance(model.time_shift, TimeShift) and model.objective.time_shift is model.time_shift
    with pytest.raises(Exception, match="time_shift"):
        build_objective(dict(hparams, time_shift={"class_path": "flowmatch.time_samplers.UniformTime"}))
