"""The attention-logit probe and its callback: the recorded maximum equals the explicit q·k / sqrt(d); padding
keys are ignored; QK-norm caps the logit at sqrt(head_dim) however large the weights grow, while without it the
logit grows with them; the callback logs train/attn_logit_max on every N-th step of a real fit."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from helpers_latents import RandomLatentsDataModule
from helpers_models import randomize
from flowmatch.callbacks import AttentionLogitMonitor
from flowmatch.networks import attention_probe
from flowmatch.networks.attention_probe import AttentionLogitRecorder
from flowmatch.networks.layers import attention
from flowmatch.networks.mmdit import MMDiT
from flowmatch.objectives import RectifiedFlow

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TINY = dict(depth=2, hidden_size=32, num_heads=2, in_channels=4, pooled_dim=16, context_dim=32, pos_embed_max_size=8)


def test_recorded_maximum_is_the_explicit_logit_and_ignores_padding_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, -1] = False
    k[:, :, -1] = 1000.0  # a huge padding key: masked, so it must not count
    with AttentionLogitRecorder() as rec:
        attention(q, k, v, key_mask=mask)
    expected = float(((q @ k[:, :, :-1].transpose(-1, -2)) / math.sqrt(8)).abs().max())
    assert rec.calls == 1 and rec.max_logit == pytest.approx(expected, rel=1e-6)
    assert attention_probe._open == []  # closed: later calls record nothing
    attention(q, k, v)
    assert rec.calls == 1


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_caps_the_logit_at_sqrt_head_dim(qk_norm):
    torch.manual_seed(0)
    net = randomize(MMDiT(**TINY, qk_norm=qk_norm)).eval()
    if qk_norm:  # unit RMSNorm scales: |q| = |k| = sqrt(d), so |q·k| / sqrt(d) <= sqrt(d)
        for name, p in net.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.data.fill_(1.0)
    z, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = {"pooled": torch.randn(2, 16), "tokens": torch.randn(2, 5, 32)}
    logits = []
    for scale in (1.0, 10.0):
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("qkv.weight"):
                    p.mul_(scale)
            with AttentionLogitRecorder() as rec:
                net(z, t, cond)
        assert rec.calls == 2  # one joint attention per block
        logits.append(rec.max_logit)
    head_dim = 32 // 2
    if qk_norm:
        assert max(logits) <= math.sqrt(head_dim) * (1 + 1e-4)
    else:
        assert logits[1] > 50 * logits[0] > 0  # q and k both scale by 10: the logit by ~100


def test_callback_logs_every_n_steps_of_a_real_fit(tmp_path):
    torch.manual_seed(0)
    model = RectifiedFlow(network=MMDiT(**TINY, qk_norm=False), lr=1e-3, warmup_steps=0)
    dm = RandomLatentsDataModule(channels=4, size=8, pooled_dim=16, context_dim=32, num_train=16, batch_size=4)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[AttentionLogitMonitor(every_n_steps=2)],
                        log_every_n_steps=1, limit_val_batches=0, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    trainer.fit(model, dm)
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    steps = [int(r["step"]) for r in rows if r.get("train/attn_logit_max")]
    assert steps == [0, 2, 4], steps
    assert all(float(r["train/attn_logit_max"]) > 0 for r in rows if r.get("train/attn_logit_max"))
    assert attention_probe._open == []
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        AttentionLogitMonitor(every_n_steps=0)
