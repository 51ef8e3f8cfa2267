"""LoRA and partial fine-tuning as runs of the platform, through the real CLI (subprocesses) and real Lightning:

* an imported (tiny, random) diffusers SD3 fine-tuned with a LoRA adapter by `fit`: the fine-tuning summary is
  printed, only the adapter trains, the optimizer holds state for the adapter alone, the EMA averages the adapter
  alone, the checkpoint holds the adapter and not the base; `export-lora` writes a file that diffusers, given the
  same base, turns into the same output; `export-lora --merge` writes full weights that diffusers reads with the
  same output; a changed or missing base is refused by name;
* partial fine-tuning (``trainable`` patterns) with the frozen base held in bfloat16: only the matched
  parameters change, they and their optimizer state stay float32;
* an adapter run resumes exactly (the resume test of full runs, on the toy 2-D flow with a LoRA).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from cli_utils import REPO, run_cli
from helpers_sd3 import diffusers_sd3_out, our_sd3_out, random_sd3, rel_err
from flowmatch.adapters.diffusers_lora import LORA_FILE
from flowmatch.checkpoints import CheckpointError

diffusers = pytest.importorskip("diffusers")

def _ok(run) -> str:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def _config(tmp_path: Path, network: dict, init_args: dict, callbacks: list) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"class_path": "flowmatch.objectives.RectifiedFlow",
                  "init_args": {"network": network, "lr": 1e-2, **init_args}},
        "data": {"class_path": "helpers_latents.RandomLatentsDataModule",
                 "init_args": {"channels": 4, "size": 8, "pooled_dim": 16, "context_dim": 32, "num_tokens": 5, "batch_size": 4}},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": callbacks},
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_lora_fit_export_and_diffusers(tmp_path):
    from flowmatch.objectives.loading import load_objective

    base_dir = tmp_path / "base_transformer"
    random_sd3(base_dir, seed=0)
    base = tmp_path / "base.ckpt"
    _ok(run_cli(["import-sd3", str(base_dir), "--out", str(base)], tmp_path))
    network = torch.load(base, weights_only=True)["hyper_parameters"]["network"]
    adapter = {"rank": 4, "alpha": 8}
    ema = [{"class_path": "flowmatch.callbacks.EMA", "init_args": {"decay": 0.5}}]
    config = _config(tmp_path, network, {"init_weights": str(base), "adapter": adapter}, ema)
    out = _ok(run_cli(["fit", "--config", config, "--trainer.max_steps", "4", "--trainer.logger", "false",
                       "--trainer.limit_val_batches", "0"], tmp_path))
    assert "fine-tuning MMDiT" in out and "LoRA adapters" in out and "% of" in out

    ckpt_path = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    model = load_objective(ckpt_path, weights="raw")
    adapter_params = {"net." + n: p for n, p in model.net.named_parameters() if ".lora_" in n}
    # defaults for MM-DiT: q/k/v and output projections of both streams (7 layers in a 2-block model)
    assert len(adapter_params) == 14
    # the checkpoint holds the adapter and not the base; the EMA and the optimizer cover the adapter alone
    assert not [k for k in ckpt["state_dict"] if ".lora_" not in k and k.startswith("net.")]
    assert set(ckpt["state_dict"]) == set(adapter_params)
    assert set(ckpt["ema"]["state_dict"]) == set(adapter_params)
    moments = ckpt["optimizer_states"][0]["state"].values()
    assert sum(s["exp_avg"].numel() for s in moments) == sum(p.numel() for p in adapter_params.values())
    assert ckpt["frozen_base"]["init_weights"] == str(base)
    assert any(ckpt["state_dict"][k].abs().sum() > 0 for k in adapter_params if "lora_B" in k)  # it trained

    # export-lora -> diffusers loads the adapter on the same base: the same output
    run = run_cli(["export-lora", str(ckpt_path), "--out", "lora", "--weights", "raw"], tmp_path)
    assert "7 MMDiT layers -> 14 diffusers layers" in _ok(run)  # qkv -> to_q/k/v; the last text stream's kv -> add_k/v_proj
    ref = diffusers.SD3Transformer2DModel.from_pretrained(base_dir)
    ref.load_lora_adapter(str(tmp_path / "lora"), prefix="transformer", weight_name=LORA_FILE)
    ours = our_sd3_out(model.net)
    assert rel_err(our_sd3_out(load_objective(base).net), ours) > 1e-3
    assert rel_err(diffusers_sd3_out(ref), ours) <= 1e-4
    # ... and --merge writes full weights diffusers reads, with the same output
    _ok(run_cli(["export-lora", str(ckpt_path), "--out", "merged", "--merge", "--weights", "raw"], tmp_path))
    merged = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "merged")
    assert rel_err(diffusers_sd3_out(merged), ours) <= 1e-4
    # a second export into the same directory is refused without --force
    run = run_cli(["export-lora", str(ckpt_path), "--out", "lora"], tmp_path)
    assert run.returncode == 1 and "not empty" in run.stderr

    # the base is read again from init_weights: another base there, or none, is refused by name
    shutil.move(base, tmp_path / "base_moved.ckpt")
    with pytest.raises(CheckpointError, match=r"frozen base is read from init_weights .*base\.ckpt, which does not exist"):
        load_objective(ckpt_path)
    random_sd3(tmp_path / "other_transformer", seed=1)
    _ok(run_cli(["import-sd3", str(tmp_path / "other_transformer"), "--out", str(base)], tmp_path))
    with pytest.raises(CheckpointError, match="fine-tuned on a base with fingerprint"):
        load_objective(ckpt_path)


def test_partial_fine_tuning_with_a_bfloat16_base(tmp_path):
    """Only the final layer and the adaLN modulations train; the frozen rest is held in bfloat16."""
    from flowmatch.networks.mmdit import MMDiT
    from flowmatch.objectives import RectifiedFlow

    from helpers_latents import RandomLatentsDataModule

    torch.manual_seed(0)
    net = MMDiT(depth=2, hidden_size=32, num_heads=2, in_channels=4, pooled_dim=16, context_dim=32, pos_embed_max_size=8)
    base = tmp_path / "base.ckpt"
    torch.save({"state_dict": {"net." + k: v for k, v in net.state_dict().items()}}, base)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = RectifiedFlow(net, lr=1e-2, init_weights=str(base), trainable=[r"final_layer\..*", r".*adaLN_modulation.*"],
                          frozen_dtype="bfloat16")
    trained = {n for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("final_layer.") or "adaLN_modulation" in n for n in trained)
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in model.net.parameters())
    trainer = L.Trainer(accelerator="cpu", max_steps=3, precision="bf16-mixed", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, RandomLatentsDataModule(batch_size=4))
    after = model.net.state_dict()
    for name, value in before.items():
        changed = not torch.equal(after[name].float(), value.to(after[name].dtype).float())
        assert changed == (name in trained), name
    moments = trainer.optimizers[0].state.values()
    assert sum(s["exp_avg"].numel() for s in moments) == sum(p.numel() for p in model.net.parameters() if p.requires_grad)
    assert all(s["exp_avg"].dtype == torch.float32 for s in moments)

    # without autocast, float32 layers fed by bfloat16 ones cannot run: the error says what to set
    model = RectifiedFlow(MMDiT(depth=2, hidden_size=32, num_heads=2, in_channels=4, pooled_dim=16, context_dim=32,
                                pos_embed_max_size=8), init_weights=str(base), trainable=[r"final_layer\..*"], frozen_dtype="bfloat16")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="set trainer.precision to bf16-mixed"):
        trainer.fit(model, RandomLatentsDataModule(batch_size=4))
    with pytest.raises(ValueError, match=r"trainable pattern 'decoder\\\\..\*' matches no parameter"):
        RectifiedFlow(MMDiT(depth=2, hidden_size=32, num_heads=2, in_channels=4, pooled_dim=16, context_dim=32,
                            pos_embed_max_size=8), trainable=[r"decoder\..*"])
    with pytest.raises(ValueError, match="frozen_dtype applies to fine-tuning runs"):
        RectifiedFlow(net, frozen_dtype="bfloat16")


TOY = REPO / "experiments" / "toy2d_rf.yaml"
TOY_RUN = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--data.init_args.num_train", "1024",
           "--trainer.val_check_interval", "7", "--model.init_args.warmup_steps", "30", "--trainer.max_steps", "31",
           "--checkpoint.every_n_train_steps", "9", "--checkpoint.save_top_k", "-1"]


def test_lora_run_resumes_exactly(tmp_path):
    """18 steps, checkpoint, resume: at step 27 the same adapter, EMA and optimizer moments as the run in one go."""
    _ok(run_cli(["fit", "--config", TOY, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                 "--trainer.max_steps", "20", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", "base"], tmp_path))
    base = tmp_path / "base" / "checkpoints" / "last.ckpt"
    # a pattern that matches nothing: one line naming it, no traceback, exit 1
    bad = run_cli(["fit", "--config", TOY, "--trainer.logger", "false", "--model.init_args.init_weights", str(base),
                   "--model.init_args.adapter.target_modules", "[nothing]", "--trainer.default_root_dir", "bad"], tmp_path)
    assert bad.returncode == 1 and "error: adapter target pattern 'nothing' matches no linear layer of MLPVelocity" in bad.stderr
    assert "Traceback" not in bad.stderr
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump([{"class_path": "flowmatch.callbacks.EMA", "init_args": {"decay": 0.9}}]))
    lora = ["--model.init_args.init_weights", str(base), "--model.init_args.adapter.rank", "4",
            "--model.init_args.adapter.dropout", "0.1", "--trainer.callbacks", str(callbacks)]
    _ok(run_cli(["fit", "--config", TOY, *TOY_RUN, *lora, "--trainer.default_root_dir", "a"], tmp_path))
    resume_from = tmp_path / "a" / "checkpoints" / "step0000018.ckpt"
    _ok(run_cli(["fit", "--config", TOY, *TOY_RUN, *lora, "--trainer.default_root_dir", "b", "--ckpt_path", str(resume_from)],
                tmp_path))
    a, b = (torch.load(tmp_path / r / "checkpoints" / "step0000027.ckpt", weights_only=True) for r in "ab")
    assert set(a["state_dict"]) == set(b["state_dict"]) and all(".lora_" in k for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        assert torch.allclose(v, b["state_dict"][k], atol=1e-6, rtol=0), k
    for k, v in a["ema"]["state_dict"].items():
        assert torch.allclose(v, b["ema"]["state_dict"][k], atol=1e-6, rtol=0), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for key in sa:
            assert torch.allclose(sa[key], sb[key], atol=1e-6, rtol=0), key

    # merged into a standalone flowmatch checkpoint (any network; no diffusers layout needed): it loads without the
    # base and computes what base + adapter computed
    from flowmatch.objectives.loading import load_objective

    lora_ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    _ok(run_cli(["export-lora", str(lora_ckpt), "--out", "merged.ckpt", "--merge", "--format", "flowmatch"], tmp_path))
    z, t = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), torch.rand(64)
    with torch.no_grad():
        expected = load_objective(lora_ckpt).net(z, t)
    shutil.move(base, tmp_path / "base_moved.ckpt")
    merged = torch.load(tmp_path / "merged.ckpt", weights_only=True)
    assert not [k for k in merged["state_dict"] if ".lora_" in k or "base_layer" in k] and "frozen_base" not in merged
    with torch.no_grad():
        got = load_objective(tmp_path / "merged.ckpt").net(z, t)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    refused = run_cli(["export-lora", str(lora_ckpt), "--out", "again.ckpt", "--format", "flowmatch"], tmp_path)
    assert refused.returncode == 1 and "add --merge" in refused.stderr
