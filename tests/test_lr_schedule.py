"""The learning-rate schedule: warm-up, cosine decay to a final ratio at an explicit step, and the optimizer really
follows it in a Lightning fit (read back from the optimizer at each step)."""

import math

import lightning as L
import pytest
import torch

from flowmatch.objectives import RectifiedFlow
from flowmatch.training.lr_schedule import check_schedule, lr_factor


def test_factor_warms_up_then_follows_the_cosine_then_stays():
    w, d, f = 10, 110, 0.1
    assert [lr_factor(s, w, d, f) for s in range(3)] == [0.1, 0.2, 0.3]
    assert lr_factor(9, w, d, f) == 1.0 and lr_factor(10, w, d, f) == 1.0
    assert lr_factor(60, w, d, f) == pytest.approx(f + (1 - f) * 0.5)  # half-way: the cosine's midpoint
    assert lr_factor(35, w, d, f) == pytest.approx(f + (1 - f) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, w, d, f) == pytest.approx(f) and lr_factor(10_000, w, d, f) == pytest.approx(f)
    assert all(lr_factor(s, w, 0, f) == 1.0 for s in range(10, 500, 37))  # no decay: constant after warm-up


@pytest.mark.parametrize("args, key", [((-1, 0, 0.1), "warmup_steps"), ((100, 50, 0.1), "lr_decay_steps"),
                                       ((0, 10, 1.5), "lr_final_ratio")])
def test_bad_schedules_are_refused_naming_the_argument(args, key):
    with pytest.raises(ValueError, match=key):
        check_schedule(*args)


def test_a_fit_follows_the_schedule_step_by_step():
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = net

        def forward(self, z, t, cond=None):
            return self.mlp(z) * t[:, None]

    model = RectifiedFlow(Net(), lr=0.01, warmup_steps=3, lr_decay_steps=13, lr_final_ratio=0.2)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    data = torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=4)
    trainer = L.Trainer(max_steps=16, callbacks=[Record()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, data)
    expected = [0.01 * lr_factor(s, 3, 13, 0.2) for s in range(16)]
    assert seen == pytest.approx(expected)
    assert seen[-1] == pytest.approx(0.002)
