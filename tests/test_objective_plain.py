"""The plain-torch objective (flowmatch.objectives.loss): FlowLoss and VelocityField with plain nn.Modules,
no Trainer, no LightningModule; checked against closed forms (docs/spec.md §1, §2).

Closed forms used: RF z = (1 - t) x0 + t eps, target eps - x0; cosine VP z = cos(pi t/2) x0 + sin(pi t/2) eps,
eps-target eps, v-target cos(pi t/2) eps - sin(pi t/2) x0, dz/dt = pi/2 (cos(pi t/2) eps - sin(pi t/2) x0).
"""

import math

import pytest
import torch
from torch import nn

from flowmatch.objectives.loss import FlowLoss, VelocityField
from flowmatch.parametrisation import EpsPrediction, VelocityPrediction, VPrediction
from flowmatch.paths.linear import OTPath, RectifiedFlowPath
from flowmatch.paths.vp import CosineVPPath
from flowmatch.time_samplers import LogitNormalTime, UniformTime
from flowmatch.weighting import get_weighting

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

SIGMA_MIN = 1e-4


def half_pi(t):
    return math.pi * t[:, None] / 2


CASES = {  # (path, parametrisation, closed-form target(x0, eps, t))
    "rf": (RectifiedFlowPath(), VelocityPrediction(), lambda x0, eps, t: eps - x0),
    "fm": (OTPath(SIGMA_MIN), VelocityPrediction(), lambda x0, eps, t: (1 - SIGMA_MIN) * eps - x0),
    "eps_cos": (CosineVPPath(), EpsPrediction(), lambda x0, eps, t: eps),
    "v_cos": (CosineVPPath(), VPrediction(), lambda x0, eps, t: torch.cos(half_pi(t)) * eps - torch.sin(half_pi(t)) * x0),
}


