"""The figures of a study's results (PNG files beside the Markdown): values per variant, ranks, W2 against NFE,
metrics over training and sweeps, each point a mean ± std over seeds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from flowmatch.metrics.directions import higher_is_better
from flowmatch.studies.queries import Runs
from flowmatch.studies.spec import Study
from flowmatch.studies.statistics import W2_KEY, mean_std, metric_values, sampler_order
from flowmatch.tracking.report import pyplot, save_figure, series_color

MeanStd = tuple[float, float]


# --- drawing helpers ------------------------------------------------------------------------------------------
def _means(ms: list[MeanStd]) -> list[float]:
    return [m for m, _ in ms]


def _spreads(ms: list[MeanStd]) -> list[float]:
    """Error-bar sizes: no bar where the std is undefined (a single seed)."""
    return [0 if math.isnan(s) else s for _, s in ms]


def _errorbars(ax, xs: list[float], ms: list[MeanStd], **style) -> None:
    ax.errorbar(xs, _means(ms), yerr=_spreads(ms), **style)


def _nfe_and_w2(runs: Runs, variant: str, sampler: str, prefix: str = "w2") -> tuple[float, MeanStd]:
    """The variant's mean NFE with a sampler and its quality ``val/<prefix>_<sampler>`` (default W2) (mean, std)."""
    return mean_std(metric_values(runs, variant, f"val/nfe_{sampler}"))[0], mean_std(metric_values(runs, variant, f"val/{prefix}_{sampler}"))


def _column_axis(ax, col: dict) -> None:
    """A report column's panel: log scale if asked, and which way is better in the title."""
    if col.get("log_y"):
        ax.set_yscale("log")
    ax.set_title(f"{col['label']} ({'higher' if col.get('higher') else 'lower'} is better)", fontsize=9)


