"""Guidance distillation (flowmatch.objectives.guidance_distillation) and sampling a guidance-embedded network
(flowmatch.sampling.guidance): the loss against its closed form, the student's start from a FLUX teacher, a real
Lightning fit of a tiny student on a tiny teacher's checkpoint, and the checkpoint sampled without the teacher."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
from torch import nn

from flowmatch.checkpoints import CheckpointError, read_checkpoint
from flowmatch.networks.flux import FLUX
from flowmatch.objectives import RectifiedFlow
from flowmatch.objectives.guidance_distillation import GuidanceDistillation, GuidanceDistillationLoss
from flowmatch.objectives.loading import load_objective
from flowmatch.objectives.loss import FlowLoss
from flowmatch.parametrisation import VelocityPrediction
from flowmatch.paths.linear import RectifiedFlowPath
from flowmatch.sampling import SamplerConfig, sample
from flowmatch.time_samplers import UniformTime
from helpers_latents import RandomLatentsDataModule, SaveNetworkWeights
from helpers_models import randomize

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

NET = dict(num_double_blocks=1, num_single_blocks=1, hidden_size=32, num_heads=2, in_channels=4, patch_size=2,
           pooled_dim=8, context_dim=16, axes_dim=[4, 6, 6])
DATA = dict(channels=4, size=8, pooled_dim=8, context_dim=16, num_tokens=5, num_train=16, num_val=4, batch_size=4)


def flux(guidance_embed: bool, cond_drop_prob: float, **kw) -> FLUX:
    return FLUX(**{**NET, "guidance_embed": guidance_embed, "cond_drop_prob": cond_drop_prob, **kw})


def cond_of(b: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pooled": torch.randn(b, 8, generator=g), "tokens": torch.randn(b, 5, 16, generator=g)}


def network_config(guidance_embed: bool, cond_drop_prob: float) -> dict:
    return {"class_path": "flowmatch.networks.flux.FLUX",
            "init_args": {**NET, "guidance_embed": guidance_embed, "cond_drop_prob": cond_drop_prob}}


def teacher_objective() -> RectifiedFlow:
    """A tiny FLUX rectified flow built as the CLI builds it (its config as hyper-parameters, so load_objective rebuilds it)."""
    config = {"_class_path": "flowmatch.objectives.RectifiedFlow", "network": network_config(False, 0.3), "time_sampler": None,
              "weighting": "native", "time_shift": None, "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 0,
              "sample_shape": [4, 8, 8], "val_levels": 8, "val_seed": 0, "init_weights": None}
    with _given_hyperparameters_context(hparams=config, instantiator="lightning.pytorch.cli.instantiate_module"):
        return RectifiedFlow(lambda: flux(False, 0.3), sample_shape=[4, 8, 8])


def student_objective(teacher: str) -> GuidanceDistillation:
    config = {"_class_path": "flowmatch.objectives.guidance_distillation.GuidanceDistillation", "network": network_config(True, 0.0),
              "teacher": teacher, "init_from_teacher": True, "guidance_range": [1.0, 5.0], "time_sampler": None, "weighting": "native",
              "time_shift": None, "val_guidances": [1.5, 3.0], "val_levels": 2, "val_seed": 0, "lr": 1e-3, "weight_decay": 0.0,
              "betas": [0.9, 0.999], "warmup_steps": 0, "sample_shape": None}
    with _given_hyperparameters_context(hparams=config, instantiator="lightning.pytorch.cli.instantiate_module"):
        return GuidanceDistillation(lambda: flux(True, 0.0), teacher=teacher, val_guidances=[1.5, 3.0], val_levels=2, lr=1e-3)


def trainer(steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **kw)


class CallLog:
    """Forward hook recording each call's batch size and condition."""

    def __init__(self, net: nn.Module):
        self.batches, self.conds = [], []
        net.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.batches.append(inputs[0].shape[0])
        self.conds.append(inputs[2])


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


class KnownTeacher:
    """A teacher with known velocities: v(z, t, c) = 2 z + t + pooled.mean(1) (null condition: pooled = 0)."""

    def __init__(self):
        self.batches = []

    def velocity(self, z, t, cond):
        self.batches.append(z.shape[0])
        return 2 * z + t.view(-1, 1, 1, 1) + cond["pooled"].mean(1).view(-1, 1, 1, 1)

    def null_condition(self, cond):
        return {k: torch.zeros_like(v) for k, v in cond.items()}


class KnownStudent(nn.Module):
    """v(z, t, c, g) = z * g + t (a student whose output the test can write down)."""

    def forward(self, z, t, cond):
        return z * cond["guidance"].view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


