"""`python -m flowmatch study`: plan expansion of the real study files, clear errors, and a tiny real study
(two 20-step fits through the real CLI into a temporary SQLite MLflow store) that is skipped when run
again and written up as a markdown table whose run ids are those of the real runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowmatch.cli.main import main as flowmatch_main
from flowmatch.studies import BUDGETS, StudyError, available_studies, load_study, plan

REPO = Path(__file__).resolve().parents[1]


# --- plans -------------------------------------------------------------------------------------------------
def test_the_studies_and_their_budgets():
    assert {"sd3_formulations", "fm_vs_vp", "reflow"} <= set(available_studies())
    for name in ("sd3_formulations", "fm_vs_vp", "reflow"):
        study = load_study(name)
        assert set(study.budgets) == set(BUDGETS)
        for budget in BUDGETS:
            runs = plan(study, budget)
            assert all(r.config_path.is_file() for r in runs)
            assert {r.seed for r in runs} == set(range(study.budgets[budget].seeds))
    assert len({r.variant.name for r in plan(load_study("sd3_formulations"), "small")}) == 8
    assert load_study("sd3_formulations").budgets["small"].seeds >= 3


def test_plan_expansion_variants_x_seeds_with_budget_overrides():
    study = load_study("sd3_formulations")
    runs = plan(study, "small")
    assert len(runs) == 8 * 3
    assert [r.index for r in runs] == list(range(1, 25)) and all(r.total == 24 for r in runs)
    # seed-major: every variant of seed 0 first, in the study file's order
    assert [r.seed for r in runs[:8]] == [0] * 8 and [r.variant.name for r in runs[:8]] == [v.name for v in study.variants]
    assert runs[3].describe() == "[4/24] sd3_formulations rf_lognorm_05_06 seed 0"
    lognorm = next(r for r in runs if r.variant.name == "rf_lognorm_1_06")
    assert lognorm.overrides["trainer.max_steps"] == 1500  # the budget's
    assert lognorm.overrides["model.init_args.time_sampler"]["init_args"] == {"m": 1.0, "s": 0.6}  # the variant's
    args = lognorm.override_args()
    assert args[args.index("--trainer.callbacks") + 1] == str(REPO / "configs" / "callbacks" / "toy2d_sd3_steps.yaml")
    vcos = next(r for r in runs if r.variant.name == "v_cos")
    assert vcos.config_path == REPO / "experiments" / "toy2d_eps.yaml" and vcos.overrides["model.init_args.prediction"] == "v"
    medium = plan(study, "medium")
    assert len(medium) == 8 * study.budgets["medium"].seeds and medium[0].overrides["trainer.max_steps"] == 5000
    assert len(plan(study, "small", seeds=5)) == 40  # --seeds N
    assert len(plan(study, "small", variants=["rf_uniform", "v_cos"])) == 6
    # the fingerprint depends on the variant's definition and the budget, not on the seed
    assert runs[0].fingerprint == runs[8].fingerprint != runs[1].fingerprint
    assert runs[0].fingerprint != medium[0].fingerprint
    reflow = plan(load_study("reflow"), "small")
    rf3 = next(r for r in reflow if r.variant.name == "rf3")
    assert (rf3.variant.couplings_from, rf3.variant.init_from) == ("rf2", "rf2") and rf3.reflow["num_pairs"] == 50000


def test_unknown_study_budget_and_bad_files_are_clear_errors(tmp_path, capsys):
    with pytest.raises(StudyError, match=r"unknown study 'nope'; the studies are: .*sd3_formulations"):
        load_study("nope")
    with pytest.raises(StudyError, match=r"unknown budget 'huge' for study sd3_formulations; its budgets are: small, medium, large"):
        plan(load_study("sd3_formulations"), "huge")
    assert flowmatch_main(["study", "nope"]) == 2
    assert "the studies are: " in capsys.readouterr().err
    assert flowmatch_main(["study", "reflow", "--budget", "huge"]) == 2
    assert "its budgets are: small, medium, large" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {REPO / 'experiments' / 'toy2d_rf.yaml'}\nvariants: {{a: {{overides: {{}}}}}}\nbudgets: {{small: {{}}}}\n")
    with pytest.raises(StudyError, match=r"variants.a: unknown key\(s\) overides"):
        load_study(str(bad))
    bad.write_text(f"base: {REPO / 'experiments' / 'toy2d_rf.yaml'}\nvariants: {{b: {{couplings_from: a}}}}\nbudgets: {{small: {{}}}}\n")
    with pytest.raises(StudyError, match=r"couplings_from 'a' must name a variant listed before it"):
        load_study(str(bad))
    with pytest.raises(StudyError, match=r"no variant 'zzz'"):
        plan(load_study("sd3_formulations"), "small", variants=["zzz"])


def test_dry_run_prints_the_plan_with_reflow_steps(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert flowmatch_main(["study", "reflow", "--dry-run", "--tracking_uri", uri, "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "[1/18] reflow rf1 seed 0 ... would run" in out
    assert "[2/18] reflow rf2 seed 0 ... would run (after rf1 at seed 0)" in out
    assert "couplings: python -m flowmatch reflow --ckpt '<rf1 final.ckpt>'" in out and "--num-pairs 50000 --solver euler --steps 100" in out
    assert "plan: 18 to run, 0 done" in out
    assert not (tmp_path / "w").exists()  # a dry run writes nothing


# --- a tiny real study ----------------------------------------------------------------------------------------
TINY = """
description: a tiny rectified flow and its 2-rectified flow (test)
experiment: tiny
base: {exp}/toy2d_rf.yaml
overrides:
  model.init_args.network.init_args.hidden: 32
  trainer.callbacks: [{{class_path: flowmatch.callbacks.PointSampleMetrics, init_args: {{samplers: [euler1, euler4], num_samples: 200, plot: false}}}}]
  trainer.enable_checkpointing: false
