"""A self-contained HTML report comparing MLflow runs (what `python -m flowmatch compare` writes).

The report reads only what runs log under the platform's stable metric names, so any set of runs
(any objective, model or data) compares:

* validation loss curves (``val/loss`` and ``train/loss`` against the step);
* the loss per t-level (``val/loss_t0.125`` ... ``val/loss_t1.000``, SD3 §5.3.3) at the last validation;
* sample quality against the number of function evaluations, from every pair ``val/<q>_<sampler>``
  and ``val/nfe_<sampler>`` (e.g. ``val/w2_euler8`` and ``val/nfe_euler8``), one panel per quality
  metric ``q`` (w2, sw2, mmd, fd, ...);
* the runs' logged sample images (key ``samples``) side by side, over the logged steps;
* a table of the params that differ between the runs (and their grouping tags) and of final metrics.

Figures are PNGs written to ``OUT/plots`` and ``OUT/images`` and embedded in ``OUT/index.html`` as
data URIs, so the page is one file that opens anywhere (no scripts or styles are fetched). A small
inline script records, once the page has loaded, how many of its images decoded (in
``<body data-images-loaded="k/n">``), which a headless browser test reads back.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_NAME = re.compile(r"^(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-fA-F-]+\.png$")
LEVEL_KEY = re.compile(r"^val/loss_t(?P<t>[0-9.]+)$")
NFE_KEY = re.compile(r"^val/nfe_(?P<sampler>.+)$")
SAMPLER_STEPS = re.compile(r"^(?P<solver>[a-z_]+?)(?P<steps>\d*)(?P<rest>(:.*)?)$")
GROUP_TAGS = ("objective", "model", "sampler", "dataset", "eval_samplers")


@dataclass
class RunData:
    run_id: str
    name: str
    experiment_id: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # latest values
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)]
    images: list[tuple[int, Path]] = field(default_factory=list)  # (step, local png), by step


class ReportError(RuntimeError):
    """Nothing to compare: unknown experiment, no matching runs, an unreachable store."""


# --- reading the runs ---------------------------------------------------------------------------------------
def fetch_runs(tracking_uri: str, experiment: str | None, filter_string: str = "", run_ids: list[str] | None = None,
               max_runs: int = 20, image_key: str = "samples", max_images: int = 4, workdir: Path | None = None) -> list[RunData]:
    """The runs to compare, with the metric histories and sample images the report draws."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        runs = []
        if experiment:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                names = sorted(e.name for e in client.search_experiments())
                raise ReportError(f"no experiment named {experiment!r} in {tracking_uri}; experiments there: {', '.join(names) or 'none'}")
            runs = client.search_runs([exp.experiment_id], filter_string=filter_string or "", max_results=max(max_runs, len(run_ids or [])),
                                      order_by=["attributes.start_time ASC"])
            if run_ids:
                runs = [r for r in runs if r.info.run_id in set(run_ids)]
        elif run_ids:
            runs = [client.get_run(rid) for rid in run_ids]
        else:
            raise ReportError("give --experiment NAME or --runs ID [ID ...]")
    except MlflowException as err:
        raise ReportError(f"could not read runs from {tracking_uri}: {str(err).splitlines()[0]}") from None
    if run_ids:
        missing = set(run_ids) - {r.info.run_id for r in runs}
        if missing:
            raise ReportError(f"runs not found{' in experiment ' + repr(experiment) if experiment else ''}: {', '.join(sorted(missing))}")
    if not runs:
        raise ReportError(f"no runs in experiment {experiment!r} match{' the filter ' + repr(filter_string) if filter_string else ''}")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="flowmatch-compare-"))
    out = []
    for r in runs[:max_runs] if not run_ids else runs:
        data = RunData(
            run_id=r.info.run_id, name=r.info.run_name or r.info.run_id[:8], experiment_id=r.info.experiment_id,
            status=r.info.status, tags={k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.source.git.commit"},
            params=dict(r.data.params), metrics=dict(r.data.metrics),
        )
        for key in data.metrics:
            if key in ("val/loss", "train/loss") or LEVEL_KEY.match(key):
                data.history[key] = sorted((m.step, m.value) for m in client.get_metric_history(data.run_id, key))
        data.images = _fetch_images(client, tracking_uri, data.run_id, image_key, max_images, workdir / data.run_id)
        out.append(data)
    return out


def _fetch_images(client, tracking_uri: str, run_id: str, key: str, max_images: int, dst: Path) -> list[tuple[int, Path]]:
    import mlflow.artifacts

    try:
        files = [a.path for a in client.list_artifacts(run_id, "images")]
    except Exception:
        return []
    found = []
    for path in files:
        m = IMAGE_NAME.match(path.rsplit("/", 1)[-1])
        if m and m.group("key") == key:
            found.append((int(m.group("step")), path))
    found.sort()
    if len(found) > max_images:  # evenly spaced over the run, always the last
        idx = sorted({round(i * (len(found) - 1) / (max_images - 1)) for i in range(max_images)}) if max_images > 1 else [len(found) - 1]
        found = [found[i] for i in idx]
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for step, path in found:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=tracking_uri)
        out.append((step, Path(local)))
    return out


