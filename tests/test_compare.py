"""`python -m flowmatch compare` on a real (SQLite) MLflow store holding runs logged under the platform's
metric names: the report's figures, images and tables, filters, errors, and the page rendered by a real
browser (headless Chromium, skipped where it is not installed)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from flowmatch.cli.main import main as flowmatch_main

LEVELS = [k / 8 for k in range(1, 9)]


def _log_run(client, exp_id: str, name: str, objective: str, lr: str, scale: float) -> str:
    run = client.create_run(exp_id, run_name=name, tags={"objective": objective, "model": "MLPVelocity", "dataset": "Toy2DDataModule",
                                                          "sampler": "UniformTime()"})
    rid = run.info.run_id
    for key, value in {"model.lr": lr, "data.target": "8gaussians", "model.class_path": f"flowmatch.objectives.{objective}"}.items():
        client.log_param(rid, key, value)
    for step in (10, 20, 30):
        client.log_metric(rid, "train/loss", scale * (2 - step / 30), step=step)
        client.log_metric(rid, "val/loss", scale * (1.5 - step / 40), step=step)
        for t in LEVELS:
            client.log_metric(rid, f"val/loss_t{t:.3f}", scale * (0.2 + t) / (step / 10), step=step)
        for sampler, nfe in (("euler1", 1), ("euler8", 8), ("dopri5", 62)):
            client.log_metric(rid, f"val/w2_{sampler}", scale / nfe ** 0.5 + 0.1, step=step)
            client.log_metric(rid, f"val/nfe_{sampler}", nfe, step=step)
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
    return uri, ids


def test_report_contents(store, tmp_path, capsys):
    uri, ids = store
    out = tmp_path / "report"
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "cmp", "--out", str(out)]) == 0
    assert "compared 2 runs" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    for name in ("loss_curves.png", "loss_per_t.png", "quality_vs_nfe.png"):
        assert (out / "plots" / name).stat().st_size > 5000
    assert len(list((out / "images").glob("*.png"))) == 2 * 3  # every logged step of both runs (max_images 4)
    assert page.count("data:image/png;base64,") == 3 + 6  # self-contained: everything embedded
    assert "<script src" not in page and "<link" not in page and "http://" not in page.split("The same view")[0]
    for rid in ids:
        assert rid in page
    # the params table holds the params that differ, not those all runs share
    params = page.split("Params that differ")[1].split("Final metrics")[0]
    assert "model.lr" in params and "model.class_path" in params and "data.target" not in params
    metrics = page.split("Final metrics")[1]
    assert "val/w2_euler8" in metrics and "val/loss_t0.125" in metrics
    assert "compare-runs?runs=" in page  # the same view in the MLflow UI


def test_quality_vs_nfe_pairs_metrics_by_sampler(store):
    from flowmatch.tracking.report import fetch_runs, quality_vs_nfe

    uri, ids = store
    runs = fetch_runs(uri, "cmp", max_images=0)
    data = quality_vs_nfe(runs)
    assert set(data) == {"w2"}
    pts = data["w2"][ids[0]]
    assert [(nfe, s) for nfe, _, s in pts] == [(1.0, "euler1"), (8.0, "euler8"), (62.0, "dopri5")]
    assert pts[0][1] == pytest.approx(1.1)


def test_filters_and_errors(store, tmp_path, capsys):
    uri, ids = store
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "cmp", "--out", str(tmp_path / "a"),
                           "--filter", "tags.objective = 'FlowMatching'"]) == 0
    assert "compared 1 runs" in capsys.readouterr().out
    assert ids[1] in (tmp_path / "a" / "index.html").read_text() and ids[0] not in (tmp_path / "a" / "index.html").read_text()
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--runs", ids[0], "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "nope", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no experiment named 'nope'") and "cmp" in err
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "cmp", "--out", str(tmp_path / "d"),
                           "--filter", "tags.objective = 'EpsDDPM'"]) == 2
    assert "no runs" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(store, tmp_path):
    from PIL import Image

    uri, _ = store
    out = tmp_path / "report"
    assert flowmatch_main(["compare", "--tracking_uri", uri, "--experiment", "cmp", "--out", str(out)]) == 0
    url = (out / "index.html").as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    # the DOM after load: the report's own script counts the images the browser decoded (naturalWidth > 0)
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--virtual-time-budget=10000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded, dom.stdout[:2000]
    assert loaded.group(1) == loaded.group(2) == str(3 + 6)
    assert "9 of 9 images rendered" in dom.stdout
    # and a screenshot of the rendered page is not blank: the plots and images are drawn
    shot = tmp_path / "shot.png"
    run = subprocess.run([CHROMIUM, *FLAGS, *profile, "--window-size=1400,2600", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.std() > 20 and (pixels.mean(axis=2) < 128).mean() > 0.005