variants:
  one: {{label: 1-RF, overrides: {{data.init_args.num_train: 2000}}}}
  two: {{label: 2-RF, config: {exp}/toy2d_reflow.yaml, couplings_from: one, init_from: one, overrides: {{data.init_args.num_val: 500}}}}
reflow: {{num_pairs: 1500, solver: euler, steps: 10}}
budgets:
  small: {{seeds: 1, overrides: {{trainer.max_steps: 20, trainer.val_check_interval: 10, trainer.log_every_n_steps: 5}}}}
report:
  kind: ranking
  headline: [val/w2_euler1]
  columns: [{{metric: val/w2_euler1, label: 1 step, paper: few}}, {{metric: val/w2_euler4, label: 4 steps, paper: many}}]
  paper: {{ranks: {{two: {{all: 1, few: 1, many: 1}}, one: {{all: 2, few: 2, many: 2}}}}}}
  claims: [{{kind: top, variant: two, k: 1, text: 2-RF is best}}]
"""


def test_a_real_study_runs_resumes_and_is_written_up(tmp_path, monkeypatch, capsys):
    """1-RF, then its couplings (the real reflow command, from the 1-RF's final model in MLflow), then a 2-RF
    started from its weights; run again, nothing runs; the write-up's tables carry the real run ids."""
    from mlflow.tracking import MlflowClient

    from flowmatch.reflow import read_manifest

    monkeypatch.chdir(tmp_path)  # the fits write runs/ and mlruns/ into the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(TINY.format(exp=REPO / "experiments"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["study", str(study_file), "--budget", "small", "--tracking_uri", uri, "--out", str(tmp_path / "docs" / "results"),
            "--workdir", str(tmp_path / "w"), "--threads", "1"]
    assert flowmatch_main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert re.search(r"\[1/2\] tiny one seed 0 \.\.\.  \[elapsed 0:00:\d\d\]", out), out
    assert re.search(r"done in \d+ s: run [0-9a-f]{32} \(val/w2_euler1 [0-9.]+\)", out), out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    by = {r.data.tags["variant"]: r for r in runs}
    ids = {v: r.info.run_id for v, r in by.items()}
    tags = by["two"].data.tags
    assert (tags["study"], tags["seed"], tags["budget"], tags["study_label"]) == ("tiny", "0", "small", "2-RF")
    assert tags["couplings_from_run"] == tags["init_from_run"] == ids["one"]
    assert all(r.data.params["trainer.max_steps"] == "20" for r in runs)
    couplings = tmp_path / "w" / "tiny" / "small" / "couplings" / f"one_seed0_{ids['one'][:12]}"
    manifest = read_manifest(couplings)
    assert manifest["count"] == 1500 and manifest["seed"] == 0
    assert by["two"].data.params["data.path"] == str(couplings)
    assert by["two"].data.params["model.init_weights"].endswith(f"one_seed0_{ids['one'][:12]}/final.ckpt")

    # run again: both are skipped, nothing new in the store
    assert flowmatch_main(argv) == 0
    out = capsys.readouterr().out
    assert f"[1/2] tiny one seed 0 ... skip: finished run {ids['one']}" in out
    assert f"[2/2] tiny two seed 0 ... skip: finished run {ids['two']}" in out
    assert "0 ran, 2 already done, 0 failed" in out
    assert len(client.search_runs([exp.experiment_id])) == 2

    # the write-up: a markdown table per study, with the real run ids, and its plots beside it
    md = (tmp_path / "docs" / "results.md").read_text()
    assert md.startswith("# Results") and "<!-- study:tiny begin -->" in md and "<!-- study:tiny end -->" in md
    for variant, rid in ids.items():
        row = next(line for line in md.splitlines() if f"`{rid}`" in line)
        value = by[variant].data.metrics["val/w2_euler1"]
        assert row.startswith(f"| {'1-RF' if variant == 'one' else '2-RF'} | 0 | `{rid}` | 20 |") and f"{value:.3f}" in row
    assert "| variant | SD3 few | ours, 1 step | SD3 many | ours, 4 steps | SD3 all | ours, all |" in md
    assert re.search(r"\*\*(Agrees with SD3|Does not agree with SD3)", md) and "## Summary" in md
    for png in ("tiny_w2.png", "tiny_ranks.png"):
        assert (tmp_path / "docs" / "results" / png).stat().st_size > 5000
    # report-only rewrites the section in place; another study's section is kept
    (tmp_path / "docs" / "results.md").write_text(md + "\n<!-- study:other begin -->\n## Other\nkept\n<!-- study:other end -->\n")
    assert flowmatch_main(argv + ["--report-only"]) == 0
    md2 = (tmp_path / "docs" / "results.md").read_text()
    assert md2.count("<!-- study:tiny begin -->") == 1 and "kept" in md2 and ids["one"] in md2
    assert "(`other`): (no verdict)" in md2  # the summary lists every section
