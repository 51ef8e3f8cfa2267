"""Objectives (RF, FM, eps-DDPM, v/cos) with tiny in-test networks: losses, velocities, generation,
the non-finite-loss guard and SD3's validation levels (docs/spec.md §2, §8).

Targets are written in closed form here: RF eps - x0; FM (1 - sigma_min) eps - x0; eps-DDPM eps;
v/cos cos(pi t/2) eps - sin(pi t/2) x0.
"""

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from flowmatch.objectives import EpsDDPM, FlowMatching, NonFiniteLossError, RectifiedFlow, VPDiffusion
from flowmatch.sampling import SamplerConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def ldm_alphabar(t: torch.Tensor) -> torch.Tensor:
    """LDM alphabar at grid times t = (i + 1) / 1000, computed independently with numpy."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    ab = torch.from_numpy(np.cumprod(1 - betas))
    return ab[(t.double() * 1000).round().long() - 1]


class AffineNet(nn.Module):
    """out = w * z + c * t: a network whose output is known in closed form."""

    def __init__(self, w=0.5, c=-1.0):
        super().__init__()
        self.w, self.c = nn.Parameter(torch.tensor(w)), nn.Parameter(torch.tensor(c))

    def forward(self, z, t, cond=None):
        return self.w * z + self.c * t.reshape(-1, *([1] * (z.dim() - 1)))


class OracleNet(nn.Module):
    """Returns a fixed tensor (the exact target, computed in the test from captured x0 and eps)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.value = None

    def forward(self, z, t, cond=None):
        return self.value + 0 * self.dummy


class ConstNet(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = nn.Parameter(torch.as_tensor(value, dtype=torch.float32))

    def forward(self, z, t, cond=None):
        return self.value.expand_as(z)


class NaNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, z, t, cond=None):
        return self.lin(z) * float("nan")


SIGMA_MIN = 1e-4


def cases():
    """(name, constructor, closed-form target(x0, eps, t)) for the four objectives."""
    col = lambda t: t[:, None]  # noqa: E731
    return [
        ("rf", lambda net, **kw: RectifiedFlow(net, **kw), lambda x0, eps, t: eps - x0),
        ("fm", lambda net, **kw: FlowMatching(net, sigma_min=SIGMA_MIN, **kw), lambda x0, eps, t: (1 - SIGMA_MIN) * eps - x0),
        ("eps_linear", lambda net, **kw: EpsDDPM(net, schedule="linear", **kw), lambda x0, eps, t: eps),
        (
            "v_cos",
            lambda net, **kw: VPDiffusion(net, schedule="cosine", prediction="v", **kw),
            lambda x0, eps, t: torch.cos(math.pi * col(t) / 2) * eps - torch.sin(math.pi * col(t) / 2) * x0,
        ),
    ]


CASES = {name: (make, target) for name, make, target in cases()}


def z_closed_form(name, x0, eps, t):
    """z_t = a_t x0 + b_t eps with each objective's a, b written out."""
    col = t[:, None].double()
    x0, eps = x0.double(), eps.double()
    if name == "rf":
        a, b = 1 - col, col
    elif name == "fm":
        a, b = 1 - col, SIGMA_MIN + (1 - SIGMA_MIN) * col
    elif name == "eps_linear":
        ab = ldm_alphabar(t)[:, None]
        a, b = ab.sqrt(), (1 - ab).sqrt()
    else:
        a, b = torch.cos(math.pi * col / 2), torch.sin(math.pi * col / 2)
    return (a * x0 + b * eps).float()


def batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    t = torch.tensor([1, 100, 250, 500, 750, 990][:n], dtype=torch.float32) / 1000  # LDM grid points
    return x0, eps, t


