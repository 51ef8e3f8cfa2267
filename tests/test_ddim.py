"""The DDIM solver (eta = 0): diffusers' DDIMScheduler on LDM's schedule, Euler on the rectified-flow path,
exactness for a constant x0 prediction, and its use through generate() and the sampler specs."""

import pytest
import torch
from torch import nn

from flowmatch.callbacks.common import parse_samplers
from flowmatch.objectives import EpsDDPM, RectifiedFlow, VPDiffusion
from flowmatch.paths import CosineVPPath, LinearVPPath, RectifiedFlowPath
from flowmatch.sampling import SamplerConfig, ddim, euler, sample


class CurvedEps(nn.Module):
    """A smooth, t-dependent "noise prediction" with no special structure: eps_hat = tanh(W z) + sin(3 t)."""

    def __init__(self, dim: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.7)

    def forward(self, z, t, cond=None):
        return torch.tanh(z @ self.w.T) + torch.sin(3 * t)[:, None]


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_ddim_matches_diffusers_ddim_scheduler_on_ldm_schedule(steps):
    from diffusers import DDIMScheduler

    net = CurvedEps()
    model = EpsDDPM(net, schedule="linear").double()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(steps)
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    ref = noise.clone()
    with torch.no_grad():
        for k in sched.timesteps:  # diffusers' step k is our t = (k + 1) / 1000 (LinearVPPath's convention)
            t = torch.full((ref.shape[0],), (int(k) + 1) / 1000, dtype=torch.float64)
            ref = sched.step(net(ref, t), k, ref, eta=0.0).prev_sample

    # the same times, then alphabar = 1 (diffusers' final_alpha_cumprod with set_alpha_to_one): our t = 0
    grid = torch.tensor([(int(k) + 1) / 1000 for k in sched.timesteps] + [0.0], dtype=torch.float64)
    with torch.no_grad():
        ours, nfe = ddim(model.velocity, noise.clone(), grid, path=model.path)
    assert nfe == steps
    # to float32 rounding: the objectives convert network outputs to velocities in float32, diffusers keeps its schedule in float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # Euler on the same grid is a different (and here worse-defined) update: the comparison is not vacuous
    if steps > 1:
        with torch.no_grad():
            by_euler, _ = euler(model.velocity, noise.clone(), grid[:-1])
        assert (by_euler - ref).abs().max() > 1e-3


def test_ddim_is_euler_on_the_rectified_flow_path():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64)

    def v(z, t):
        return torch.tanh(z @ w) * (1 + t[:, None]) - z

    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    grid = torch.linspace(1, 0, 9, dtype=torch.float64)
    by_ddim, n1 = ddim(v, z, grid, path=RectifiedFlowPath())
    by_euler, n2 = euler(v, z, grid)
    assert n1 == n2 == 8
    torch.testing.assert_close(by_ddim, by_euler, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", [LinearVPPath(), CosineVPPath()], ids=["linear", "cosine"])
def test_ddim_is_exact_for_a_point_mass_where_euler_is_not(path):
    # data = one point c: the exact noise prediction is eps = (z - a_t c) / b_t, and x0 = c at every t.
    # DDIM keeps the x0 prediction, so it lands on c in any number of steps; Euler on the curved VP path does not.
    c = torch.tensor([[1.5, -0.5]], dtype=torch.float64)

    class PointMass(nn.Module):
        def forward(self, z, t, cond=None):
            a, b = path.a(t)[:, None], path.b(t)[:, None]
            return (z - a * c) / b

    model = EpsDDPM(PointMass(), schedule="linear" if isinstance(path, LinearVPPath) else "cosine").double()
    model.sample_shape = (2,)
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for steps in (1, 3):
        x, _ = model.generate(4, SamplerConfig(solver="ddim", steps=steps), noise=noise)
        # float32 velocities, divided by a_t at the first step (cosine: a = 0.0016 at t_max = 0.999)
        torch.testing.assert_close(x, c.expand(4, 2), rtol=0, atol=1e-3)
    x, _ = sample(model.velocity, noise, config=SamplerConfig(solver="euler", steps=3), t_max=model.path.t_max, t_min=model.path.t_min)
    assert (x - c).abs().max() > 5e-2


def test_ddim_through_generate_on_a_v_model_and_an_rf_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, z, t, cond=None):
            return self.net(z) * (1 + t[:, None])

    rf = RectifiedFlow(Wrap())
    rf.sample_shape = (2,)
    a, nfe_a = rf.generate(16, SamplerConfig(solver="ddim", steps=7), seed=0)
    b, nfe_b = rf.generate(16, SamplerConfig(solver="euler", steps=7), seed=0)
    assert nfe_a == nfe_b == 7
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    v_model = VPDiffusion(Wrap(), schedule="cosine", prediction="v")
    v_model.sample_shape = (2,)
    x, nfe = v_model.generate(16, SamplerConfig(solver="ddim", steps=7), seed=0)
    assert x.shape == (16, 2) and torch.isfinite(x).all() and nfe == 7


def test_ddim_spec_parses_and_needs_a_path():
    (cfg,) = parse_samplers(["ddim25:cfg=2"])
    assert (cfg.solver, cfg.steps, cfg.guidance, cfg.name) == ("ddim", 25, 2.0, "ddim25_cfg2")
    with pytest.raises(ValueError, match="ddim solver needs the model's affine path"):
        sample(lambda z, t: -z, torch.zeros(2, 2), config=cfg)
