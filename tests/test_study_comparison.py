"""The `comparison` analysis of a study's results and its claims, on hand-made run records (no MLflow):
means and standard deviations against closed forms, higher-is-better claims, claims among the variants that
have a metric, the paper column, and the plots (bars, or lines against a swept setting)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flowmatch.studies import load_study
from flowmatch.studies.results import RunRecord, check_claim, comparison_section


def _study(tmp_path: Path, report: dict):
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump({
        "description": "a comparison", "experiment": "x", "base": str(Path(__file__).resolve().parents[1] / "experiments" / "toy2d_rf.yaml"),
        "variants": {"a": {"label": "A"}, "b": {"label": "B"}, "ae": {"label": "AE"}},
        "budgets": {"small": {"seeds": 3}, "medium": {"seeds": 1}}, "report": report}))
    return load_study(str(path))


def _runs() -> dict:
    runs = {}
    # "acc" is higher-is-better, "fd" lower-is-better; the autoencoder variant only has "psnr"
    acc = {"a": [0.9, 0.8, 0.7], "b": [0.5, 0.6, 0.4]}
    fd = {"a": [1.0, 2.0, 3.0], "b": [4.0, 4.0, 4.0]}
    for v in ("a", "b"):
        for s in range(3):
            runs[(v, s)] = RunRecord(f"{v}{s}", v, s, {"val/acc": acc[v][s], "val/fd": fd[v][s]}, {}, 1.0)
    for s in range(3):
        runs[("ae", s)] = RunRecord(f"ae{s}", "ae", s, {"val/psnr": 20.0 + s}, {}, 1.0)
    return runs


def test_higher_is_better_claims_and_factors():
    runs, seeds = _runs(), [0, 1, 2]
    ok, text = check_claim({"kind": "better", "metric": "val/acc", "variant": "a", "than": "b", "higher": True}, runs, seeds)
    assert ok is True and "a 0.800, b 0.500" in text and "3/3 seeds" in text  # means shown as measured, not negated
    ok, _ = check_claim({"kind": "better", "metric": "val/acc", "variant": "b", "than": "a", "higher": True}, runs, seeds)
    assert ok is False
    ok, _ = check_claim({"kind": "better", "metric": "val/acc", "variant": "a", "than": "b"}, runs, seeds)  # lower-is-better reading
    assert ok is False
    # factor, higher is better: a / b per seed = 1.8, 1.333, 1.75
    ok, text = check_claim({"kind": "factor", "metric": "val/acc", "variant": "a", "than": "b", "min_factor": 1.5, "higher": True}, runs, seeds)
    assert ok is True and "factor 1.628" in text and "(>= 1.5 in 2/3 seeds)" in text
    # factor, lower is better: b / a per seed = 4, 2, 1.333 -> mean 2.444
    ok, text = check_claim({"kind": "factor", "metric": "val/fd", "variant": "a", "than": "b", "min_factor": 2}, runs, seeds)
    assert ok is True and "factor 2.444" in text


def test_top_and_last_rank_only_the_variants_that_have_the_metric():
    runs, seeds = _runs(), [0, 1, 2]
    ok, text = check_claim({"kind": "top", "metric": "val/acc", "variant": "a", "higher": True}, runs, seeds)
    assert ok is True and "position 1 of 2" in text  # the autoencoder variant, without val/acc, is not ranked
    ok, _ = check_claim({"kind": "last", "metric": "val/fd", "variant": "b"}, runs, seeds)
    assert ok is True
    ok, text = check_claim({"kind": "top", "metric": "val/psnr", "variant": "ae", "among": ["ae"]}, runs, seeds)
    assert ok is True and "position 1 of 1" in text


def test_comparison_section_table_paper_column_and_plots(tmp_path):
    report = {"kind": "comparison", "title": "T", "paper_name": "the paper",
              "columns": [{"metric": "val/acc", "label": "accuracy", "higher": True}, {"metric": "val/fd", "label": "FD"},
                          {"metric": "val/psnr", "label": "PSNR", "higher": True}],
              "paper": {"source": "made up", "values": {"ae": {"PSNR": 28.62}}},
              "claims": [{"kind": "better", "metric": "val/acc", "variant": "a", "than": "b", "higher": True, "text": "A adheres better"}]}
    study = _study(tmp_path, report)
    sec = comparison_section(study, _runs(), tmp_path, "results")
    body = "\n".join(sec.body)
    assert "| variant | seeds | accuracy ↑ | FD ↓ | PSNR ↑ | paper: PSNR |" in body
    assert "| A | 3 | 0.800 ± 0.100 | 2.000 ± 1.000 | — | — |" in body
    assert "| AE | 3 | — | — | 21.0 ± 1.0 | 28.62 |" in body
    assert "- A adheres better: ✓" in body and "**Agrees with the paper**" in body
    assert [p.name for p in sec.pngs] == ["cmp_final.png"] and sec.pngs[0].stat().st_size > 5000

    report["sweep"] = {"x_label": "lr", "series": {"one": {"a": 0.001, "b": 0.01}}}
    sec = comparison_section(_study(tmp_path, report), _runs(), tmp_path, "results")
    assert [p.name for p in sec.pngs] == ["cmp_sweep.png"] and sec.pngs[0].stat().st_size > 5000


def test_unknown_claim_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown claim kind"):
        check_claim({"kind": "best"}, _runs(), [0, 1, 2])


@pytest.mark.parametrize("name", ["architectures", "qk_norm_bf16"])
def test_the_digit_studies_plan_real_configs(name):
    from flowmatch.studies import BUDGETS, plan

    study = load_study(name)
    assert set(study.budgets) == set(BUDGETS) and study.report["kind"] == "comparison"
    for budget in BUDGETS:
        runs = plan(study, budget)
        assert all(r.config_path.is_file() for r in runs)
        for r in runs:  # every YAML file an override names exists
            assert all(study.resolve(v).is_file() for v in r.overrides.values() if isinstance(v, str) and v.endswith(".yaml"))
    names = {v.name for v in study.variants}
    for claim in study.report["claims"]:
        assert set([claim["variant"]] + ([claim["than"]] if isinstance(claim["than"], str) else claim["than"])) <= names


def test_results_read_from_several_stores(tmp_path):
    """A study sharded over parallel processes, each with its own SQLite store, is written up from all of them."""
    from mlflow.tracking import MlflowClient

    from flowmatch.studies import plan
    from flowmatch.studies.results import collect

    study = _study(tmp_path, {"kind": "comparison", "columns": [{"metric": "val/fd", "label": "FD"}]})
    fp = {r.variant.name: r.fingerprint for r in plan(study, "small", seeds=1)}
    uris, ids = [], {}
    for i, variant in enumerate(("a", "b")):
        uri = f"sqlite:///{tmp_path / f'shard{i}.db'}"
        client = MlflowClient(uri)
        exp = client.create_experiment("x")
        run = client.create_run(exp, tags={"study": "cmp", "variant": variant, "seed": "0", "budget": "small", "study_fingerprint": fp[variant]})
        for step, value in ((9, 3.0 + i), (19, 2.0 + i)):
            client.log_metric(run.info.run_id, "val/fd", value, step=step)
        client.set_terminated(run.info.run_id)
        uris.append(uri)
        ids[variant] = run.info.run_id
    runs = collect(study, "small", ",".join(uris), history_keys=["val/fd"])
    assert {k: r.run_id for k, r in runs.items()} == {("a", 0): ids["a"], ("b", 0): ids["b"]}
    assert runs[("b", 0)].metrics["val/fd"] == 3.0 and runs[("b", 0)].history["val/fd"] == [(10, 4.0), (20, 3.0)]


def test_diverged_runs_are_results_and_crashes_are_not(tmp_path):
    """A FAILED run that logged train/diverged_at_step counts (a 'loss diverged' column; the worst value in claims);
    a FAILED run without it (a crash) does not."""
    from mlflow.tracking import MlflowClient

    from flowmatch.studies import plan
    from flowmatch.studies.results import collect
    from flowmatch.studies.runner import finished_runs

    report = {"kind": "comparison", "columns": [{"metric": "val/fd", "label": "FD"}],
              "claims": [{"kind": "better", "metric": "val/fd", "variant": "a", "than": "b", "text": "a beats b"}]}
    study = _study(tmp_path, report)
    fp = {r.variant.name: r.fingerprint for r in plan(study, "small", seeds=1)}
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("x")

    def run(variant, seed, status, metrics):
        r = client.create_run(exp, tags={"study": "cmp", "variant": variant, "seed": str(seed), "budget": "small", "study_fingerprint": fp[variant]})
        for k, v in metrics.items():
            client.log_metric(r.info.run_id, k, v, step=0)
        client.set_terminated(r.info.run_id, status=status)
        return r.info.run_id

    run("a", 0, "FINISHED", {"val/fd": 1.0})
    run("a", 1, "FINISHED", {"val/fd": 1.2})
    run("b", 0, "FINISHED", {"val/fd": 0.5})
    diverged = run("b", 1, "FAILED", {"train/diverged_at_step": 77.0})
    run("ae", 0, "FAILED", {"train/loss": 1.0})  # a crash
    runs = collect(study, "small", uri)
    assert set(runs) == {("a", 0), ("a", 1), ("b", 0), ("b", 1)} and runs[("b", 1)].run_id == diverged
    done = finished_runs(uri, study, "small")
    assert done[("b", 1)].diverged and not done[("a", 0)].diverged and ("ae", 0) not in done
    sec = comparison_section(study, runs, tmp_path, "results")
    body = "\n".join(sec.body)
    assert "| variant | seeds | loss diverged (at step) | FD ↓ |" in body
    assert "| B | 2 | 1 (77) | 0.500 |" in body and "| A | 2 | 0 | 1.100 ± 0.141 |" in body
    # seed 1: b diverged, so a wins there; seed 0: b wins; means: a 1.1 vs b inf
    assert "- a beats b: ≈" in body and "holds in 1/2 seeds" in body  # holds on the means, not in every seed


def test_a_study_keeps_a_diverged_fit_as_its_result(tmp_path, monkeypatch, capsys):
    """The real CLI: a fit whose loss blows up (lr 1e4) is recorded, reported as diverged, and not re-run."""
    from flowmatch.cli.main import main as flowmatch_main

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study_file = tmp_path / "blowup.yaml"
    study_file.write_text(yaml.safe_dump({
        "description": "a learning rate far too high", "experiment": "blowup", "base": str(repo / "experiments" / "toy2d_rf.yaml"),
        "overrides": {"trainer.max_steps": 30, "trainer.callbacks": None},
        "variants": {"hot": {"label": "lr 1e4", "overrides": {"model.init_args.lr": 10000.0}}},
        "budgets": {"small": {"seeds": 1}},
        "report": {"kind": "comparison", "columns": [{"metric": "val/loss", "label": "validation loss"}]}}))
    argv = ["study", str(study_file), "--budget", "small", "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}",
            "--out", str(tmp_path / "results"), "--workdir", str(tmp_path / "w"), "--threads", "1"]
    assert flowmatch_main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "diverged in" in out and "loss diverged at step" in out and "1 ran, 0 already done, 0 failed" in out
    assert "| lr 1e4 | 1 | 1 (" in (tmp_path / "results.md").read_text()
    assert flowmatch_main(argv + ["--no-report"]) == 0
    assert "skip: finished run" in capsys.readouterr().out


def test_a_larger_budget_gets_its_own_section_and_plots(tmp_path):
    from mlflow.tracking import MlflowClient

    from flowmatch.studies import plan
    from flowmatch.studies.results import write_results

    study = _study(tmp_path, {"kind": "comparison", "title": "Cmp", "columns": [{"metric": "val/fd", "label": "FD"}],
                              "discussion": {"small": "CPU runs say this.", "medium": "GPU runs say that."}})
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("x")
    for budget in ("small", "medium"):
        fp = plan(study, budget, seeds=1)[0].fingerprint
        r = client.create_run(exp, tags={"study": "cmp", "variant": "a", "seed": "0", "budget": budget, "study_fingerprint": fp})
        client.log_metric(r.info.run_id, "val/fd", 1.0 if budget == "small" else 2.0)
        client.set_terminated(r.info.run_id)
    out = tmp_path / "docs" / "results"
    write_results(study, "small", uri, out)
    md, pngs = write_results(study, "medium", uri, out)
    text = md.read_text()
    assert "<!-- study:cmp begin -->" in text and "<!-- study:cmp_medium begin -->" in text and "## Cmp (budget medium)" in text
    assert [p.name for p in pngs] == ["cmp_medium_final.png"] and (out / "cmp_final.png").is_file()
    assert "--budget medium --report-only" in text
    small, medium = text.split("<!-- study:cmp_medium begin -->")
    assert "CPU runs say this." in small and "GPU runs say that." not in small and "GPU runs say that." in medium


def test_training_section_reads_image_quality_metrics_per_sampler(tmp_path):
    """A `kind: training` report with `quality: [{prefix, label}]` (FD and caption adherence on images): one table per
    quality with a column per sampler that logged an NFE (caption_acc_syn_* is not a sampler), plots per quality."""
    from flowmatch.studies.results import training_section

    report = {"kind": "training", "title": "T", "quality": [{"prefix": "fd_ratio", "label": "FD / floor"},
                                                            {"prefix": "caption_acc", "label": "caption adherence"}]}
    study = _study(tmp_path, report)
    runs = {}
    for v, base in (("a", 1.0), ("b", 2.0)):
        for s in range(2):
            m = {"val/loss": 0.1 * base}
            for sampler, nfe in (("euler4", 4), ("ddim4", 4), ("euler25", 25), ("dopri5", 150 + 10 * s)):
                m |= {f"val/fd_ratio_{sampler}": base + s, f"val/caption_acc_{sampler}": 0.5 / base, f"val/nfe_{sampler}": nfe}
            m["val/caption_acc_syn_euler4"] = 0.3
            runs[(v, s)] = RunRecord(f"{v}{s}", v, s, m, {}, 1.0)
    body = "\n".join(training_section(study, runs, tmp_path, "results").body)
    assert ("| variant | `val/loss` | FD / floor euler4 | FD / floor euler25 | FD / floor ddim4 | FD / floor dopri5 | dopri5 NFE |"
            in body), body
    assert "| A | 0.100 ± 0 | 1.500 ± 0.707 | 1.500 ± 0.707 | 1.500 ± 0.707 | 1.500 ± 0.707 | 155 ± 7 |" in body, body
    assert "| variant | caption adherence euler4 | caption adherence euler25 | caption adherence ddim4 | caption adherence dopri5 | dopri5 NFE |" in body
    assert "| B | 0.250 ± 0 | 0.250 ± 0 |" in body and "syn" not in body
    pngs = sorted(p.name for p in tmp_path.glob("cmp_*_vs_nfe.png"))
    assert pngs == ["cmp_caption_acc_vs_nfe.png", "cmp_fd_ratio_vs_nfe.png"]
    assert all((tmp_path / p).stat().st_size > 5000 for p in pngs)


@pytest.mark.parametrize("name, kind", [("sd3_formulations_digits", "ranking"), ("fm_vs_vp_digits", "training")])
def test_the_digit_formulation_studies_plan_real_configs(name, kind):
    from flowmatch.callbacks.common import parse_samplers
    from flowmatch.studies import BUDGETS, plan

    study = load_study(name)
    assert set(study.budgets) == set(BUDGETS) and study.report["kind"] == kind and study.budgets["small"].seeds == 3
    for budget in BUDGETS:
        for r in plan(study, budget):
            assert r.config_path.is_file()
            assert all(study.resolve(v).is_file() for v in r.overrides.values() if isinstance(v, str) and v.endswith(".yaml"))
            assert r.overrides["model.init_args.lr"] == 0.002  # the main job's optimizer for every formulation
    # every metric the report reads is one the callbacks log: val/<quantity>_<name of a configured sampler>
    callbacks = yaml.safe_load(study.resolve(plan(study, "small")[0].overrides["trainer.callbacks"]).read_text())
    names = {s.name for s in parse_samplers(next(c for c in callbacks if c["class_path"].endswith("ImageSampleMetrics"))["init_args"]["samplers"])}
    metrics = [c["metric"] for c in study.report.get("columns", [])] + [c["metric"] for c in study.report["claims"] if "metric" in c]
    metrics += study.report.get("curves", []) + study.report["headline"]
    for metric in metrics:
        assert metric.split("/", 1)[1].split("_", 2)[-1] in names or metric.rsplit("_", 1)[-1] in names, metric


def test_ranking_section_on_metrics_of_both_directions(tmp_path):
    """A `kind: ranking` report on FD (lower is better) and caption adherence (higher is better): ranks follow each
    column's direction, the text says so, and the values plot has one panel per column (<study>_metrics.png)."""
    from flowmatch.studies.results import ranking_section

    report = {"kind": "ranking", "title": "R",
              "columns": [{"metric": "val/fd_ratio_euler5", "label": "FD", "paper": "5 steps"},
                          {"metric": "val/caption_acc_euler5", "label": "captions", "paper": "5 steps", "higher": True}],
              "paper": {"ranks": {"a": {"all": 1.0, "5 steps": 1.0}, "b": {"all": 2.0, "5 steps": 2.0}, "ae": {"all": 3.0, "5 steps": 3.0}}}}
    study = _study(tmp_path, report)
    runs = {}
    for v, fd, acc in (("a", 1.0, 0.9), ("b", 2.0, 0.5), ("ae", 3.0, 0.95)):  # a best FD, ae best captions
        for s in range(2):
            runs[(v, s)] = RunRecord(f"{v}{s}", v, s, {"val/fd_ratio_euler5": fd + 0.1 * s, "val/caption_acc_euler5": acc}, {}, 1.0)
    sec = ranking_section(study, runs, tmp_path, "results")
    body = "\n".join(sec.body)
    assert "the highest where higher is better" in body and "lowest W2" not in body
    assert "| A | 1.00 | 1.00 ± 0 | 1.00 | 2.00 ± 0 |" in body, body   # a: first in FD, second in captions
    assert "| AE | 3.00 | 3.00 ± 0 | 3.00 | 1.00 ± 0 |" in body, body  # ae: last in FD, first in captions
    assert sorted(p.name for p in sec.pngs) == ["cmp_metrics.png", "cmp_ranks.png"]
    assert all(p.stat().st_size > 5000 for p in sec.pngs)