# --- losses ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_native_loss_is_plain_mse_of_the_prediction(name):
    # loss_i = mean_j (net(z_t, t)_ij - target_ij)^2 with net = 0.5 z - t and z_t in closed form
    make, target = CASES[name]
    model = make(AffineNet())
    x0, eps, t = batch()
    z = z_closed_form(name, x0, eps, t)
    out = 0.5 * z - t[:, None]
    expected = (out - target(x0, eps, t)).pow(2).mean(1)
    torch.testing.assert_close(model.loss_per_sample(x0, t, eps), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_oracle_network_has_zero_loss(name):
    make, target = CASES[name]
    net = OracleNet()
    model = make(net)
    x0, eps, t = batch(1)
    net.value = target(x0, eps, t)
    loss = model.loss_per_sample(x0, t, eps)
    assert loss.shape == (6,)
    torch.testing.assert_close(loss, torch.zeros(6), rtol=0, atol=1e-10)
    # ... under every weighting too
    for w in ("eps", "velocity", "rf", "v"):
        torch.testing.assert_close(make(net, weighting=w).loss_per_sample(x0, t, eps), torch.zeros(6), rtol=0, atol=1e-8)


def test_weighted_losses_by_hand():
    x0, eps, t = batch(2)
    col = t[:, None]
    # RF velocity model, plain eps-MSE weighting: multiplier (1 - t)^2 (c_velocity = 1/(1-t)^2)
    rf = RectifiedFlow(AffineNet(), weighting="eps")
    z = (1 - col) * x0 + col * eps
    mse = (0.5 * z - col - (eps - x0)).pow(2).mean(1)
    torch.testing.assert_close(rf.loss_per_sample(x0, t, eps), mse * (1 - t) ** 2, rtol=1e-5, atol=1e-7)
    # eps model on the cosine path, weighting "rf" (w = tan(pi t/2), lambda' = -2 pi / sin(pi t)):
    # multiplier -1/2 w lambda' = pi / (2 cos^2(pi t / 2))
    ddpm = EpsDDPM(AffineNet(), schedule="cosine", weighting="rf")
    z = torch.cos(math.pi * col / 2) * x0 + torch.sin(math.pi * col / 2) * eps
    mse = (0.5 * z - col - eps).pow(2).mean(1)
    torch.testing.assert_close(ddpm.loss_per_sample(x0, t, eps), mse * math.pi / (2 * torch.cos(math.pi * t / 2) ** 2), rtol=1e-4, atol=1e-7)


# --- velocities -----------------------------------------------------------------------------
def test_eps_model_fed_exact_eps_gives_true_velocity_cosine():
    # velocity() of an eps-model with eps_hat = eps equals dz/dt = a' x0 + b' eps;
    # cosine: a' = -pi/2 sin(pi t/2), b' = pi/2 cos(pi t/2)
    x0, eps, t = batch(3)
    net = OracleNet()
    net.value = eps
    model = EpsDDPM(net, schedule="cosine")
    col = t[:, None]
    z = torch.cos(math.pi * col / 2) * x0 + torch.sin(math.pi * col / 2) * eps
    dz = math.pi / 2 * (-torch.sin(math.pi * col / 2) * x0 + torch.cos(math.pi * col / 2) * eps)
    torch.testing.assert_close(model.velocity(z, t), dz, rtol=1e-4, atol=1e-4)


def test_eps_model_fed_exact_eps_gives_true_velocity_linear():
    # LDM schedule: dz/dt by central finite differences of z_t = sqrt(ab) x0 + sqrt(1 - ab) eps
    # (the schedule between DDPM steps is the path's choice; exactness at the steps is tested in test_paths)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    t = (torch.tensor([20, 100, 250, 400, 500, 750, 900, 980]) + 0.5) / 1000
    net = OracleNet()
    net.value = eps
    model = EpsDDPM(net, schedule="linear")
    h = 1e-6
    z_of = lambda tt: model.path.sample(x0.double(), eps.double(), tt.double()).z  # noqa: E731
    dz = (z_of(t.double() + h) - z_of(t.double() - h)) / (2 * h)
    v = model.velocity(z_of(t.double()).float(), t)
    torch.testing.assert_close(v.double(), dz, rtol=1e-3, atol=1e-3)


def test_v_and_rf_oracles_give_true_velocity():
    x0, eps, t = batch(4)
    t = t[1:-1]
    x0, eps = x0[1:-1], eps[1:-1]
    col = t[:, None]
    net = OracleNet()
    net.value = torch.cos(math.pi * col / 2) * eps - torch.sin(math.pi * col / 2) * x0  # v = a eps - b x0
    model = VPDiffusion(net, schedule="cosine", prediction="v")
    z = torch.cos(math.pi * col / 2) * x0 + torch.sin(math.pi * col / 2) * eps
    dz = math.pi / 2 * (-torch.sin(math.pi * col / 2) * x0 + torch.cos(math.pi * col / 2) * eps)
    torch.testing.assert_close(model.velocity(z, t), dz, rtol=1e-4, atol=1e-5)
    net.value = eps - x0
    rf = RectifiedFlow(net)
    torch.testing.assert_close(rf.velocity((1 - col) * x0 + col * eps, t), eps - x0)


# --- generation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 7])
def test_generate_constant_velocity_euler(steps):
    # dz/dt = c integrated from t = 1 to 0 gives z_0 = noise - c exactly, for any Euler grid
    c = torch.tensor([0.5, -2.0])
    model = RectifiedFlow(ConstNet(c), sample_shape=[2])
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    x, nfe = model.generate(5, SamplerConfig(solver="euler", steps=steps), noise=noise)
    assert nfe == steps and x.shape == (5, 2)
    torch.testing.assert_close(x, noise - c, rtol=1e-6, atol=1e-6)
    # without explicit noise: seeded N(0, I) of shape (num, *sample_shape), reproducible
    x1, nfe1 = model.generate(3, SamplerConfig(steps=steps), seed=11)
    x2, _ = model.generate(3, SamplerConfig(steps=steps), seed=11)
    assert x1.shape == (3, 2) and nfe1 == steps and torch.equal(x1, x2)
    assert model.net.training  # restored after generation


def test_generate_shapes_for_each_objective():
    for name, (make, _) in CASES.items():
        model = make(AffineNet(w=0.0, c=0.0), sample_shape=[3, 4])
        x, nfe = model.generate(2, SamplerConfig(solver="euler", steps=4))
        # a path with t_min > 0 (singular velocity at t = 0) ends with one extra x0-prediction call
        extra = 1 if getattr(model.path, "t_min", 0.0) > 0 else 0
        assert x.shape == (2, 3, 4) and nfe == 4 + extra, name
        assert torch.isfinite(x).all(), name
    with pytest.raises(RuntimeError):
        RectifiedFlow(AffineNet()).generate(2)  # sample shape unknown


# --- non-finite loss guard -------------------------------------------------------------------------
def test_nan_output_raises_with_a_trainer_attached():
    model = RectifiedFlow(NaNNet())
    model.trainer = SimpleNamespace(world_size=1, global_step=0)  # minimal stand-in for stop_if_not_finite
    with pytest.raises(NonFiniteLossError, match="nan"):
        model.training_step({"x0": torch.randn(4, 2)}, 0)


def test_nan_output_raises_without_a_trainer():
    model = RectifiedFlow(NaNNet())
    with pytest.raises(NonFiniteLossError):
        model.training_step({"x0": torch.randn(4, 2)}, 0)


def test_nan_output_stops_a_real_fit_before_any_update(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = RectifiedFlow(NaNNet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = DataLoader([{"x0": torch.randn(2)} for _ in range(8)], batch_size=4)
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        max_steps=2, logger=logger, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
    )
    with pytest.raises(NonFiniteLossError):
        trainer.fit(model, data)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights untouched
    logger.save()  # the run's record says when it diverged (studies count such runs as results)
    text = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "train/diverged_at_step" in text.splitlines()[0] and "0.0" in text.splitlines()[1]


# --- SD3 validation levels ---------------------------------------------------------------------------
class KnownLevelLossNet(nn.Module):
    """RF network with loss exactly t^2 at every t: recovers eps = (z - (1-t) x0) / t from the captured
    x0 (one fixed validation batch) and outputs the target eps - x0 shifted by t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z, t, cond=None):
        col = t[:, None]
        eps = (z - (1 - col) * self.x0) / col
        return eps - self.x0 + col + 0 * self.dummy


def test_validation_levels_and_average_excludes_t1():
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(5))
    model = RectifiedFlow(KnownLevelLossNet(x0))
    assert model.val_times == [k / 8 for k in range(1, 9)]
    data = DataLoader([{"x0": x} for x in x0], batch_size=16)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.validate(model, data, verbose=False)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # per-level loss = t^2, logged as val/loss_t0.125 .. val/loss_t1.000
    for k in range(1, 9):
        assert abs(m[f"val/loss_t{k / 8:.3f}"] - (k / 8) ** 2) < 1e-5, k
    # val/loss = mean over k = 1..7 of (k/8)^2 = 140 / 448 = 0.3125 (t = 1 excluded; with it: 0.3984)
    assert abs(m["val/loss"] - 0.3125) < 1e-5


def test_validation_noise_is_fixed_and_levels_weighted():
    # RF velocity model with eps weighting: level value = (1 - t)^2 * (same velocity MSE at every t,
    # since a zero network's error eps - x0 does not depend on t) -> level_k / (1 - t_k)^2 is constant.
    x0 = torch.randn(12, 2, generator=torch.Generator().manual_seed(6))
    data = DataLoader([{"x0": x} for x in x0], batch_size=4)
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    runs = []
    for _ in range(2):
        model = RectifiedFlow(ConstNet(torch.zeros(2)), weighting="eps")
        trainer = L.Trainer(**kw)
        trainer.validate(model, data, verbose=False)
        runs.append({k: float(v) for k, v in trainer.callback_metrics.items()})
    assert runs[0] == runs[1]  # fixed validation noise: identical numbers
    m = runs[0]
    levels = [m[f"val/loss_t{k / 8:.3f}"] for k in range(1, 9)]
    ratios = [levels[k - 1] / (1 - k / 8) ** 2 for k in range(1, 8)]
    assert max(ratios) - min(ratios) < 1e-4 * ratios[0]
    assert abs(m["val/loss"] - sum(levels[:7]) / 7) < 1e-6


# --- the LightningModule's named parts ------------------------------------------------------------------
def test_the_objective_returns_its_run_safety_callbacks():
    from flowmatch.training.finished_run import FinishedRunCheckpoint
    from flowmatch.training.lost_peer import LostPeerReport
    from flowmatch.training.resume_rng import ResumeRNG
    from flowmatch.training.writable_checkpoints import WritableCheckpoints

    callbacks = RectifiedFlow(AffineNet()).configure_callbacks()
    assert [type(c) for c in callbacks] == [ResumeRNG, FinishedRunCheckpoint, WritableCheckpoints, LostPeerReport]


def test_null_condition_follows_the_networks_conditioning_spec():
    from flowmatch.networks.conditioning import ConditioningSpec

    class Net(AffineNet):
        def __init__(self, spec):
            super().__init__()
            self.conditioning = spec

        def null_condition(self, cond):
            return torch.full_like(cond, 10)

    labels = torch.tensor([1, 2])
    assert torch.equal(RectifiedFlow(Net(ConditioningSpec(num_classes=10))).null_condition(labels), torch.full((2,), 10))
    assert RectifiedFlow(Net(ConditioningSpec())).null_condition(labels) is None  # an unconditional network
    assert RectifiedFlow(Net(ConditioningSpec(num_classes=10))).null_condition(None) is None


# --- distillation: its own base, its new name, the old one deprecated ----------------------------------------
DISTILL_NET = {"class_path": "flowmatch.networks.mlp.MLPVelocity", "init_args": {"dim": 2, "hidden": 16, "depth": 1, "time_dim": 8}}


def test_the_student_carries_no_time_sampler_weighting_or_level_metrics():
    from flowmatch.objectives import FewStepDistillation, FlowGenerator, FlowObjective

    student = FewStepDistillation(AffineNet(), student_steps=2)
    assert isinstance(student, FlowGenerator) and not isinstance(student, FlowObjective)
    for name in ("time_sampler", "weighting", "val_metrics", "val_times"):
        assert not hasattr(student, name), name
    assert not {"time_sampler", "weighting", "val_levels", "val_seed"} & set(student.hparams)


@pytest.mark.parametrize("module", ["flowmatch.objectives", "flowmatch.objectives.distillation"])
def test_one_step_distillation_still_works_with_a_deprecation_warning(module):
    import importlib

    from flowmatch.objectives import FewStepDistillation

    old = getattr(importlib.import_module(module), "OneStepDistillation")
    with pytest.warns(FutureWarning, match="FewStepDistillation"):
        student = old(AffineNet(), student_steps=3, weighting="native", val_levels=8, val_seed=0)  # the arguments it used to take
    assert isinstance(student, FewStepDistillation) and student.student_steps == 3


def _old_distillation_checkpoint(path):
    """A checkpoint as OneStepDistillation wrote it: its class path and the arguments it inherited in the hyper-parameters."""
    from flowmatch.networks.mlp import MLPVelocity
    from flowmatch.objectives import FewStepDistillation

    student = FewStepDistillation(MLPVelocity(**DISTILL_NET["init_args"]), student_steps=2)
    hparams = {"_class_path": "flowmatch.objectives.distillation.OneStepDistillation", "network": DISTILL_NET, "student_steps": 2,
               "loss": "mse", "time_sampler": None, "weighting": "native", "lr": 0.001, "weight_decay": 0.0, "betas": [0.9, 0.999],
               "warmup_steps": 0, "sample_shape": [2], "val_levels": 8, "val_seed": 0, "init_weights": None,
               "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    ckpt = {"state_dict": student.state_dict(), "hyper_parameters": hparams, "global_step": 3,
            "flowmatch": {"sample_shape": [2], "objective": "OneStepDistillation"}}
    torch.save(ckpt, path)
    return ckpt


def test_an_old_distillation_checkpoint_still_loads(tmp_path):
    from flowmatch.checkpoints import CheckpointError
    from flowmatch.objectives import FewStepDistillation
    from flowmatch.objectives.loading import load_objective

    ckpt = _old_distillation_checkpoint(tmp_path / "old.ckpt")
    with pytest.warns(FutureWarning, match="FewStepDistillation"):
        model = load_objective(tmp_path / "old.ckpt")
    assert isinstance(model, FewStepDistillation) and model.student_steps == 2 and model.sample_shape == (2,)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v), k
    # a run configured with the new name accepts it (e.g. to resume), another objective does not
    FewStepDistillation(model.net, student_steps=2).on_load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="OneStepDistillation"):
        RectifiedFlow(model.net).on_load_checkpoint(ckpt)


@pytest.mark.parametrize("class_path", [
    "flowmatch.objectives.RectifiedFlow", "flowmatch.objectives.FlowMatching", "flowmatch.objectives.EpsDDPM",
    "flowmatch.objectives.VPDiffusion", "flowmatch.objectives.rectified_flow.RectifiedFlow",
    "flowmatch.objectives.flow_matching.FlowMatching", "flowmatch.objectives.diffusion.EpsDDPM",
    "flowmatch.objectives.diffusion.VPDiffusion", "flowmatch.objectives.distillation.FewStepDistillation",
])
def test_config_class_paths_still_build(class_path):
    """The class paths configs name: build_objective (what load_objective uses) instantiates each one."""
    from flowmatch.objectives.loading import build_objective

    model = build_objective({"_class_path": class_path, "network": DISTILL_NET, "sample_shape": [2]})
    assert f"{type(model).__module__}.{type(model).__name__}".endswith(class_path.rpartition(".")[2])
    x, _ = model.generate(3, SamplerConfig(solver="euler", steps=2))
    assert x.shape == (3, 2) and torch.isfinite(x).all()
