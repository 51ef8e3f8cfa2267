"""A self-contained HTML report comparing MLflow runs (what `python -m flowmatch compare` writes).

The report reads only what runs log under the platform's stable metric names, so any set of runs
(any objective, model or data) compares. Its columns are training runs: a run's ``validate`` / ``test``
log into it (flowmatch.tracking.evaluation_run), and the seeds of one study variant fold into one
column of mean ± spread (flowmatch.tracking.report_runs). It shows:

* validation and training loss curves (``val/loss``, ``train/loss`` against the step; a band over seeds);
* the loss per t-level (``val/loss_t0.125`` ... ``val/loss_t1.000``, SD3 §5.3.3) at the last validation;
* sample quality against cost, from every pair ``<split>/<q>_<sampler>`` and ``<split>/nfe_<sampler>``
  (``val/fd_euler25_cfg1p5`` and ``val/nfe_euler25_cfg1p5``), one panel per split and quality metric. NFE
  is network evaluations per sample, so a guided sampler costs 2 a step; each solver with its guidance
  and shift settings is its own line (a guided and an unguided Euler are two lines, never joined);
* the runs' logged sample images (keys ``samples`` and ``test_samples``) side by side, over the steps;
* the metrics at the last validation and test, which way is better (flowmatch.metrics.directions) beside
  each, the best value per row in bold, and optionally the difference between two chosen columns;
* the config that differs between the columns, as YAML, and the flattened params that differ.

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
from pathlib import Path

import yaml

from flowmatch.metrics.directions import HIGHER, LOWER, arrow, direction, phrase, quantity
from flowmatch.tracking.report_runs import (LEVEL_KEY, Column, ReportError, RunData, fetch_runs, find_column, fold_evaluations,
                                            group_runs)

NFE_KEY = re.compile(r"^(?P<split>val|test)/nfe_(?P<sampler>.+)$")
GROUP_TAGS = ("objective", "model", "sampler", "dataset", "eval_samplers")
SPLITS = ("val", "test")


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


def _curve(column: Column, key: str) -> tuple[list[int], list[float], list[float], list[float]] | None:
    """(steps, mean, min, max) of ``key`` over the column's runs, at the steps every run that has it logged."""
    series = [dict(r.history[key]) for r in column.runs if r.history.get(key)]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:
        return None
    vals = [[s[step] for s in series] for step in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def loss_curves(columns: list[Column], path: Path) -> bytes | None:
    keys = [k for k in ("val/loss", "train/loss") if any(r.history.get(k) for c in columns for r in c.runs)]
    if not keys:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, c in enumerate(columns):
            curve = _curve(c, key)
            if curve is None:
                continue
            steps, mean, lo, hi = curve
            label = f"{c.name} (mean of {len(c.runs)})" if c.grouped else c.name
            ax.plot(steps, mean, marker="o" if key == "val/loss" else None, ms=3, color=series_color(i), label=label)
            if c.grouped:
                ax.fill_between(steps, lo, hi, color=series_color(i), alpha=0.2, linewidth=0)
        ax.set_title(f"{key} ({phrase(key)})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def level_losses(columns: list[Column]) -> dict[str, list[tuple[float, float]]]:
    """column name -> [(t, final val/loss_t, mean over the column's runs)] sorted by t."""
    out = {}
    for c in columns:
        keys = {k for r in c.runs for k in r.metrics if (m := LEVEL_KEY.match(k)) and m.group("split") == "val"}
        pts = sorted((float(LEVEL_KEY.match(k).group("t")), c.mean_spread(k)[0]) for k in keys)
        if pts:
            out[c.name] = pts
    return out


def level_plot(columns: list[Column], path: Path) -> bytes | None:
    levels = level_losses(columns)
    if not levels:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    for i, c in enumerate(columns):
        if c.name in levels:
            ts, vs = zip(*levels[c.name])
            ax.plot(ts, vs, marker="o", ms=4, color=series_color(i), label=c.name)
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_ylabel("validation loss at t (last validation)")
    ax.set_yscale("log")
    ax.set_title("loss per t-level (SD3 §5.3.3), lower is better")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def quality_vs_nfe(columns: list[Column], split: str = "val") -> dict[str, dict[str, list[tuple[float, float, float, str]]]]:
    """quality metric -> column name -> [(nfe, mean value, spread, sampler)] from every <split>/<q>_<sampler> with a
    <split>/nfe_<sampler>, by NFE."""
    out: dict[str, dict[str, list]] = {}
    for c in columns:
        samplers = {m.group("sampler") for r in c.runs for k in r.metrics if (m := NFE_KEY.match(k)) and m.group("split") == split}
        keys = {k for r in c.runs for k in r.metrics if k.startswith(split + "/") and not k.startswith(f"{split}/nfe_")}
        for key in sorted(keys):
            for sampler in samplers:
                if not key.endswith("_" + sampler):
                    continue
                q = key[len(split) + 1:-len(sampler) - 1]
                if not q or q.startswith("loss") or direction(q) is None:
                    continue  # fd_real (the floor) and the like are not qualities of the samples
                # a metric that ends with another sampler's name too ("fd_ratio_euler25_cfg1p5" and "..._cfg1p5"): the longest wins
                if any(len(o) > len(sampler) and key.endswith("_" + o) for o in samplers):
                    continue
                value, nfe = c.mean_spread(key), c.mean_spread(f"{split}/nfe_{sampler}")
                if value is not None and nfe is not None:
                    out.setdefault(q, {}).setdefault(c.name, []).append((nfe[0], value[0], value[1], sampler))
    for per_column in out.values():
        for pts in per_column.values():
            pts.sort()
    return out


def solver_family(sampler: str) -> str:
    """A sampler's name less its step count: "euler25" -> "euler", "euler25_cfg1p5" -> "euler_cfg1p5", "dopri5" ->
    "dopri5". One line per family: step counts vary along it, guidance and shift do not."""
    from flowmatch.sampling import ADAPTIVE_SOLVERS, SOLVERS

    head, sep, opts = sampler.partition(":")  # the older "heun4:cfg=2" spelling
    solver = next((name for name in sorted(SOLVERS, key=len, reverse=True) if head.startswith(name)), None)
    if solver is None:
        return sampler
    rest = head[len(solver):] if solver in ADAPTIVE_SOLVERS else head[len(solver):].lstrip("0123456789")
    return solver + rest + sep + opts


def quality_plot(columns: list[Column], path: Path, split: str = "val") -> bytes | None:
    data = quality_vs_nfe(columns, split)
    if not data:
        return None
    if "fd_ratio" in data:
        data.pop("fd", None)  # the same numbers over the floor: one panel
    first = ("fd_ratio", "caption_acc", "fd", "fid", "w2", "sw2", "mmd")
    order = [q for q in first if q in data] + sorted(q for q in data if q not in first)
    plt = pyplot()
    ncols = min(3, len(order))
    nrows = math.ceil(len(order) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(order):]:
        ax.set_visible(False)
    for ax, q in zip(axes.flat, order):
        for i, c in enumerate(columns):
            pts = data[q].get(c.name)
            if not pts:
                continue
            by_family: dict[str, list] = {}
            for p in pts:
                by_family.setdefault(solver_family(p[3]), []).append(p)
            for j, (family, fpts) in enumerate(sorted(by_family.items())):
                guided = "cfg" in family
                ax.errorbar([p[0] for p in fpts], [p[1] for p in fpts], yerr=[p[2] for p in fpts] if c.grouped else None,
                            marker="osD^v"[j % 5], ms=5, color=series_color(i), capsize=3,
                            linestyle=("--" if guided else "-") if len(fpts) > 1 else "none", label=f"{c.name}: {family}")
        ax.set_xscale("log")
        ax.set_xlabel("NFE (network evaluations per sample; guidance: 2 a step)")
        ax.set_title(f"{split}/{q} vs NFE ({phrase(q)})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# --- tables -------------------------------------------------------------------------------------------------------
def differing_params(columns: list[Column]) -> list[tuple[str, list[str]]]:
    """Flattened params whose value differs between columns (a column's own runs differ in their seed at most)."""
    keys = sorted(set().union(*(r.params for c in columns for r in c.runs)))
    rows = []
    for key in keys:
        values = [" / ".join(dict.fromkeys(r.params.get(key, "—") for r in c.runs)) for c in columns]
        if len(columns) == 1 or len(set(values)) > 1:
            rows.append((key, values))
    return rows


def _flat(tree, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = tree
    return out


def _nest(flat: dict[str, object]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def config_diff(columns: list[Column]) -> tuple[list[str], list[str]] | None:
    """Per column, the YAML of the config keys whose value differs between the columns' configs (each column's
    first run; the seed left out when the columns are seed groups), and the keys. None without two configs."""
    configs = []
    for c in columns:
        text = c.first.config_yaml
        try:
            configs.append(yaml.safe_load(text) if text else None)
        except yaml.YAMLError:
            configs.append(None)
    if sum(cfg is not None for cfg in configs) < 2:
        return None
    flats = [_flat(cfg) if isinstance(cfg, dict) else {} for cfg in configs]
    keys = sorted(set().union(*flats))
    missing = object()
    differing = [k for k in keys if len({repr(f.get(k, missing)) for f, cfg in zip(flats, configs) if cfg is not None}) > 1]
    if any(c.grouped for c in columns):
        differing = [k for k in differing if k != "seed_everything"]
    texts = []
    for f, cfg in zip(flats, configs):
        if cfg is None:
            texts.append("(no config.yaml logged)")
        else:
            part = _nest({k: f[k] for k in differing if k in f})
            texts.append(yaml.safe_dump(part, sort_keys=False, default_flow_style=False).strip() if part else "(none of the differing keys)")
    return texts, differing


def metric_rows(columns: list[Column]) -> list[str]:
    """The metrics to tabulate: the last validation's, then test's, then the rest (train/loss ...)."""
    keys = set().union(*(r.metrics for c in columns for r in c.runs))
    order = {"val": 0, "test": 1}

    def rank(k: str):
        split = k.split("/", 1)[0]
        return (order.get(split, 2), not k.split("/", 1)[-1].startswith("loss"), k)

    return sorted((k for k in keys if k != "epoch" and not k.startswith("data/")), key=rank)


def comparable(columns: list[Column], key: str) -> bool:
    """Whether one column's ``key`` can be better than another's: a loss only between columns of one objective
    (each objective's loss measures something else); every other metric with a direction always."""
    if direction(key) is None:
        return False
    if quantity(key) == "loss":
        return len({r.tags.get("objective") for c in columns for r in c.runs}) <= 1
    return True


def best_columns(columns: list[Column], key: str) -> set[int]:
    """Indices of the columns with the best (mean) value of ``key``: none for a metric without a direction, a
    loss of columns that train different objectives, a row that only one column has, or one where all columns
    tie (the same NFE everywhere)."""
    if not comparable(columns, key):
        return set()
    d = direction(key)
    means = [(i, ms[0]) for i, c in enumerate(columns) if (ms := c.mean_spread(key)) is not None]
    if d is None or len(means) < 2 or len({v for _, v in means}) == 1:
        return set()
    best = (max if d == HIGHER else min)(v for _, v in means)
    return {i for i, v in means if v == best}


def fmt_cell(ms: tuple[float, float, int] | None, grouped: bool) -> str:
    if ms is None:
        return "—"
    mean, spread, n = ms
    return f"{_fmt(mean)} ± {_fmt(spread)} (n={n})" if grouped else _fmt(mean)


def difference(a: Column, b: Column, key: str) -> tuple[str, str] | None:
    """("b - a (relative)", "better" / "worse" / "") of the column means, or None unless both have the metric."""
    ma, mb = a.mean_spread(key), b.mean_spread(key)
    if ma is None or mb is None:
        return None
    delta = mb[0] - ma[0]
    rel = f" ({100 * delta / abs(ma[0]):+.1f}%)" if ma[0] else ""
    d = direction(key)
    verdict = "" if not comparable([a, b], key) or delta == 0 else ("better" if (delta > 0) == (d == HIGHER) else "worse")
    return f"{delta:+.4g}{rel}", verdict


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


def metrics_table(columns: list[Column], diff: tuple[Column, Column] | None) -> str:
    esc = html.escape
    head = "<th>metric</th><th></th>" + "".join(f"<th>{esc(c.name)}</th>" for c in columns)
    if diff:
        head += f"<th>{esc(diff[1].name)} − {esc(diff[0].name)}</th>"
    rows = []
    for key in metric_rows(columns):
        best = best_columns(columns, key)
        cells = []
        for i, c in enumerate(columns):
            text = esc(fmt_cell(c.mean_spread(key), c.grouped))
            cells.append(f"<td class='best'><b>{text}</b></td>" if i in best else f"<td>{text}</td>")
        if diff:
            d = difference(diff[0], diff[1], key)
            cells.append(f"<td class='{d[1]}'>{esc(d[0])}{' ' + d[1] if d[1] else ''}</td>" if d else "<td>—</td>")
        title = {HIGHER: "higher is better", LOWER: "lower is better"}.get(direction(key), "no better direction")
        rows.append(f"<tr><th>{esc(key)}</th><td class='dir' title='{title}'>{arrow(key)}</td>{''.join(cells)}</tr>")
    return f"<table class='metrics'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def config_table(columns: list[Column]) -> str:
    diff = config_diff(columns)
    if diff is None:
        return "<p class='muted'>(fewer than two columns logged their config.yaml)</p>"
    texts, keys = diff
    if not keys:
        return "<p class='muted'>The columns' configs are the same" + (" but for their seeds" if any(c.grouped for c in columns) else "") + ".</p>"
    esc = html.escape
    head = "".join(f"<th>{esc(c.name)}</th>" for c in columns)
    cells = "".join(f"<td><pre class='yaml'>{esc(t)}</pre></td>" for t in texts)
    return (f"<p class='muted'>{len(keys)} keys of <code>config.yaml</code> differ (each column's first run):</p>"
            f"<table class='config'><thead><tr>{head}</tr></thead><tbody><tr>{cells}</tr></tbody></table>")


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { background: #f3f3f3; } tbody th { font-weight: normal; font-family: monospace; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.samples td { text-align: center; } .samples img { max-width: 520px; display: block; }
.metrics td.best { background: #eef7ee; } .metrics td.better { color: #1a7f37; } .metrics td.worse { color: #b42318; }
.metrics td.dir { text-align: center; color: #555; } pre.yaml { margin: 0; font-size: 12px; }
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

IMAGE_SECTIONS = (("samples", "validation"), ("test_samples", "test"))


def _samples_section(columns: list[Column], image_files: dict[str, dict[str, list[tuple[int, str, bytes]]]]) -> str:
    """One row per column that logged images (its first run's), validation grids over the steps, then the test grid."""
    esc = html.escape
    shown = [c for c in columns if image_files.get(c.first.run_id)]
    if not shown:
        return "<p class='muted'>(no run logged sample images)</p>"
    heads = []
    for key, label in IMAGE_SECTIONS:
        steps = sorted({s for c in shown for s, _, _ in image_files[c.first.run_id].get(key, [])})
        heads += [(key, s, f"{label} step {s}") for s in steps]
    rows = []
    for c in shown:
        files = image_files[c.first.run_id]
        cells = []
        for key, step, label in heads:
            by_step = {s: png for s, _, png in files.get(key, [])}
            cells.append(f"<td><img alt='{esc(c.name)} {esc(label)}' src='{_data_uri(by_step[step])}'></td>" if step in by_step else "<td>—</td>")
        who = f"{esc(c.name)}<br><span class='muted'>seed {esc(c.first.tags.get('seed', '—'))}, the first of {len(c.runs)}</span>" if c.grouped else esc(c.name)
        rows.append(f"<tr><th>{who}</th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{esc(label)}</th>" for _, _, label in heads)
    return f"<table class='samples'><thead><tr><th>run</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_html(columns: list[Column], figures: dict[str, bytes | None], image_files: dict[str, dict[str, list[tuple[int, str, bytes]]]],
                title: str, tracking_uri: str, scope: str, diff: tuple[Column, Column] | None = None) -> str:
    esc = html.escape
    names = [c.name for c in columns]
    runs = [r for c in columns for r in c.runs]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<p class='muted'>{len(runs)} runs in {len(columns)} columns from {esc(tracking_uri)}{esc(scope)}. "
             "<span id='render-status'></span></p>"]
    group = [(tag, [" / ".join(dict.fromkeys(r.tags.get(tag, "—") for r in c.runs)) for c in columns]) for tag in GROUP_TAGS]
    group += [("runs", [str(len(c.runs)) for c in columns]), ("seeds", [", ".join(c.seeds()) for c in columns]),
              ("run id", [", ".join(r.run_id for r in c.runs) for c in columns]),
              ("status", [" / ".join(dict.fromkeys(r.status for r in c.runs)) for c in columns]),
              ("tested at step", [" / ".join(dict.fromkeys(r.tags.get("flowmatch.test_at_step", "—") for r in c.runs)) for c in columns]),
              ("evaluation folded in", [" / ".join(dict.fromkeys(
                  (f"{r.tags['flowmatch.evaluation_folded_by_name'][:8]} (a separate run of an older release, matched by name)"
                   if "flowmatch.evaluation_folded_by_name" in r.tags else r.tags.get("flowmatch.evaluated_in_run", "—")[:8]) for r in c.runs))
                  for c in columns]),
              ("git commit", [" / ".join(dict.fromkeys(r.tags.get("mlflow.source.git.commit", "—")[:12] for r in c.runs)) for c in columns])]
    parts.append("<h2>Runs</h2><p class='muted'>One column per trained model: its <code>validate</code> / <code>test</code> "
                 "are logged into its run. Runs sharing a <code>variant</code> tag (the seeds of a study variant) are one column: "
                 "mean ± standard deviation over them.</p>" + _table(["", *names], group, "runs"))
    parts.append("<h2>Metrics</h2><p class='muted'>The latest value of each metric: the last validation (<code>val/</code>) "
                 "and the test of the checkpoint (<code>test/</code>). ↑ higher is better, ↓ lower is better (no arrow: "
                 "neither, e.g. the real-vs-real floor <code>fd_real</code>); the best value of each row is in bold. NFE is "
                 "network evaluations per sample (guided samplers: 2 a step)."
                 + (f" The last column is {esc(diff[1].name)} minus {esc(diff[0].name)}." if diff else "")
                 + (" The columns train different objectives, whose losses measure different things: no loss row names a "
                    "best or a better; compare them by the sample metrics." if len({r.tags.get("objective") for r in runs}) > 1 else "") + "</p>"
                 + metrics_table(columns, diff))
    sections = [("curves", "Loss curves", "<code>val/loss</code> (SD3's average over t-levels but t = 1) and <code>train/loss</code> "
                 "against the step; for a column of several seeds the mean, and the band from the lowest to the highest seed."),
                ("levels", "Loss per t-level", "<code>val/loss_t*</code> at the last validation, each level with fixed noise."),
                ("quality_val", "Sample quality vs. NFE (validation)", "final <code>val/&lt;metric&gt;_&lt;sampler&gt;</code> against "
                 "<code>val/nfe_&lt;sampler&gt;</code>, the network evaluations each sample cost (a guided sampler runs a conditional "
                 "and an unconditional pass per step, so 2 a step). One line per column and solver family: guided (dashed) and "
                 "unguided samplers are separate lines; seed columns show the mean and the standard deviation."),
                ("quality_test", "Sample quality vs. NFE (test)", "the same from the <code>test</code> of each checkpoint.")]
    for key, heading, note in sections:
        png = figures.get(key)
        if png is None and key == "quality_test":
            continue  # no test logged: no empty section
        parts.append(f"<h2>{heading}</h2><p class='muted'>{note}</p>")
        parts.append(f"<img class='plot' alt='{esc(heading)}' src='{_data_uri(png)}'>" if png else "<p class='muted'>(no run logged these metrics)</p>")
    parts.append("<h2>Samples</h2>" + _samples_section(columns, image_files))
    parts.append("<h2>Config that differs</h2>" + config_table(columns))
    parts.append("<h2>Params that differ</h2><p class='muted'>The same, as the flattened params MLflow holds.</p>"
                 + _table(["param", *names], differing_params(columns), "params"))
    ids = ",".join(f'"{r.run_id}"' for r in runs)
    exps = ",".join(sorted({f'"{r.experiment_id}"' for r in runs}))
    ui = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    parts.append("<h2>The same view in the MLflow UI</h2><p>"
                 + (f"Open <code>mlflow ui --backend-store-uri {esc(tracking_uri)}</code>, then " if not tracking_uri.startswith("http") else "")
                 + f"<a href='{esc(ui)}/#/compare-runs?runs=[{esc(ids)}]&amp;experiments=[{esc(exps)}]'>compare these runs</a>: each run "
                 "holds its <code>val/*</code> and <code>test/*</code> metrics; chart <code>val/loss</code> and <code>train/loss</code> "
                 "against the step, <code>val/fd_ratio_*</code> beside <code>val/nfe_*</code> in a scatter plot, and see the "
                 "<code>samples</code> and <code>test_samples</code> images in each run's Artifacts / images tab.</p>")
    parts.append(f"<script>{CHECK_SCRIPT}</script></body></html>")
    return "".join(parts)


def build_report(out_dir: str | Path, tracking_uri: str, experiment: list[str] | str | None = None, filter_string: str = "",
                 run_ids: list[str] | None = None, max_runs: int = 20, title: str | None = None, max_images: int = 4,
                 tags: dict[str, str] | None = None, group_by: str | None = "variant",
                 diff: tuple[str, str] | None = None, variants: list[str] | None = None) -> tuple[Path, list[Column]]:
    """Read the runs, fold them into columns, draw the figures, write OUT/index.html (+ plots/*.png, images/*.png).

    Returns (the page's path, its columns)."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="flowmatch-compare-") as tmp:
        runs = fold_evaluations(fetch_runs(tracking_uri, experiment, filter_string, run_ids, max_runs, max_images=max_images,
                                           workdir=Path(tmp), tags=tags, variants=variants))
        columns = group_runs(runs, group_by)
        pair = (find_column(columns, diff[0]), find_column(columns, diff[1])) if diff else None
        out.mkdir(parents=True, exist_ok=True)
        figures = {"curves": loss_curves(columns, out / "plots" / "loss_curves.png"),
                   "levels": level_plot(columns, out / "plots" / "loss_per_t.png"),
                   "quality_val": quality_plot(columns, out / "plots" / "quality_vs_nfe.png", "val"),
                   "quality_test": quality_plot(columns, out / "plots" / "test_quality_vs_nfe.png", "test")}
        images: dict[str, dict[str, list[tuple[int, str, bytes]]]] = {}
        for c in columns:
            r = c.first
            for key, items in r.images.items():
                for step, local in items:
                    name = f"images/{_slug(c.name)}-{r.run_id[:8]}-{key}-step{step}.png"
                    png = local.read_bytes()
                    (out / name).parent.mkdir(parents=True, exist_ok=True)
                    (out / name).write_bytes(png)
                    images.setdefault(r.run_id, {}).setdefault(key, []).append((step, name, png))
    names = [experiment] if isinstance(experiment, str) else list(experiment or [])
    scope = (f", experiment {', '.join(names)}" if names else "") + "".join(f", {k} = {v}" for k, v in (tags or {}).items()) \
        + (f", filter {filter_string}" if filter_string else "")
    page = render_html(columns, figures, images, title or f"Comparison of {len(columns)} columns" + (f": {', '.join(names)}" if names else ""),
                       tracking_uri, scope, pair)
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index, columns


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] or "run"


def summary(columns: list[Column]) -> str:
    """One line per column for the terminal."""
    lines = []
    for c in columns:
        loss = c.mean_spread("val/loss")
        ident = f"{len(c.runs)} runs" if c.grouped else c.first.run_id[:12]
        lines.append(f"  {c.name:<24} {ident:<12}  val/loss {fmt_cell(loss, c.grouped) if loss is not None else '—'}")
    return "\n".join(lines)


__all__ = ["Column", "ReportError", "RunData", "build_report", "pyplot", "quality_vs_nfe", "save_figure", "series_color", "solver_family",
           "summary"]
