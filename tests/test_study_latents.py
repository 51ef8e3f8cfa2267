"""Studies on the latents of their own autoencoders (``latents_from``): the spec accepts and rejects it with
clear errors, the dry run shows the prepare step, and a tiny real study (a conv autoencoder fit of a few steps,
`prepare` of the demo with its final model from MLflow, a generator fit of a few steps on those latents)
runs through the real CLI into a temporary SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowmatch.cli.main import main as flowmatch_main
from flowmatch.studies import StudyError, load_study, plan

REPO = Path(__file__).resolve().parents[1]
AE_D4 = REPO / "configs" / "autoencoder" / "ae_d4.yaml"
GEN = REPO / "experiments" / "latent_mmdit_small.yaml"


def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- the spec ------------------------------------------------------------------------------------------------
def test_the_latent_channels_study_plans_each_generator_after_its_autoencoder():
    study = load_study("latent_channels")
    names = [v.name for v in study.variants]
    assert names[:6] == ["ae_d4", "ae_d8", "ae_d16", "gen_d4", "gen_d8", "gen_d16"]
    for d in (4, 8, 16):
        gen = study.variant(f"gen_d{d}")
        assert gen.latents_from == f"ae_d{d}" and gen.depends_on == [f"ae_d{d}"]
        assert gen.overrides["model.init_args.network.init_args.in_channels"] == d
        assert gen.overrides["model.init_args.network.init_args.patch_size"] == 1  # d x 4 x 4 latents: 16 tokens
        ae = study.variant(f"ae_d{d}")
        assert ae.latents_from is None and ae.overrides["model.init_args.downsample"] == 8  # SD3's downsampling
    runs = plan(study, "small")
    assert len({r.seed for r in runs}) >= 2 and all(r.config_path.is_file() for r in runs)
    gen4 = next(r for r in runs if r.variant.name == "gen_d4")
    assert gen4.latents == {} and gen4.fingerprint != next(r for r in runs if r.variant.name == "gen_s2d16").fingerprint
    assert study.report["kind"] == "comparison"


def test_latents_from_is_checked_with_errors_that_name_the_variant_and_file(tmp_path):
    head = f"budgets: {{small: {{}}}}\nvariants:\n  ae: {{config: {AE_D4}}}\n  other: {{config: {GEN}}}\n"
    ok = load_study(_write(tmp_path, head + "  gen: {config: " + str(GEN) + ", latents_from: ae}\nlatents: {limit: 300}\n"))
    gen = ok.variant("gen")
    assert gen.latents_from == "ae" and ok.latents == {"limit": 300}
    run = next(r for r in plan(ok, "small") if r.variant.name == "gen")
    assert run.latents == {"limit": 300}
    assert next(r for r in plan(ok, "small") if r.variant.name == "other").latents == {}  # only latents_from variants get them

    path = _write(tmp_path, head + "  gen: {config: " + str(GEN) + ", latents_from: nope}\n")
    with pytest.raises(StudyError, match=rf"{path}: variants.gen: latents_from 'nope' must name a variant listed before it \(ae, other\)"):
        load_study(path)
    path = _write(tmp_path, head + "  gen: {config: " + str(GEN) + ", latents_from: other}\n")
    with pytest.raises(StudyError, match=r"variants.gen: latents_from 'other' must name an autoencoder fit .* but variant 'other' fits "
                                         r"flowmatch.objectives.RectifiedFlow \(config .*latent_mmdit_small.yaml\)"):
        load_study(path)
    path = _write(tmp_path, head + "  gen: {config: " + str(GEN) + ", latents_from: ae, couplings_from: other}\n")
    with pytest.raises(StudyError, match=r"variants.gen: latents_from and couplings_from both choose the training data"):
        load_study(path)
    path = _write(tmp_path, head + "  gen: {config: " + str(GEN) + ", latents_from: ae}\nlatents: {out: elsewhere}\n")
    with pytest.raises(StudyError, match=rf"{path}: latents: out is set by the study runner"):
        load_study(path)


def test_dry_run_shows_the_prepare_step_and_the_data_arguments(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert flowmatch_main(["study", "latent_channels", "--budget", "small", "--dry-run", "--tracking_uri", uri,
                           "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    latents = f"{tmp_path / 'w'}/latent_channels/small/latents/ae_d4_seed0_<run id>"
    assert "latent_channels gen_d4 seed 0 ... would run (after ae_d4 at seed 0)" in out
    assert f"    latents: python -m flowmatch prepare --source demo --out '{latents}' --autoencoder '<ae_d4 final.ckpt>' --progress false" in out
    assert "--model.init_args.network.init_args.in_channels 4" in out
    assert f"--data.init_args.data_dir '{latents}' --data.init_args.prepare_source null" in out
    assert "latent_channels gen_s2d16 seed 0 ... would run\n" in out  # the demo's own shards: no prepare step
    assert not (tmp_path / "w").exists()


# --- a tiny real study ---------------------------------------------------------------------------------------
TINY = """
description: a conv autoencoder and a generator on its latents (test)
experiment: tiny_latents
variants:
  ae:
    label: AE d=4
    config: {ae}
    overrides: {{model.init_args.base_channels: 8, data.init_args.batch_size: 16, trainer.max_epochs: 1,
                trainer.limit_train_batches: 3, trainer.limit_val_batches: 2, trainer.enable_checkpointing: false}}
  gen:
    label: MM-DiT on d=4
    config: {gen}
    latents_from: ae
    overrides:
      model.init_args.network.init_args.in_channels: 4
      model.init_args.network.init_args.hidden_size: 32
      data.init_args.batch_size: 8
      data.init_args.num_workers: 0
      data.init_args.steps_per_epoch: 10
      trainer.max_steps: 3
      trainer.enable_checkpointing: false
      trainer.callbacks:
        - {{class_path: flowmatch.callbacks.ImageSampleMetrics,
           init_args: {{samplers: [euler2], feature_network: {features}, feature_network_config: null, per_class: 1, plot: false}}}}
