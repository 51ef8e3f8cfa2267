"""Straightness S(Z) = int_0^1 E||(Z_1 - Z_0) - dZ_t/dt||^2 dt (docs/spec.md §5) against closed forms, and its callback."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from scipy.integrate import quad

from flowmatch.callbacks.straightness import Straightness
from flowmatch.data.toy2d import Toy2DDataModule
from flowmatch.metrics.straightness import straightness, straightness_of_field
from flowmatch.networks.mlp import MLPVelocity
from flowmatch.objectives import RectifiedFlow

torch.set_num_threads(1)


def test_constant_field_is_straight():
    c = torch.tensor([0.7, -2.0])
    noise = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    r = straightness_of_field(lambda z, t, cond: c.expand_as(z), noise, steps=50)
    assert r.straightness == pytest.approx(0.0, abs=1e-12)
    assert r.normalized == pytest.approx(0.0, abs=1e-12)
    assert r.length_ratio == pytest.approx(1.0, abs=1e-9)
    assert r.curvature == pytest.approx(0.0, abs=1e-6)
    assert r.displacement == pytest.approx(0.7**2 + 2.0**2, rel=1e-6)


def test_straight_paths_at_constant_speed_per_path_are_straight():
    """The rectified-flow ideal: v(z, t) = eps - x0 along each path (here x0 = A eps): S = 0, any speed per path."""
    a = torch.tensor([[0.3, 0.1], [-0.2, 0.5]])
    noise = torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    # along z_t = (1 - t) A eps + t eps the velocity is eps - A eps; written as a field of (z, t):
    # eps = (t I + (1 - t) A)^{-1} z
    def v(z, t, cond):
        tt = t[0].item()
        m = tt * torch.eye(2) + (1 - tt) * a
        eps = torch.linalg.solve(m, z.T).T
        return eps - eps @ a.T

    r = straightness_of_field(v, noise, steps=200)
    assert r.straightness < 1e-9
    assert r.length_ratio == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("omega", [math.pi / 2, 1.0])
def test_rotating_field_matches_closed_form(omega):
    """v = omega J z rotates each point by omega between t = 1 and t = 0 on a circle of radius r:
    |v| = omega r, chord^2 = 2 r^2 (1 - cos omega), and since int v dt = chord, S = omega^2 r^2 - chord^2."""
    j = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r2 = noise.pow(2).sum(1)
    exact = float((r2 * (omega**2 - 2 * (1 - math.cos(omega)))).mean())
    res = straightness_of_field(lambda z, t, cond: omega * z @ j.T, noise, steps=4000)
    assert res.straightness == pytest.approx(exact, rel=2e-3)
    assert res.curvature == pytest.approx(omega, rel=2e-3)  # total turning of the tangent
    arc, chord = omega * r2.sqrt().mean(), 2 * math.sin(omega / 2) * r2.sqrt().mean()
    assert res.length_ratio == pytest.approx(float(arc / chord), rel=2e-3)


def test_rectified_flow_to_a_gaussian_matches_closed_form():
    """The exact 1-RF velocity for x0 ~ N(mu, sigma^2 I), eps ~ N(0, I) (z_t = (1 - t) x0 + t eps) is
    v(z, t) = (t - (1 - t) sigma^2) / s(t)^2 (z - (1 - t) mu) - mu,  s(t)^2 = (1 - t)^2 sigma^2 + t^2.
    Its paths are z_t = (1 - t) mu + s(t) xi (xi = z_1), so (z_1 - z_0) - v = (1 - sigma - s'(t)) xi and
    S = E|xi|^2 [int_0^1 s'(t)^2 dt - (1 - sigma)^2]: curved by the varying speed s'(t), although every
    path is a straight segment. The integral is done independently by quadrature."""
    mu, sigma = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.3

    def v(z, t, cond):
        t = t[:, None]
        s2 = (1 - t) ** 2 * sigma**2 + t**2
        return (t - (1 - t) * sigma**2) / s2 * (z - (1 - t) * mu) - mu

    s = lambda t: math.sqrt((1 - t) ** 2 * sigma**2 + t**2)  # noqa: E731
    ds = lambda t: (t - (1 - t) * sigma**2) / s(t)  # noqa: E731
    integral, _ = quad(lambda t: ds(t) ** 2, 0.0, 1.0)
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = float(noise.pow(2).sum(1).mean()) * (integral - (1 - sigma) ** 2)
    assert exact > 0.1
    res = straightness_of_field(v, noise, steps=4000)
    assert res.straightness == pytest.approx(exact, rel=5e-3)
    # the paper's time s = 1 - t runs the same paths backwards: the same S (the formula is symmetric)
    back = straightness_of_field(lambda z, t, c: -v(z, 1 - t, c), mu + sigma * noise, steps=4000)  # from each path's z_0
    assert back.straightness == pytest.approx(exact, rel=5e-3)


def test_straightness_of_a_model_is_seeded_and_batch_independent():
    torch.manual_seed(0)
    net = MLPVelocity(2, 32, 2, 16)
    torch.nn.init.normal_(net.out.weight, std=0.5)
    model = RectifiedFlow(net, sample_shape=[2])
    a = straightness(model, 300, steps=20, seed=4)
    b = straightness(model, 300, steps=20, seed=4, batch_size=64)
    assert a.straightness > 0 and a.nfe == 20
    assert a.straightness == pytest.approx(b.straightness, rel=1e-9)
    assert straightness(model, 300, steps=20, seed=5).straightness != a.straightness


def test_callback_logs_val_and_test_straightness(tmp_path):
    torch.manual_seed(0)
    model = RectifiedFlow(MLPVelocity(2, 32, 2, 16), sample_shape=[2])
    dm = Toy2DDataModule(num_train=512, num_val=256, num_test=256, batch_size=128)
    cb = Straightness(num_samples=200, steps=10)
    trainer = L.Trainer(max_steps=4, val_check_interval=4, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], default_root_dir=tmp_path)
    trainer.fit(model, dm)
    for key in ("val/straightness", "val/straightness_normalized", "val/path_length_ratio", "val/path_curvature"):
        assert key in trainer.callback_metrics and np.isfinite(float(trainer.callback_metrics[key]))
    trainer.test(model, dm, verbose=False)
    assert "test/straightness" in trainer.callback_metrics
    assert float(trainer.callback_metrics["test/straightness"]) == pytest.approx(cb.last["val/straightness"], rel=1e-6)  # same weights, same noise
