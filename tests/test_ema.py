"""The EMA callback with a real Lightning Trainer (single process): the average it keeps, the swap of EMA
weights into validation and back, its checkpoint entry, weight selection when loading and sampling,
and the joining of ZeRO-3 shards (per-rank slices of flattened, padded parameters)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from flowmatch.callbacks import EMA
from flowmatch.callbacks.ema import _local_part, consolidate_sharded_ema
from flowmatch.checkpoints import CheckpointError, read_checkpoint
from flowmatch.cli.main import main as flowmatch_main
from cli_utils import REPO
from flowmatch.networks.mlp import MLPVelocity
from flowmatch.objectives import RectifiedFlow
from flowmatch.objectives.loading import load_objective


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x0": x} for x in torch.randn(n, 2, generator=g)]


class Recorder(L.Callback):
    """Weights after every optimizer step, and the weights the model has during validation."""

    def __init__(self):
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.in_validation: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after_step.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.in_validation.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def _model() -> RectifiedFlow:
    """Built the way the CLI builds it (the config as hyper-parameters, the network from a factory), so its
    checkpoints carry their config and load_objective rebuilds them."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    network = {"class_path": "flowmatch.networks.mlp.MLPVelocity", "init_args": {"hidden": 16, "depth": 2, "time_dim": 8}}
    config = {"_class_path": "flowmatch.objectives.RectifiedFlow", "network": network, "time_sampler": None, "weighting": "native",
              "lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 0, "sample_shape": [2], "val_levels": 8,
              "val_seed": 0, "init_weights": None}
    with _given_hyperparameters_context(hparams=config, instantiator="lightning.pytorch.cli.instantiate_module"):
        return RectifiedFlow(lambda: MLPVelocity(hidden=16, depth=2, time_dim=8), lr=1e-2, sample_shape=[2])


def _fit(tmp_path, ema: EMA, steps: int = 6, **kw):
    torch.manual_seed(0)
    model = _model()
    rec = Recorder()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[ema, rec], default_root_dir=tmp_path, num_sanity_val_steps=0,
                        val_check_interval=steps, check_val_every_n_epoch=None, **kw)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit(model, DataLoader(_data(), batch_size=16), DataLoader(_data(32, 1), batch_size=16))
    return trainer, model, rec, initial


def test_average_swap_and_checkpoint(tmp_path):
    ema = EMA(decay=0.8, warmup=False)
    trainer, model, rec, initial = _fit(tmp_path, ema)
    # the average, recomputed by hand from the weights after each step
    expected = {n: v.clone() for n, v in initial.items()}
    for weights in rec.after_step:
        for n in expected:
            expected[n] = 0.8 * expected[n] + 0.2 * weights[n]
    assert ema.num_updates == 6
    for n, v in expected.items():
        assert torch.allclose(ema.ema[n], v, atol=1e-6), n
    # validation saw the EMA weights; afterwards the raw weights are back, bit for bit
    assert len(rec.in_validation) == 1
    for n, v in rec.in_validation[0].items():
        assert torch.allclose(v, ema.ema[n], atol=1e-7), n
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), rec.after_step[-1][n]), n
    # the checkpoint keeps both; load_objective picks the EMA by default
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    ckpt = read_checkpoint(path)
    assert ckpt["ema"]["decay"] == 0.8 and not ckpt["ema"]["sharded"] and ckpt["ema"]["num_updates"] == 6
    assert torch.equal(ckpt["state_dict"]["net.out.weight"], model.net.out.weight.detach())
    ema_model, raw_model = load_objective(path), load_objective(path, weights="raw")
    assert ema_model.loaded_weights == "ema" and raw_model.loaded_weights == "raw"
    assert torch.allclose(ema_model.net.out.weight, ema.ema["net.out.weight"], atol=1e-7)
    assert torch.equal(raw_model.net.out.weight, model.net.out.weight.detach())


def test_warmup_decay_and_update_every():
    ema = EMA(decay=0.999)
    assert ema.current_decay() == pytest.approx(1 / 10)
    ema.num_updates = 90
    assert ema.current_decay() == pytest.approx(91 / 100)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999
    with pytest.raises(ValueError):
        EMA(decay=1.0)
    with pytest.raises(ValueError):
        EMA(update_every=0)


def test_update_every_and_start_step(tmp_path):
    ema = EMA(decay=0.5, warmup=False, update_every=2, start_step=4)
    _fit(tmp_path, ema, steps=8)
    assert ema.num_updates == 3  # steps 4, 6, 8