class Oracle(nn.Module):
    """Returns what it is told to (the exact target of the batch), whatever z and t."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, z, t, cond=None):
        return self.value


class Linear(nn.Module):
    """out = w z + c t, a network known in closed form; records its inputs."""

    def __init__(self, w=0.5, c=-1.0):
        super().__init__()
        self.w, self.c = w, c
        self.seen = []

    def forward(self, z, t, cond=None):
        self.seen.append((z.clone(), t.clone(), cond))
        return self.w * z + self.c * t[:, None]


def batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    t = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.99][:n])
    return x0, eps, t


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("weighting", ["native", "eps", "velocity", "rf", "v"])
def test_the_exact_target_gives_zero_loss_under_every_weighting(name, weighting):
    path, param, target = CASES[name]
    x0, eps, t = batch(1)
    loss = FlowLoss(path, param, weighting=weighting).loss_per_sample(Oracle(target(x0, eps, t)), x0, t, eps)
    assert loss.shape == (6,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.zeros(6), rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", list(CASES))
def test_a_wrong_prediction_costs_its_mean_squared_error(name):
    path, param, target = CASES[name]
    x0, eps, t = batch(2)
    offset = torch.tensor([0.5, -1.0, 2.0])
    loss = FlowLoss(path, param).loss_per_sample(Oracle(target(x0, eps, t) + offset), x0, t, eps)
    torch.testing.assert_close(loss, offset.pow(2).mean().expand(6), rtol=1e-5, atol=1e-6)


def test_weighting_multipliers_by_hand():
    x0, eps, t = batch(3)
    zero = Oracle(torch.zeros(6, 3))
    # RF velocity model under the eps-MSE weighting: eps error = (1 - t) velocity error -> multiplier (1 - t)^2
    plain = ((eps - x0) ** 2).mean(1)
    rf = FlowLoss(RectifiedFlowPath(), VelocityPrediction(), weighting="eps")
    torch.testing.assert_close(rf.loss_per_sample(zero, x0, t, eps), plain * (1 - t) ** 2, rtol=1e-5, atol=1e-7)
    # a Weighting object works as its name does
    by_object = FlowLoss(RectifiedFlowPath(), VelocityPrediction(), weighting=get_weighting("eps"))
    torch.testing.assert_close(by_object.loss_per_sample(zero, x0, t, eps), rf.loss_per_sample(zero, x0, t, eps), rtol=0, atol=0)
    # eps model on the cosine path under "rf": multiplier pi / (2 cos^2(pi t / 2))
    ddpm = FlowLoss(CosineVPPath(), EpsPrediction(), weighting="rf")
    expected = (eps**2).mean(1) * math.pi / (2 * torch.cos(math.pi * t / 2) ** 2)
    torch.testing.assert_close(ddpm.loss_per_sample(zero, x0, t, eps), expected, rtol=1e-4, atol=1e-6)
    # native: no multiplier
    assert FlowLoss(RectifiedFlowPath(), VelocityPrediction()).weighting.multiplier(t, RectifiedFlowPath(), VelocityPrediction()) is None
    with pytest.raises(ValueError, match="bogus"):
        FlowLoss(RectifiedFlowPath(), VelocityPrediction(), weighting="bogus")


def test_velocity_of_a_known_linear_network():
    x0, eps, t = batch(4)
    z = torch.cos(half_pi(t)) * x0 + torch.sin(half_pi(t)) * eps
    out = 0.5 * z - t[:, None]
    # velocity prediction: the output is the velocity
    torch.testing.assert_close(VelocityField(RectifiedFlowPath(), VelocityPrediction()).velocity(Linear(), z, t), out)
    # v-prediction on the cosine path: dz/dt = pi/2 v
    torch.testing.assert_close(VelocityField(CosineVPPath(), VPrediction()).velocity(Linear(), z, t), math.pi / 2 * out, rtol=1e-5, atol=1e-6)
    # eps-prediction on the cosine path: dz/dt = -pi/2 tan(pi t/2) z + pi / (2 cos(pi t/2)) eps_hat
    expected = -math.pi / 2 * torch.tan(half_pi(t)) * z + math.pi / (2 * torch.cos(half_pi(t))) * out
    torch.testing.assert_close(VelocityField(CosineVPPath(), EpsPrediction()).velocity(Linear(), z, t), expected, rtol=1e-4, atol=1e-4)


def test_the_exact_target_gives_the_true_velocity():
    x0, eps, t = batch(5)
    for name, (path, param, target) in CASES.items():
        s = path.sample(x0, eps, t)
        v = VelocityField(path, param).velocity(Oracle(target(x0, eps, t)), s.z, t)
        torch.testing.assert_close(v, s.dz, rtol=1e-4, atol=1e-4, msg=name)


def test_training_draws_the_times_first_then_the_noise():
    x0, _, _ = batch(6, n=5)
    loss = FlowLoss(RectifiedFlowPath(), VelocityPrediction(), LogitNormalTime(0.0, 1.0))
    torch.manual_seed(123)
    t_ref = LogitNormalTime(0.0, 1.0).sample(5)
    eps_ref = torch.randn(x0.shape)
    after_ref = torch.randn(2)
    net = Linear()
    torch.manual_seed(123)
    per_sample = loss.training_loss(net, x0, cond="c")
    assert torch.equal(torch.randn(2), after_ref)  # exactly these draws, no others
    z, t, cond = net.seen[0]
    assert torch.equal(t, t_ref) and cond == "c"
    torch.testing.assert_close(z, (1 - t_ref[:, None]) * x0 + t_ref[:, None] * eps_ref, rtol=0, atol=0)
    torch.testing.assert_close(per_sample, loss.loss_per_sample(Linear(), x0, t_ref, eps_ref), rtol=0, atol=0)


def test_given_noise_draws_only_the_times():
    x0, eps, _ = batch(7, n=4)
    loss = FlowLoss(RectifiedFlowPath(), VelocityPrediction())  # uniform times by default
    assert isinstance(loss.time_sampler, UniformTime)
    torch.manual_seed(5)
    t_ref = UniformTime().sample(4)
    after_ref = torch.randn(1)
    net = Linear()
    torch.manual_seed(5)
    loss.training_loss(net, x0, eps=eps.double())  # the couplings' noise, used in float32
    assert torch.equal(torch.randn(1), after_ref)
    z, t, _ = net.seen[0]
    assert torch.equal(t, t_ref)
    torch.testing.assert_close(z, (1 - t_ref[:, None]) * x0 + t_ref[:, None] * eps, rtol=0, atol=0)


def test_bf16_data_reaches_the_network_in_bf16_and_the_loss_stays_float32():
    x0, eps, t = batch(8)
    net = Linear()
    loss = FlowLoss(RectifiedFlowPath(), VelocityPrediction()).loss_per_sample(net, x0.bfloat16(), t, eps)
    assert net.seen[0][0].dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_the_lightning_module_drives_the_same_loss():
    """RectifiedFlow.training_step computes FlowLoss.training_loss(...).mean() with the same draws."""
    from flowmatch.objectives import RectifiedFlow

    x0, _, _ = batch(9)
    model = RectifiedFlow(Linear(), time_sampler=LogitNormalTime(0.0, 1.0), weighting="eps")
    assert isinstance(model.objective, FlowLoss) and model.objective.weighting.name == "eps"
    torch.manual_seed(11)
    from_module = model.training_step({"x0": x0}, 0)
    torch.manual_seed(11)
    plain = FlowLoss(RectifiedFlowPath(), VelocityPrediction(), LogitNormalTime(0.0, 1.0), "eps").training_loss(Linear(), x0).mean()
    assert torch.equal(from_module, plain)