def test_loss_is_the_closed_form_with_one_doubled_teacher_call():
    torch.manual_seed(0)
    b = 5
    x0, eps = torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8)
    t, g = torch.rand(b), 1 + 4 * torch.rand(b)
    cond = cond_of(b)
    teacher = KnownTeacher()
    loss = GuidanceDistillationLoss(FlowLoss(RectifiedFlowPath(), VelocityPrediction(), UniformTime()))
    got = loss.loss_per_sample(KnownStudent(), teacher, x0, t, eps, cond, g)

    tt = t.view(-1, 1, 1, 1)
    z = (1 - tt) * x0 + tt * eps
    v_c = 2 * z + tt + cond["pooled"].mean(1).view(-1, 1, 1, 1)
    v_u = 2 * z + tt
    target = v_u + g.view(-1, 1, 1, 1) * (v_c - v_u)
    student = z * g.view(-1, 1, 1, 1) + tt
    torch.testing.assert_close(got, (student - target).pow(2).flatten(1).mean(1))
    assert teacher.batches == [2 * b]  # conditional and unconditional in one call
    # the drawn scales lie in the range, one per example
    draws = GuidanceDistillationLoss(loss.flow, (2.0, 3.0)).draw_guidance(1000)
    assert draws.shape == (1000,) and draws.min() >= 2.0 and draws.max() <= 3.0 and draws.std() > 0.2


# ---------------------------------------------------------------------------------------------
# The student and its teacher
# ---------------------------------------------------------------------------------------------


def test_student_from_a_flux_teacher_is_the_teachers_conditional_velocity():
    torch.manual_seed(0)
    teacher = RectifiedFlow(randomize(flux(False, 0.3)), sample_shape=[4, 8, 8])
    student = GuidanceDistillation(flux(True, 0.0), sample_shape=[4, 8, 8])
    student.set_teacher(teacher)
    student.init_from_teacher()
    out = student.net.guidance_embedder.mlp[2]
    assert not out.weight.any() and not out.bias.any() and student.net.guidance_embedder.mlp[0].weight.any()
    z, t, cond = torch.randn(3, 4, 8, 8), torch.rand(3), cond_of(3)
    student.eval()
    with torch.no_grad():
        v_c = teacher.velocity(z, t, cond)
        v_u = teacher.velocity(z, t, teacher.null_condition(cond))
        assert (v_c - v_u).abs().max() > 1e-3  # guidance changes the teacher's velocity ...
        for g in (1.0, 3.7):  # ... but the untrained student is the conditional velocity at every scale
            assert torch.equal(student.velocity(z, t, {**cond, "guidance": torch.full((3,), g)}), v_c)


def test_student_that_does_not_fit_the_teacher_is_named():
    teacher = RectifiedFlow(flux(False, 0.3), sample_shape=[4, 8, 8])
    wider = GuidanceDistillation(flux(True, 0.0, mlp_ratio=2.0))
    wider.set_teacher(teacher)
    shapes = r"teacher RectifiedFlow: .*Shapes differ: \['blocks.0.text.0.mlp.fc1.weight: teacher \(128, 32\), student \(64, 32\)"
    with pytest.raises(CheckpointError, match=shapes):
        wider.init_from_teacher()
    learned = GuidanceDistillation(flux(True, 0.0, learned_null=True))
    learned.set_teacher(teacher)
    with pytest.raises(CheckpointError, match="the teacher lacks: .*pooled_dropout.null_value"):
        learned.init_from_teacher()


def test_students_that_cannot_be_distilled_are_refused():
    with pytest.raises(ValueError, match="embeds the guidance scale .*FLUX without guidance_embed"):
        GuidanceDistillation(flux(False, 0.0))
    with pytest.raises(ValueError, match="drops its text condition .*cond_drop_prob: 0"):
        GuidanceDistillation(flux(True, 0.463))
    lazy = GuidanceDistillation(lambda: flux(False, 0.0))  # a factory: refused when built
    with pytest.raises(ValueError, match="guidance_embed"):
        lazy.configure_model()
    with pytest.raises(ValueError, match="needs its teacher .*--model.init_args.teacher"):
        GuidanceDistillation(flux(True, 0.0)).teacher
    with pytest.raises(ValueError, match="embeds guidance itself"):
        GuidanceDistillation(flux(True, 0.0)).set_teacher(RectifiedFlow(flux(True, 0.3)))