latents: {{limit: 120, shard_size: 64}}
budgets:
  small: {{seeds: 1}}
report: {{kind: comparison, columns: [{{metric: val/psnr, label: PSNR, higher: true}}]}}
"""


@pytest.fixture(scope="module")
def tiny_feature_network(tmp_path_factory):
    """A TorchScript feature network (images -> 4 features), so the generator's Fréchet distance needs no classifier."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(16, 4))
    path = tmp_path_factory.mktemp("features") / "features.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def test_a_generator_trains_on_the_latents_of_the_studys_autoencoder(tmp_path, monkeypatch, capsys, tiny_feature_network):
    """AE fit (logs model/final.ckpt) -> prepare --source demo --autoencoder <that final.ckpt> -> a generator fit whose
    data_dir is those shards (tagged latents_from_run) and whose evaluation decodes through the same autoencoder."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the fits write runs/ into the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study_file = _write(tmp_path, TINY.format(ae=AE_D4, gen=GEN, features=tiny_feature_network), "tiny_latents.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["study", study_file, "--budget", "small", "--tracking_uri", uri, "--workdir", str(tmp_path / "w"), "--threads", "1", "--no-report"]
    assert flowmatch_main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "1 failed" not in out and "2 ran, 0 already done, 0 failed" in out, out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_latents")
    by = {r.data.tags["variant"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(by) == {"ae", "gen"} and all(r.info.status == "FINISHED" for r in by.values())
    ae, gen = by["ae"], by["gen"]
    assert [a.path for a in client.list_artifacts(ae.info.run_id, "model")] == ["model/final.ckpt"]
    assert "val/psnr" in ae.data.metrics and "val/loss" in ae.data.metrics

    # the latents: written once from the AE run's final model, named by that run and the prepare options
    latents_root = tmp_path / "w" / "tiny_latents" / "small" / "latents"
    (latents,) = list(latents_root.iterdir())
    assert latents.name.startswith(f"ae_seed0_{ae.info.run_id[:12]}_")
    manifest = json.loads((latents / "manifest.json").read_text())
    assert manifest["latent"]["channels"] == 4
    spec = manifest["autoencoder"]["spec"]
    assert spec["kind"] == "conv" and spec["checkpoint"] == str(tmp_path / "w" / "tiny_latents" / "small" / "models"
                                                                 / f"ae_seed0_{ae.info.run_id[:12]}" / "final.ckpt")
    assert f"latents of ae seed 0 (run {ae.info.run_id[:12]}) written in" in out

    # the generator: tagged with its autoencoder's run, trained on those shards only, evaluated through the decoder
    assert gen.data.tags["latents_from_run"] == ae.info.run_id
    assert gen.data.params["data.data_dir"] == str(latents)
    assert gen.data.params["data.prepare_source"] == "None" and gen.data.params["model.network.in_channels"] == "4"
    for metric in ("val/loss", "val/fd_euler2", "val/fd_ratio_euler2", "val/fd_real"):
        assert metric in gen.data.metrics, sorted(gen.data.metrics)
    assert not (tmp_path / "data" / "demo").exists()  # never the demo's own shards

    # the generator again (a dry run of --force): its latents exist and would be reused
    assert flowmatch_main(argv + ["--variants", "gen", "--force", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"--out {latents.relative_to(tmp_path)} --autoencoder '<ae final.ckpt>' --progress false --limit 120 --shard_size 64 (exists: reused)" in out, out

    # the autoencoder fitted again: the generator's finished run is out of date (built from the old autoencoder run)
    assert flowmatch_main(argv + ["--variants", "ae", "--force"]) == 0
    capsys.readouterr()
    new_ae = next(r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]) if r.data.tags["variant"] == "ae")
    assert new_ae.info.run_id != ae.info.run_id
    assert flowmatch_main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"[1/2] tiny_latents ae seed 0 ... skip: finished run {new_ae.info.run_id}" in out
    assert (f"[2/2] tiny_latents gen seed 0 ... out of date: finished run {gen.info.run_id} was built from ae run "
            f"{ae.info.run_id[:12]}, not the current {new_ae.info.run_id[:12]}\n[2/2] tiny_latents gen seed 0 ... would run\n") in out, out
    assert f"latents/ae_seed0_{new_ae.info.run_id[:12]}_" in out  # new latents, from the new autoencoder run
