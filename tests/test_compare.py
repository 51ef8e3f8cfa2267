"""`python -m flowmatch compare` on real (SQLite) MLflow stores.

* A store of runs logged under the platform's metric names by hand, where every number is known: the figures,
  images and tables, which way is better per metric and the bold best, guided and unguided samplers as separate
  lines at their real NFE, seeds folded into mean ± std, the difference column, the YAML config diff, filters
  and errors.
* A store made by the CLI itself: the tiny main job's `fit` and its `test` (which logs into the fit's run), and a
  study's two variants at two seeds each; the report has one column per trained model, the test metrics under
  the fit, the seeds folded, no empty rows, and renders in headless Chromium (skipped where it is not installed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from flowmatch.cli.main import main as flowmatch_main

REPO = Path(__file__).resolve().parents[1]
LEVELS = [k / 8 for k in range(1, 9)]
SAMPLERS = (("euler1", 1), ("euler8", 8), ("euler8_cfg2", 16), ("dopri5", 62))  # NFE: network evaluations per sample


def _log_run(client, exp_id: str, name: str, objective: str, lr: str, scale: float, tags: dict | None = None) -> str:
    run = client.create_run(exp_id, run_name=name, tags={"objective": objective, "model": "MLPVelocity", "dataset": "Toy2DDataModule",
                                                          "sampler": "UniformTime()", **(tags or {})})
    rid = run.info.run_id
    for key, value in {"model.lr": lr, "data.target": "8gaussians", "model.class_path": f"flowmatch.objectives.{objective}"}.items():
        client.log_param(rid, key, value)
    config = {"seed_everything": int((tags or {}).get("seed", 0)), "model": {"class_path": f"flowmatch.objectives.{objective}",
              "init_args": {"lr": float(lr)}}, "data": {"target": "8gaussians"}}
    client.log_text(rid, yaml.safe_dump(config), "config.yaml")
    for step in (10, 20, 30):
        client.log_metric(rid, "train/loss", scale * (2 - step / 30), step=step)
        client.log_metric(rid, "val/loss", scale * (1.5 - step / 40), step=step)
        for t in LEVELS:
            client.log_metric(rid, f"val/loss_t{t:.3f}", scale * (0.2 + t) / (step / 10), step=step)
        for sampler, nfe in SAMPLERS:
            client.log_metric(rid, f"val/w2_{sampler}", scale / nfe ** 0.5 + 0.1, step=step)
            client.log_metric(rid, f"val/caption_acc_{sampler}", 1 - scale / (nfe + 1), step=step)
            client.log_metric(rid, f"val/nfe_{sampler}", nfe, step=step)
        client.log_metric(rid, "val/fd_real", 4.0, step=step)
        img = np.full((48, 64, 3), 255, dtype=np.uint8)
        img[8:40, 8 + step : 24 + step] = (30, 90, 200) if objective == "RectifiedFlow" else (200, 60, 30)
        client.log_image(rid, img, key="samples", step=step)
    client.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("cmp", artifact_location=str(root / "artifacts"))
    ids = [_log_run(client, exp_id, "rf_a", "RectifiedFlow", "0.002", 1.0), _log_run(client, exp_id, "fm_b", "FlowMatching", "0.001", 0.7)]
    seeds = client.create_experiment("seeds", artifact_location=str(root / "artifacts_seeds"))
    for variant, scale in (("small_lr", 1.0), ("big_lr", 0.5)):
        for seed, jitter in ((0, 0.0), (1, 0.2)):
            ids.append(_log_run(client, seeds, f"s.{variant}.seed{seed}", "RectifiedFlow", "0.001" if variant == "small_lr" else "0.004",
                                scale + jitter, tags={"study": "s", "variant": variant, "seed": str(seed), "budget": "small"}))
    legacy = client.create_experiment("legacy", artifact_location=str(root / "artifacts_legacy"))
    fit = _log_run(client, legacy, "old_fit", "RectifiedFlow", "0.002", 1.0, tags={"stage": "fit"})
    test = client.create_run(legacy, run_name="old_fit", tags={"stage": "test"}).info.run_id  # how older releases logged `test`
    client.log_metric(test, "test/w2_euler8", 0.42, step=0)
    client.set_terminated(test)
    return uri, ids + [fit, test]


def _section(page: str, heading: str) -> str:
    return page.split(f"<h2>{heading}</h2>")[1].split("<h2>")[0]


def _rows(section: str) -> dict[str, list[str]]:
    """metric -> its cells (direction arrow first) of the metrics table."""
    out = {}
    for row in re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", section):
        out[row[0]] = re.findall(r"<td[^>]*>(.*?)</td>", row[1])
    return out


def test_report_contents(store, tmp_path, capsys):
    uri, ids = store
    out = tmp_path / "report"
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "cmp", "--out", str(out)]) == 0
    assert "compared 2 runs in 2 columns" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    for name in ("loss_curves.png", "loss_per_t.png", "quality_vs_nfe.png"):
        assert (out / "plots" / name).stat().st_size > 5000
    assert not (out / "plots" / "test_quality_vs_nfe.png").exists() and "(test)" not in page  # no test logged: no empty section
    assert len(list((out / "images").glob("*.png"))) == 2 * 3  # every logged step of both runs (max_images 4)
    assert page.count("data:image/png;base64,") == 3 + 6  # self-contained: everything embedded
    assert "<script src" not in page and "<link" not in page and "http://" not in page.split("The same view")[0]
    for rid in ids[:2]:
        assert rid in page
    params = _section(page, "Params that differ")
    assert "model.lr" in params and "model.class_path" in params and "data.target" not in params
    config = _section(page, "Config that differs")
    assert "class_path: flowmatch.objectives.RectifiedFlow" in config and "lr: 0.002" in config and "8gaussians" not in config
    rows = _rows(_section(page, "Metrics"))
    # which way is better, from the one table: caption adherence up, distances, losses and NFE down, the floor neither
    assert rows["val/caption_acc_euler8"][0] == "↑" and rows["val/w2_euler8"][0] == "↓" and rows["val/loss"][0] == "↓"
    assert rows["val/nfe_dopri5"][0] == "↓" and rows["val/fd_real"][0] == ""
    # the best of each row in bold: fm_b (scale 0.7) has the lower W2 and the higher caption adherence
    assert rows["val/w2_euler8"][1] == f"{1 / 8 ** 0.5 + 0.1:.4g}" and rows["val/w2_euler8"][2] == f"<b>{0.7 / 8 ** 0.5 + 0.1:.4g}</b>"
    assert rows["val/caption_acc_euler8"][2].startswith("<b>") and not rows["val/caption_acc_euler8"][1].startswith("<b>")
    assert not any(c.startswith("<b>") for c in rows["val/fd_real"])  # no direction: no best
    # rf_a and fm_b train different objectives: their losses measure different things, so no loss row has a best
    assert not any(c.startswith("<b>") for key in ("val/loss", "val/loss_t0.500", "train/loss") for c in rows[key])
    assert "no loss row names a best" in page
    assert "compare-runs?runs=" in page  # the same view in the MLflow UI
    samples = _section(page, "Samples")
    assert samples.split("<tbody>")[1].count("<tr>") == 2 and "validation step 30" in samples


def test_guided_and_unguided_samplers_are_separate_lines_at_their_network_evaluations(store):
    from flowmatch.tracking.report import quality_vs_nfe, solver_family
    from flowmatch.tracking.report_runs import fetch_runs, group_runs

    assert [solver_family(s) for s in ("euler25", "euler25_cfg1p5", "euler1_cfg1p5_shift3", "dopri5", "dopri5_cfg1p5", "heun4:cfg=2")] == \
        ["euler", "euler_cfg1p5", "euler_cfg1p5_shift3", "dopri5", "dopri5_cfg1p5", "heun:cfg=2"]
    uri, ids = store
    columns = group_runs(fetch_runs(uri, "cmp", max_images=0))
    data = quality_vs_nfe(columns)
    assert set(data) == {"w2", "caption_acc"}  # not fd_real (the floor) nor nfe
    pts = data["w2"]["rf_a"]
    assert [(nfe, s) for nfe, _, _, s in pts] == [(1.0, "euler1"), (8.0, "euler8"), (16.0, "euler8_cfg2"), (62.0, "dopri5")]
    assert pts[0][1] == pytest.approx(1.1)
    families = {solver_family(s) for _, _, _, s in pts}
    assert families == {"euler", "euler_cfg2", "dopri5"}  # euler8 and euler8_cfg2 are never joined by a line


def test_panels_say_which_way_is_better(store, tmp_path, monkeypatch):
    from flowmatch.tracking import report
    from flowmatch.tracking.report_runs import fetch_runs, group_runs

    uri, _ = store
    columns = group_runs(fetch_runs(uri, "cmp", max_images=0))
    titles, labels = [], []

    def keep(fig, path):
        for ax in fig.axes:
            titles.append(ax.get_title())
            labels.extend(ax.get_legend_handles_labels()[1])
        return b"png"

    monkeypatch.setattr(report, "save_figure", keep)
    report.quality_plot(columns, tmp_path / "q.png")
    assert titles == ["val/caption_acc vs NFE (higher is better)", "val/w2 vs NFE (lower is better)"]
    assert "rf_a: euler_cfg2" in labels and "rf_a: euler" in labels and "fm_b: dopri5" in labels
    titles.clear()
    report.loss_curves(columns, tmp_path / "c.png")
    assert titles == ["val/loss (lower is better)", "train/loss (lower is better)"]


def test_seeds_fold_into_mean_and_spread_and_two_columns_diff(store, tmp_path, capsys):
    uri, ids = store
    out = tmp_path / "seeds"
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--study", "s", "--budget", "small", "--diff", "small_lr", "big_lr",
                           "--out", str(out)]) == 0
    assert "compared 4 runs in 2 columns" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    runs = _section(page, "Runs")
    assert "<th>small_lr</th><th>big_lr</th>" in runs and "0, 1" in runs
    rows = _rows(_section(page, "Metrics"))
    # val/loss at step 30 = scale * 0.75: small_lr seeds 1.0 and 1.2, big_lr 0.5 and 0.7
    assert rows["val/loss"][1] == f"{0.75 * 1.1:.4g} ± {np.std([0.75, 0.9], ddof=1):.4g} (n=2)"
    assert rows["val/loss"][2] == f"<b>{0.75 * 0.6:.4g} ± {np.std([0.375, 0.525], ddof=1):.4g} (n=2)</b>"
    # the difference column, big_lr - small_lr, with which way it went
    assert rows["val/loss"][3] == f"{0.75 * 0.6 - 0.75 * 1.1:+.4g} ({100 * (0.6 - 1.1) / 1.1:+.1f}%) better"
    assert rows["val/caption_acc_euler1"][3].endswith(" better") and rows["val/fd_real"][3] == "+0 (+0.0%)"
    config = _section(page, "Config that differs")
    assert "lr: 0.001" in config and "lr: 0.004" in config and "seed_everything" not in config  # seeds differ within columns
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "seeds", "--variant", "big_lr", "--group_by", "none",
                           "--out", str(tmp_path / "one")]) == 0
    assert "compared 2 runs in 2 columns" in capsys.readouterr().out


def test_a_separate_test_run_of_an_older_release_folds_into_its_fit(store, tmp_path, capsys):
    uri, ids = store
    out = tmp_path / "legacy"
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "legacy", "--out", str(out)]) == 0
    assert "in 1 columns" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert _rows(_section(page, "Metrics"))["test/w2_euler8"][1] == "0.42"
    assert f"{ids[-1][:8]} (a separate run of an older release, matched by name)" in _section(page, "Runs")


def test_filters_and_errors(store, tmp_path, capsys):
    uri, ids = store
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "cmp", "--out", str(tmp_path / "a"),
                           "--tag", "objective=FlowMatching"]) == 0
    assert "compared 1 runs" in capsys.readouterr().out
    assert ids[1] in (tmp_path / "a" / "index.html").read_text() and ids[0] not in (tmp_path / "a" / "index.html").read_text()
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "cmp", "--out", str(tmp_path / "a2"),
                           "--filter", "params.`model.lr` = '0.002'"]) == 0
    assert "compared 1 runs" in capsys.readouterr().out
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--runs", ids[0], "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "cmp", "seeds", "--out", str(tmp_path / "both")]) == 0
    assert "compared 6 runs in 4 columns" in capsys.readouterr().out
    for argv, message in [
        (["--experiment", "nope"], "error: no experiment named 'nope'"),
        (["--experiment", "cmp", "--tag", "objective=EpsDDPM"], "error: no runs in experiment 'cmp' match"),
        (["--experiment", "cmp", "--tag", "objective"], "error: --tag 'objective': expected KEY=VALUE"),
        (["--experiment", "seeds", "--variant", "huge_lr"], "error: no runs of variant huge_lr; the variants there: big_lr, small_lr"),
        (["--experiment", "cmp", "--budget", "small"], "error: --budget needs --study"),
        (["--experiment", "cmp", "--diff", "rf_a", "nope"], "error: --diff 'nope' names no column of the report; columns: rf_a, fm_b"),
        ([], "error: give --experiment NAME, --study NAME, --tag KEY=VALUE or --runs ID"),
    ]:
        assert flowmatch_main(["compare", "--tracking_uri", uri, "--out", str(tmp_path / "x"), *argv]) == 2, argv
        assert capsys.readouterr().err.startswith(message), argv


# --- a store the CLI made: the tiny main job, its test, and a study's variants at two seeds --------------------------------
STUDY = """
description: two learning rates of a small rectified flow, two seeds each (test of the comparison report)
experiment: seeds
base: {exp}/toy2d_rf.yaml
overrides:
  model.init_args.network.init_args.hidden: 32
  trainer.callbacks: [{{class_path: flowmatch.callbacks.PointSampleMetrics, init_args: {{samplers: [euler1, euler4], num_samples: 200, plot: false}}}}]
  trainer.enable_checkpointing: false