# ---------------------------------------------------------------------------------------------
# A real fit: frozen teacher, checkpoint without it, sampling with embedded guidance
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny teacher trained 2 steps and saved; a student distilled from that file for 3 steps (with validation)."""
    root = tmp_path_factory.mktemp("guidance_distillation")
    torch.manual_seed(0)
    teacher = teacher_objective()
    fit = trainer(2, limit_val_batches=0)
    fit.fit(teacher, datamodule=RandomLatentsDataModule(**DATA))
    teacher_path = root / "teacher.ckpt"
    fit.save_checkpoint(teacher_path)

    student = student_objective(str(teacher_path))
    fit = trainer(3, val_check_interval=3, callbacks=[SaveNetworkWeights(str(root / "weights"))])
    fit.fit(student, datamodule=RandomLatentsDataModule(**DATA))
    student_path = root / "student.ckpt"
    fit.save_checkpoint(student_path)
    return {"root": root, "teacher_path": teacher_path, "student_path": student_path, "student": student, "trainer": fit}


def test_fit_starts_from_the_teacher_and_leaves_it_frozen_outside_the_checkpoint(distilled):
    student, fit = distilled["student"], distilled["trainer"]
    saved = load_objective(distilled["teacher_path"], weights="raw").net.state_dict()
    start = torch.load(distilled["root"] / "weights" / "start.pt")
    for name, value in saved.items():  # the student started from the teacher's weights ...
        assert torch.equal(start[name], value), name
    assert not start["guidance_embedder.mlp.2.weight"].any()  # ... with a silent guidance embedding
    end = torch.load(distilled["root"] / "weights" / "end.pt")
    assert end["guidance_embedder.mlp.2.weight"].any()  # and trained it
    teacher = student.teacher  # the teacher: untouched, frozen, in eval mode, given no gradient, not optimised
    for name, value in teacher.net.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    optimised = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in student.net.parameters()}
    assert {"val/loss", "val/loss_g1p5", "val/loss_g3"} <= set(fit.callback_metrics)
    state = read_checkpoint(distilled["student_path"])["state_dict"]
    assert set(state) == {f"net.{k}" for k in student.net.state_dict()}  # the student's network, nothing of the teacher


def test_checkpoint_samples_without_the_teacher_one_call_per_step(distilled):
    distilled["teacher_path"].rename(distilled["root"] / "moved.ckpt")  # the student does not need its teacher to sample
    try:
        model = load_objective(distilled["student_path"])
        assert model.teacher_path == str(distilled["teacher_path"])
        calls = CallLog(model.net)
        cond = cond_of(3)
        x, nfe = model.generate(3, SamplerConfig("euler", 4, guidance=3.0), cond=cond, seed=0)
        assert nfe == 4 and calls.batches == [3] * 4  # one plain-batch call per step: no doubled batch, no null condition
        assert all(torch.equal(c["guidance"], torch.full((3,), 3.0)) and torch.equal(c["pooled"], cond["pooled"]) for c in calls.conds)
        # the same as Euler on the network with cond["guidance"] = 3
        z = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in (1.0, 0.75, 0.5, 0.25):
                z = z - 0.25 * model.velocity(z, torch.full((3,), t), {**cond, "guidance": torch.full((3,), 3.0)})
        torch.testing.assert_close(x, z)
        x1, _ = model.generate(3, SamplerConfig("euler", 2), cond=cond, seed=0)  # guidance 1 is still the network's input
        assert calls.batches[-2:] == [3, 3] and torch.equal(calls.conds[-1]["guidance"], torch.ones(3))
        assert not torch.allclose(x1, model.generate(3, SamplerConfig("euler", 2, guidance=4.0), cond=cond, seed=0)[0])
        with pytest.raises(CheckpointError, match="checkpoint not found: .*teacher.ckpt"):
            model.teacher  # only training, validation and test load it
    finally:
        (distilled["root"] / "moved.ckpt").rename(distilled["teacher_path"])


def test_sample_cli_refuses_a_negative_prompt_for_a_guidance_embedded_network(distilled, tmp_path, capsys):
    from flowmatch.cli.main import main as flowmatch_main

    args = ["sample", "--ckpt", str(distilled["student_path"]), "--out", str(tmp_path / "out"),
            "--prompts", "a 7", "--guidance", "3", "--negative_prompt", "a 1"]
    capsys.readouterr()
    assert flowmatch_main(args) == 2
    err = capsys.readouterr().err
    assert "guidance-distilled (guidance_embed=True)" in err and "drop --negative_prompt" in err, err
    assert not (tmp_path / "out").exists()


def test_guidance_reaches_networks_only_as_they_take_it():
    torch.manual_seed(0)
    plain = RectifiedFlow(flux(False, 0.3), sample_shape=[4, 8, 8]).eval()
    cond, noise = cond_of(2), torch.randn(2, 4, 8, 8)
    calls = CallLog(plain.net)
    with torch.no_grad():
        plain.generate(2, SamplerConfig("euler", 2, guidance=2.0), cond=cond, noise=noise)
        assert calls.batches == [4, 4]  # classifier-free guidance: a doubled batch
        with pytest.raises(ValueError, match="built without a guidance embedding"):  # the network's refusal reaches the user
            sample(plain.velocity, noise, cond=cond, config=SamplerConfig("euler", 2, guidance=2.0), embedded_guidance=True)
        embedded = GuidanceDistillation(flux(True, 0.0), sample_shape=[4, 8, 8]).eval()
        with pytest.raises(ValueError, match="no unconditional branch"):
            sample(embedded.velocity, noise, cond=cond, uncond=plain.null_condition(cond), config=SamplerConfig("euler", 2, guidance=2.0))
        with pytest.raises(ValueError, match="must hold the guidance scale"):
            sample(embedded.velocity, noise, cond=cond, config=SamplerConfig("euler", 2, guidance=2.0), embedded_guidance=False)