# --- figures ---------------------------------------------------------------------------------------------------
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series_color(i: int) -> str:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    return palette[i % len(palette)]


def save_figure(fig, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def loss_curves(runs: list[RunData], path: Path) -> bytes | None:
    keys = [k for k in ("val/loss", "train/loss") if any(r.history.get(k) for r in runs)]
    if not keys:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, r in enumerate(runs):
            pts = r.history.get(key) or []
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if key == "val/loss" else None, ms=3, color=series_color(i), label=r.name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def level_losses(runs: list[RunData]) -> dict[str, list[tuple[float, float]]]:
    """run name -> [(t, final val/loss_t)] sorted by t."""
    out = {}
    for r in runs:
        pts = sorted((float(m.group("t")), v) for k, v in r.metrics.items() if (m := LEVEL_KEY.match(k)))
        if pts:
            out[r.run_id] = pts
    return out


def level_plot(runs: list[RunData], path: Path) -> bytes | None:
    levels = level_losses(runs)
    if not levels:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    for i, r in enumerate(runs):
        if r.run_id in levels:
            ts, vs = zip(*levels[r.run_id])
            ax.plot(ts, vs, marker="o", ms=4, color=series_color(i), label=r.name)
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_ylabel("validation loss at t (last validation)")
    ax.set_yscale("log")
    ax.set_title("loss per t-level (SD3 §5.3.3)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def quality_vs_nfe(runs: list[RunData]) -> dict[str, dict[str, list[tuple[float, float, str]]]]:
    """quality metric -> run id -> [(nfe, value, sampler)] from every val/<q>_<sampler> with a val/nfe_<sampler>."""
    out: dict[str, dict[str, list]] = {}
    for r in runs:
        samplers = {m.group("sampler"): v for k, v in r.metrics.items() if (m := NFE_KEY.match(k))}
        for key, value in r.metrics.items():
            if not key.startswith("val/") or key.startswith("val/nfe_"):
                continue
            for sampler, nfe in samplers.items():
                suffix = "_" + sampler
                if key.endswith(suffix):
                    q = key[len("val/"):-len(suffix)]
                    if q and not q.startswith("loss"):
                        out.setdefault(q, {}).setdefault(r.run_id, []).append((nfe, value, sampler))
    for per_run in out.values():
        for pts in per_run.values():
            pts.sort()
    return out


def _solver_family(sampler: str) -> str:
    """ "euler8" -> "euler", "heun4:cfg=2" -> "heun:cfg=2", "dopri5" -> "dopri5": one line per solver and options."""
    from flowmatch.sampling import SOLVERS

    head, sep, opts = sampler.partition(":")
    solver = next((name for name in sorted(SOLVERS, key=len, reverse=True) if head.startswith(name)), None)
    if solver is None:
        m = SAMPLER_STEPS.match(head)
        solver = m.group("solver") if m else head
    return solver + sep + opts


def quality_plot(runs: list[RunData], path: Path) -> bytes | None:
    data = quality_vs_nfe(runs)
    if not data:
        return None
    order = [q for q in ("fd", "fid", "w2", "sw2", "mmd") if q in data] + sorted(q for q in data if q not in ("fd", "fid", "w2", "sw2", "mmd"))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(order), figsize=(5.2 * len(order), 4.0), squeeze=False)
    for ax, q in zip(axes[0], order):
        for i, r in enumerate(runs):
            pts = data[q].get(r.run_id)
            if not pts:
                continue
            by_solver: dict[str, list] = {}
            for nfe, v, sampler in pts:
                by_solver.setdefault(_solver_family(sampler), []).append((nfe, v, sampler))
            for j, (solver, spts) in enumerate(sorted(by_solver.items())):
                ax.plot([p[0] for p in spts], [p[1] for p in spts], marker="osD^v"[j % 5], ms=5, color=series_color(i),
                        linestyle="-" if len(spts) > 1 else "none", label=f"{r.name} {solver}")
        ax.set_xscale("log")
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_title(f"val/{q} vs NFE (lower is better)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# --- tables -------------------------------------------------------------------------------------------------------
def differing_params(runs: list[RunData]) -> list[tuple[str, list[str]]]:
    keys = sorted(set().union(*(r.params for r in runs)))
    rows = []
    for key in keys:
        values = [r.params.get(key, "—") for r in runs]
        if len(runs) == 1 or len(set(values)) > 1:
            rows.append((key, values))
    return rows


def final_metrics(runs: list[RunData]) -> list[tuple[str, list[str]]]:
    keys = sorted(set().union(*(r.metrics for r in runs)), key=lambda k: (not k.startswith("val/loss"), k))
    return [(k, [_fmt(r.metrics.get(k)) for r in runs]) for k in keys if k != "epoch"]


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.3e}"


# --- HTML ------------------------------------------------------------------------------------------------------------
def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(header: list[str], rows: list[tuple[str, list[str]]], cls: str) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr><th>" + esc(k) + "</th>" + "".join(f"<td>{esc(str(v))}</td>" for v in vals) + "</tr>" for k, vals in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { background: #f3f3f3; } tbody th { font-weight: normal; font-family: monospace; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.samples td { text-align: center; } .samples img { max-width: 640px; display: block; }
code { background: #f5f5f5; padding: 1px 4px; } .muted { color: #777; font-size: 12px; }
"""

CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
  var s = document.getElementById('render-status');
  if (s) { s.textContent = ok + ' of ' + imgs.length + ' images rendered'; }
});
"""


def render_html(runs: list[RunData], figures: dict[str, bytes | None], image_files: dict[str, list[tuple[int, str, bytes]]],
                title: str, tracking_uri: str, experiment: str | None, filter_string: str) -> str:
    esc = html.escape
    names = [r.name for r in runs]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<p class='muted'>{len(runs)} runs from {esc(tracking_uri)}"
             + (f", experiment <code>{esc(experiment)}</code>" if experiment else "")
             + (f", filter <code>{esc(filter_string)}</code>" if filter_string else "") + ". <span id='render-status'></span></p>"]
    group = [(tag, [r.tags.get(tag, "—") for r in runs]) for tag in GROUP_TAGS]
    group += [("run id", [r.run_id for r in runs]), ("status", [r.status for r in runs]),
              ("git commit", [r.tags.get("mlflow.source.git.commit", "—")[:12] for r in runs])]
    parts.append("<h2>Runs</h2>" + _table(["", *names], group, "runs"))
    sections = [("curves", "Validation loss curves", "<code>val/loss</code> (SD3's average over t-levels but t = 1) and <code>train/loss</code> against the step."),
                ("levels", "Loss per t-level", "<code>val/loss_t*</code> at the last validation, each level with fixed noise."),
                ("quality", "Sample quality vs. NFE", "final <code>val/&lt;metric&gt;_&lt;sampler&gt;</code> against <code>val/nfe_&lt;sampler&gt;</code>; one line per run and solver.")]
    for key, heading, note in sections:
        parts.append(f"<h2>{heading}</h2><p class='muted'>{note}</p>")
        png = figures.get(key)
        parts.append(f"<img class='plot' alt='{esc(heading)}' src='{_data_uri(png)}'>" if png else "<p class='muted'>(no run logged these metrics)</p>")
    parts.append("<h2>Samples</h2>")
    if any(image_files.values()):
        steps = sorted({s for files in image_files.values() for s, _, _ in files})
        head = "".join(f"<th>step {s}</th>" for s in steps)
        rows = []
        for r in runs:
            by_step = {s: (name, png) for s, name, png in image_files.get(r.run_id, [])}
            cells = "".join(f"<td><img alt='{esc(r.name)} step {s}' src='{_data_uri(by_step[s][1])}'></td>" if s in by_step else "<td>—</td>" for s in steps)
            rows.append(f"<tr><th>{esc(r.name)}</th>{cells}</tr>")
        parts.append(f"<table class='samples'><thead><tr><th>run</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    else:
        parts.append("<p class='muted'>(no run logged sample images)</p>")
    parts.append("<h2>Params that differ</h2>" + _table(["param", *names], differing_params(runs), "params"))
    parts.append("<h2>Final metrics</h2>" + _table(["metric", *names], final_metrics(runs), "metrics"))
    ids = ",".join(f'"{r.run_id}"' for r in runs)
    exps = ",".join(sorted({f'"{r.experiment_id}"' for r in runs}))
    ui = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    parts.append("<h2>The same view in the MLflow UI</h2><p>"
                 + (f"Open <code>mlflow ui --backend-store-uri {esc(tracking_uri)}</code>, then " if not tracking_uri.startswith("http") else "")
                 + f"<a href='{esc(ui)}/#/compare-runs?runs=[{esc(ids)}]&amp;experiments=[{esc(exps)}]'>compare these runs</a>: chart "
                 "<code>val/loss</code> and <code>train/loss</code> against the step, the <code>val/loss_t*</code> metrics as a "
                 "parallel-coordinates or bar chart, <code>val/w2_*</code> beside <code>val/nfe_*</code> in a scatter plot, and "
                 "the <code>samples</code> images in each run's Artifacts / images tab.</p>")
    parts.append(f"<script>{CHECK_SCRIPT}</script></body></html>")
    return "".join(parts)


def build_report(out_dir: str | Path, tracking_uri: str, experiment: str | None = None, filter_string: str = "",
                 run_ids: list[str] | None = None, max_runs: int = 20, title: str | None = None, max_images: int = 4) -> tuple[Path, list[RunData]]:
    """Read the runs, draw the figures, write OUT/index.html (+ plots/*.png, images/*.png).

    Returns (the page's path, the runs it compares)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flowmatch-compare-") as tmp:
        runs = fetch_runs(tracking_uri, experiment, filter_string, run_ids, max_runs, max_images=max_images, workdir=Path(tmp))
        figures = {"curves": loss_curves(runs, out / "plots" / "loss_curves.png"),
                   "levels": level_plot(runs, out / "plots" / "loss_per_t.png"),
                   "quality": quality_plot(runs, out / "plots" / "quality_vs_nfe.png")}
        images: dict[str, list[tuple[int, str, bytes]]] = {}
        for r in runs:
            for step, local in r.images:
                name = f"images/{_slug(r.name)}-{r.run_id[:8]}-step{step}.png"
                png = local.read_bytes()
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(png)
                images.setdefault(r.run_id, []).append((step, name, png))
    page = render_html(runs, figures, images, title or f"Comparison of {len(runs)} runs" + (f": {experiment}" if experiment else ""),
                       tracking_uri, experiment, filter_string)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index, runs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] or "run"


def summary(runs: list[RunData]) -> str:
    """One line per run for the terminal."""
    lines = []
    for r in runs:
        loss = r.metrics.get("val/loss")
        lines.append(f"  {r.name:<24} {r.run_id[:12]}  val/loss {_fmt(loss) if loss is not None and not math.isnan(loss) else '—'}")
    return "\n".join(lines)