variants:
  lr_low: {{label: lr 1e-3, overrides: {{model.init_args.lr: 0.001}}}}
  lr_high: {{label: lr 4e-3, overrides: {{model.init_args.lr: 0.004}}}}
budgets:
  small: {{seeds: 2, overrides: {{trainer.max_steps: 20, trainer.val_check_interval: 10, trainer.log_every_n_steps: 5}}}}
report:
  kind: comparison
  columns: [{{metric: val/w2_euler4, label: W2 4 steps}}]
"""


@pytest.fixture(scope="module")
def cli_store(main_job, main_job_tested, tmp_path_factory):
    """A copy of the tiny main job's store (its fit, tested) plus a real two-variant, two-seed study."""
    root = tmp_path_factory.mktemp("cli_store")
    shutil.copy(main_job["work"] / "mlflow.db", root / "mlflow.db")  # (artifacts stay where the fit wrote them)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    study = root / "two_lrs.yaml"
    study.write_text(STUDY.format(exp=REPO / "experiments"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert flowmatch_main(["study", str(study), "--budget", "small", "--tracking_uri", uri, "--out", str(root / "results"),
                               "--workdir", str(root / "w"), "--threads", "1"]) == 0
    return uri, root


def test_report_of_a_fit_its_test_and_seeded_variants(cli_store, tmp_path, capsys):
    uri, _ = cli_store
    out = tmp_path / "report"
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "demo_digits", "seeds", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "compared 5 runs in 3 columns" in printed, printed
    page = (out / "index.html").read_text()
    assert "<th>mmdit_d16</th><th>lr 1e-3</th><th>lr 4e-3</th>" in _section(page, "Runs")  # one column per trained model
    rows = _rows(_section(page, "Metrics"))
    # the test metrics under the fit's column, beside its validation metrics
    for key in ("test/caption_acc_euler2_cfg3", "test/fd_ratio_dopri5", "test/nfe_euler2_cfg3", "val/caption_acc_euler25_cfg1p5"):
        assert rows[key][1] not in ("—", ""), key
    assert rows["test/nfe_euler2_cfg3"][1] == "4" and rows["val/nfe_euler25_cfg1p5"][1] == "50"  # guidance: 2 per step
    assert rows["test/caption_acc_euler2_cfg3"][0] == "↑" and rows["test/fd_ratio_dopri5"][0] == "↓"
    assert rows["val/w2_euler4"][2].endswith("(n=2)") or rows["val/w2_euler4"][2].endswith("(n=2)</b>")
    assert rows["val/w2_euler4"][1] == "—"  # the image model has no W2
    samples = _section(page, "Samples")
    assert samples.split("<tbody>")[1].count("<tr>") == 1 and "test step 16" in samples  # only the column with images: no empty rows
    assert (out / "plots" / "test_quality_vs_nfe.png").stat().st_size > 5000
    _renders_in_chromium(out, tmp_path)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def _renders_in_chromium(out: Path, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium)")
    from PIL import Image

    page = (out / "index.html").read_text()
    expected = page.count("<img ")
    url = (out / "index.html").as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    # the DOM after load: the report's own script counts the images the browser decoded (naturalWidth > 0)
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--virtual-time-budget=10000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded, dom.stdout[:2000]
    assert loaded.group(1) == loaded.group(2) == str(expected)
    assert f"{expected} of {expected} images rendered" in dom.stdout
    # and a screenshot of the rendered page is not blank: the plots and images are drawn
    shot = tmp_path / "shot.png"
    run = subprocess.run([CHROMIUM, *FLAGS, *profile, "--window-size=1400,2600", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.std() > 20 and (pixels.mean(axis=2) < 128).mean() > 0.005


def test_report_of_the_hand_logged_store_renders_in_headless_chromium(store, tmp_path):
    uri, _ = store
    out = tmp_path / "report"
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "cmp", "seeds", "--out", str(out)]) == 0
    _renders_in_chromium(out, tmp_path)