def test_sample_command_weights(tmp_path, capsys):
    ema = EMA(decay=0.5, warmup=False)
    trainer, *_ = _fit(tmp_path, ema)
    trainer.save_checkpoint(tmp_path / "with_ema.ckpt")
    outs = {}
    for weights in ("auto", "ema", "raw"):
        out = tmp_path / weights
        assert flowmatch_main(["sample", "--ckpt", str(tmp_path / "with_ema.ckpt"), "--num", "64", "--steps", "2",
                               "--weights", weights, "--out", str(out)]) == 0
        info = json.loads((out / "samples.json").read_text())
        outs[weights] = (info["weights"], torch.from_numpy(__import__("numpy").load(out / "samples.npy")))
    assert outs["auto"][0] == outs["ema"][0] == "ema" and outs["raw"][0] == "raw"
    assert torch.equal(outs["auto"][1], outs["ema"][1]) and not torch.equal(outs["ema"][1], outs["raw"][1])

    # a checkpoint without an EMA: auto and raw use the weights, ema is a clear error
    ckpt = read_checkpoint(tmp_path / "with_ema.ckpt")
    del ckpt["ema"]
    torch.save(ckpt, tmp_path / "no_ema.ckpt")
    assert load_objective(tmp_path / "no_ema.ckpt").loaded_weights == "raw"
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_objective(tmp_path / "no_ema.ckpt", weights="ema")
    capsys.readouterr()
    assert flowmatch_main(["sample", "--ckpt", str(tmp_path / "no_ema.ckpt"), "--weights", "ema", "--out", str(tmp_path / "x")]) == 2
    assert "no EMA weights" in capsys.readouterr().err


class _FakeZeroParam(torch.nn.Parameter):
    pass


def _shard(full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    part = -(-full.numel() // world)
    flat = torch.cat([full.flatten(), full.new_zeros(part * world - full.numel())])
    return flat[rank * part : (rank + 1) * part].clone()


def test_zero3_shards_join_and_split():
    g = torch.Generator().manual_seed(0)
    full = {"net.a": torch.randn(3, 5, generator=g), "net.b": torch.randn(7, generator=g), "net.c": torch.randn(1, generator=g)}
    world = 3
    states = [{"sharded": True, "world_size": world, "rank": r, "decay": 0.9, "num_updates": 4,
               "state_dict": {n: _shard(t, world, r) for n, t in full.items()}, "shapes": {n: list(t.shape) for n, t in full.items()}}
              for r in range(world)]
    joined = consolidate_sharded_ema(list(reversed(states)))  # any order of files
    assert joined["sharded"] is False and joined["num_updates"] == 4
    for n, t in full.items():
        assert torch.equal(joined["state_dict"][n], t), n
    with pytest.raises(ValueError, match="3 ranks"):
        consolidate_sharded_ema(states[:2])
    # and back: a consolidated EMA gives each ZeRO-3 rank its own slice (resuming ZeRO-3 from a file)
    for r in range(world):
        p = torch.nn.Parameter(torch.empty(0))
        p.ds_tensor, p.ds_id = torch.empty(-(-full["net.a"].numel() // world)), 0
        assert torch.equal(_local_part(full["net.a"], p, r), _shard(full["net.a"], world, r))


def test_validate_uses_the_checkpoints_ema_by_default(tmp_path, monkeypatch):
    from flowmatch.cli.lightning_cli import FlowCLI

    trainer, *_ = _fit(tmp_path, EMA(decay=0.5, warmup=False))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", str(REPO / "experiments" / "toy2d_rf.yaml"), "--ckpt_path", "model.ckpt",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--model.init_args.network.init_args.hidden", "16", "--model.init_args.network.init_args.depth", "2",
            "--model.init_args.network.init_args.time_dim", "8", "--data.init_args.num_val", "256"]
    ema_cli = FlowCLI(args=[*args, "--trainer.callbacks", "null"])
    assert any(isinstance(cb, EMA) for cb in ema_cli.trainer.callbacks)  # added: the checkpoint has an EMA
    raw_cli = FlowCLI(args=[*args, "--trainer.callbacks", "flowmatch.callbacks.EMA", "--trainer.callbacks.use_for_eval", "false"])
    ema_loss, raw_loss = (float(c.trainer.callback_metrics["val/loss"]) for c in (ema_cli, raw_cli))
    assert ema_loss != raw_loss
    expected = {}
    for weights in ("ema", "raw"):  # the same numbers from the loaded models themselves
        model = load_objective(tmp_path / "model.ckpt", weights=weights)
        t = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        from flowmatch.data.toy2d import Toy2DDataModule

        dm = Toy2DDataModule(num_val=256)
        expected[weights] = float(t.validate(model, datamodule=dm, verbose=False)[0]["val/loss"])
    assert ema_loss == pytest.approx(expected["ema"], rel=1e-5) and raw_loss == pytest.approx(expected["raw"], rel=1e-5)