def _legend_if_any(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(fig, study: Study, what: str, out_dir: Path) -> Path:
    """Lay out and write the figure as OUT/<study>_<what>.png."""
    fig.tight_layout()
    path = out_dir / f"{study.name}_{what}.png"
    save_figure(fig, path)
    return path


def _band(ax, runs: Runs, variant: str, metric: str, color, label: str) -> None:
    """A metric over training: the mean over seeds at each logged step, with a ± std band."""
    by_step: dict[int, list[float]] = {}
    for (v, _), r in runs.items():
        if v == variant:
            for st, val in r.history.get(metric, []):
                by_step.setdefault(st, []).append(val)
    if not by_step:
        return
    st = sorted(by_step)
    ms = [mean_std(by_step[s]) for s in st]
    m = np.array(_means(ms))
    sd = np.array(_spreads(ms))
    ax.plot(st, m, color=color, marker="o", ms=3, label=label)
    ax.fill_between(st, m - sd, m + sd, color=color, alpha=0.2)


# --- the figures of each analysis -----------------------------------------------------------------------------
def ranking_plots(study: Study, runs: Runs, seeds: list[int], variants: list[str], columns: list[dict],
                  ranks: dict[str, dict[str, list[float]]], paper_ranks: dict[str, dict[str, float]], out_dir: Path) -> list[Path]:
    """<study>_w2.png (each column's metric per variant, in SD3's order; W2 columns share one panel) or, for other
    metrics, <study>_metrics.png (one panel per column, which way is better in its title), and <study>_ranks.png (our
    ranks against SD3's)."""
    plt = pyplot()
    order = sorted(variants, key=lambda v: paper_ranks.get(v, {}).get("all", math.inf))
    labels = [study.label(v) for v in order]
    x = np.arange(len(order))
    if all(c["metric"].startswith("val/w2") for c in columns):
        fig, ax = plt.subplots(figsize=(10, 4.2))
        width = 0.8 / max(len(columns), 1)
        for j, col in enumerate(columns):
            ms = [mean_std([runs[(v, s)].metrics[col["metric"]] for s in seeds]) for v in order]
            ax.bar(x + (j - (len(columns) - 1) / 2) * width, _means(ms), width, yerr=_spreads(ms),
                   color=series_color(j), capsize=3, label=f"{col['label']} ({col['metric']})")
            for i, v in enumerate(order):
                ax.scatter([x[i] + (j - (len(columns) - 1) / 2) * width] * len(seeds), [runs[(v, s)].metrics[col["metric"]] for s in seeds],
                           s=8, color="black", zorder=3)
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("W2 to held-out data (lower is better)")
        ax.set_title(f"{study.name}: final W2 per variant, mean ± std over {len(seeds)} seeds (dots: seeds); SD3's order left to right")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        p1 = _save(fig, study, "w2", out_dir)
    else:  # metrics of different scales and directions (FD / floor, caption adherence): a panel each
        ncols = min(4, len(columns))
        nrows = -(-len(columns) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
        for ax, col in zip(axes.flat, columns):
            ms = [mean_std([runs[(v, s)].metrics[col["metric"]] for s in seeds]) for v in order]
            ax.bar(x, _means(ms), 0.7, yerr=_spreads(ms), color=[series_color(i) for i in range(len(order))], capsize=3)
            for i, v in enumerate(order):
                ax.scatter([x[i]] * len(seeds), [runs[(v, s)].metrics[col["metric"]] for s in seeds], s=8, color="black", zorder=3)
            ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=7)
            _column_axis(ax, col)
            ax.grid(axis="y", alpha=0.3)
        for ax in list(axes.flat)[len(columns):]:
            ax.set_visible(False)
        fig.suptitle(f"{study.name}: final metrics per variant, mean ± std over {len(seeds)} seeds (dots: seeds); SD3's order left to right")
        fig.tight_layout()
        p1 = _save(fig, study, "metrics", out_dir)

    fig, axes = plt.subplots(1, len(columns), figsize=(5.2 * len(columns), 4.4), squeeze=False)
    for ax, col in zip(axes[0], columns):
        have = [v for v in variants if col["paper"] in paper_ranks.get(v, {})]
        xs = [paper_ranks[v][col["paper"]] for v in have]
        ms = [mean_std(ranks[col["label"]][v]) for v in have]
        _errorbars(ax, xs, ms, fmt="o", capsize=3)
        for xv, (m, _), v in zip(xs, ms, have):
            ax.annotate(study.label(v), (xv, m), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(f"SD3 average rank, {col['paper']}")
        ax.set_ylabel(f"our mean rank, {col['label']}")
        ax.set_title(f"{col['label']} vs SD3 {col['paper']}")
        ax.grid(alpha=0.3)
    return [p1, _save(fig, study, "ranks", out_dir)]


def training_plots(study: Study, runs: Runs, variants: list[str], samplers: list[str], out_dir: Path,
                   qualities: list[dict] | None = None) -> list[Path]:
    """<study>_training.png (the curves and the validation loss over training) and, per quality metric, its final value
    against NFE: <study>_w2_vs_nfe.png for W2 (the default), <study>_<prefix>_vs_nfe.png otherwise. Euler is a solid
    line, any other fixed-step solver (e.g. DDIM) a dashed one, dopri5 a diamond."""
    plt = pyplot()
    out = []
    curves = [m for m in study.report.get("curves", []) if any(m in r.history for r in runs.values())]
    keys = curves + (["val/loss"] if any("val/loss" in r.history for r in runs.values()) else [])
    if keys:
        out.append(curves_figure(study, runs, variants, keys, out_dir))
    solvers = sorted({sampler_order(s)[1] for s in samplers if not s.startswith("dopri5")}, key=lambda x: (x != "euler", x))
    for q in (qualities or [{"prefix": "w2", "label": "W2"}]) if samplers else []:
        prefix, higher = q["prefix"], higher_is_better(f"val/{q['prefix']}")
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, v in enumerate(variants):
            for solver in solvers:
                pts = [_nfe_and_w2(runs, v, s, prefix) for s in samplers if sampler_order(s)[:2] == (False, solver)]
                _errorbars(ax, [p[0] for p in pts], [p[1] for p in pts], color=series_color(i), marker="o", capsize=3,
                           linestyle="-" if solver == "euler" else "--", label=f"{study.label(v)} ({solver_label(solver)})")
            if "dopri5" in samplers:
                nfe, value = _nfe_and_w2(runs, v, "dopri5", prefix)
                _errorbars(ax, [nfe], [value], color=series_color(i), marker="D", capsize=3, linestyle="none", label=f"{study.label(v)} (dopri5)")
        ax.set_xscale("log")
        if not higher:
            ax.set_yscale("log")
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_ylabel(f"final {q['label']} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"{study.name}: final {q['label']} vs NFE, mean ± std over seeds")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        out.append(_save(fig, study, f"{prefix}_vs_nfe", out_dir))
    return out


def solver_label(solver: str) -> str:
    return {"euler": "Euler", "ddim": "DDIM", "heun": "Heun"}.get(solver, solver)


def reflow_plots(study: Study, runs: Runs, variants: list[str], columns: list[dict], out_dir: Path) -> list[Path]:
    """<study>_reflow.png: W2 against NFE per variant, and the straightness of the sampling paths."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for i, v in enumerate(variants):
        samplers = sorted({m.group("sampler") for (vv, _), r in runs.items() if vv == v for k in r.metrics if (m := W2_KEY.match(k))}, key=sampler_order)
        for adaptive in (False, True):  # Euler steps as a line, dopri5 as its own marker
            pts = [_nfe_and_w2(runs, v, s) for s in samplers if metric_values(runs, v, f"val/nfe_{s}") and (s == "dopri5") == adaptive]
            if pts:
                _errorbars(ax, [p[0] for p in pts], [p[1] for p in pts],
                           color=series_color(i), marker="D" if adaptive else "o", capsize=3, label=None if adaptive else study.label(v),
                           linestyle="none" if adaptive else "-" if "distill" not in v else ":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (circles: Euler 1, 2, 8 steps; diamonds: dopri5)")
    ax.set_ylabel("final W2 (lower is better)")
    ax.set_title("W2 vs NFE, mean ± std over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax = axes[1]
    have = [v for v in variants if metric_values(runs, v, "val/straightness")]
    ms = [mean_std(metric_values(runs, v, "val/straightness")) for v in have]
    ax.bar(range(len(have)), _means(ms), yerr=_spreads(ms), capsize=3, color=[series_color(variants.index(v)) for v in have])
    ax.set_xticks(range(len(have)), [study.label(v) for v in have])
    ax.set_yscale("log")
    ax.set_ylabel("straightness S (0 = straight paths)")
    ax.set_title("straightness of the sampling paths")
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.suptitle(f"{study.name}: reflow and distillation on 8 gaussians")
    return [_save(fig, study, "reflow", out_dir)]


def comparison_plots(study: Study, runs: Runs, variants: list[str], columns: list[dict], curves: list[str], out_dir: Path) -> list[Path]:
    """<study>_sweep.png (with a ``sweep``) or <study>_final.png (each column per variant), and <study>_training.png (curves)."""
    out = []
    columns = [c for c in columns if any(metric_values(runs, v, c["metric"]) for v in variants)]  # none of these runs log the others
    sweep = study.report.get("sweep")
    if columns and sweep:
        out.append(_sweep_figure(study, runs, columns, sweep, out_dir))
    elif columns:
        out.append(_final_values_figure(study, runs, variants, columns, out_dir))
    if curves:
        out.append(curves_figure(study, runs, variants, curves, out_dir))
    return out


def _sweep_figure(study: Study, runs: Runs, columns: list[dict], sweep: dict, out_dir: Path) -> Path:
    """Each column against the swept setting, a line per series (every seed as a dot)."""
    fig, axes = pyplot().subplots(1, len(columns), figsize=(4.6 * len(columns), 3.9), squeeze=False)
    for ax, col in zip(axes[0], columns):
        for i, (name, members) in enumerate(sweep.get("series", {}).items()):
            vals = {float(x): metric_values(runs, v, col["metric"]) for v, x in members.items()}
            pts = sorted((x, mean_std(vs)) for x, vs in vals.items() if vs)
            if pts:
                _errorbars(ax, [p[0] for p in pts], [p[1] for p in pts], color=series_color(i), marker="o", capsize=3, label=name)
                for x, vs in vals.items():
                    ax.scatter([x] * len(vs), vs, color=series_color(i), s=8, alpha=0.5)
        if sweep.get("log_x", True):
            ax.set_xscale("log")
        _column_axis(ax, col)
        ax.set_xlabel(sweep.get("x_label", "setting"))
        ax.grid(alpha=0.3, which="both")
        _legend_if_any(ax)
    fig.suptitle(f"{study.name}: final values, mean ± std over seeds (dots: seeds)")
    return _save(fig, study, "sweep", out_dir)


def _final_values_figure(study: Study, runs: Runs, variants: list[str], columns: list[dict], out_dir: Path) -> Path:
    """A panel per column: each variant's mean ± std as a marker with error bars (no zero baseline: small gaps
    stay visible) and its seeds as dots."""
    fig, axes = pyplot().subplots(1, len(columns), figsize=(max(7.0, max(4.0, 0.9 * len(variants) + 1.6) * len(columns)), 4.2), squeeze=False)
    for ax, col in zip(axes[0], columns):
        have = [v for v in variants if metric_values(runs, v, col["metric"])]
        for j, v in enumerate(have):
            vals = metric_values(runs, v, col["metric"])
            _errorbars(ax, [j], [mean_std(vals)], color=series_color(variants.index(v)), marker="o", markersize=8, capsize=4)
            ax.scatter([j + 0.12] * len(vals), vals, color="black", s=8, zorder=3)
        ax.set_xlim(-0.5, len(have) - 0.5)
        ax.set_xticks(range(len(have)), [study.label(v) for v in have], rotation=30, ha="right", fontsize=8)
        _column_axis(ax, col)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{study.name}: final values, mean ± std over seeds (small dots: seeds)")
    return _save(fig, study, "final", out_dir)


def curves_figure(study: Study, runs: Runs, variants: list[str], keys: list[str], out_dir: Path) -> Path:
    """<study>_training.png: one panel per metric over training, a mean ± std band per variant."""
    fig, axes = pyplot().subplots(1, len(keys), figsize=(max(7.0, 4.8 * len(keys)), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, v in enumerate(variants):
            _band(ax, runs, v, key, series_color(i), study.label(v))
        ax.set_xlabel("training steps")
        ax.set_title(key + (" (own objective's loss)" if key == "val/loss" and study.report.get("kind") == "training" else ""))
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        _legend_if_any(ax)
    fig.suptitle(f"{study.name}: over training, mean ± std over seeds")
    return _save(fig, study, "training", out_dir)
