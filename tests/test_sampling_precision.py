"""Callbacks sample fixed-step solvers in the run's precision and adaptive ones in float32."""

import lightning as L
import pytest
import torch

from flowmatch.callbacks.common import parse_samplers, sampling_precision


@pytest.mark.parametrize("precision, spec, autocast", [
    ("bf16-mixed", "euler25", True), ("bf16-mixed", "heun4:cfg=1.5", True), ("bf16-mixed", "dopri5", False),
    ("32-true", "euler25", False), ("32-true", "dopri5", False)])
def test_the_sampling_context_follows_the_run_and_the_solver(precision, spec, autocast):
    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False)
    with sampling_precision(trainer, parse_samplers([spec])[0]):
        assert torch.is_autocast_enabled("cpu") is autocast
        if autocast:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_without_a_trainer_sampling_stays_float32():
    with sampling_precision(None, parse_samplers(["euler25"])[0]):
        assert not torch.is_autocast_enabled("cpu")
