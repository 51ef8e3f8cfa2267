"""A study's section of the results (docs/results.md) and its plots, written from its MLflow runs alone.

The runs are those the study runner tags (``study``, ``budget``, the variant's current
``study_fingerprint``, status FINISHED; the latest per variant and seed). Every number in the
section is a statistic over those runs, and the section ends with the table of their run ids.
Each study's text sits between ``<!-- study:NAME begin -->`` and ``<!-- study:NAME end -->`` so
that writing one study keeps the others.

The study file's ``report`` chooses the analysis:

* ``kind: ranking`` (SD3's formulation study): per seed, the variants ranked by each column's
  metric (lower is better), the ranks averaged over seeds, and compared with the paper's average
  ranks (Spearman's rho of the mean ranks, and per seed);
* ``kind: training`` (FM vs. VP): final quality per sampler and NFE, and quality over training;
* ``kind: reflow``: the columns' means per variant beside the paper's numbers, and the factors
  between variants;
* ``kind: comparison`` (architectures, latent channels, QK-norm, reflow on images): the columns' means
  per variant (a column's ``higher: true`` marks higher-is-better), optional paper values
  (``paper.values: {variant: {column label or metric: number}}``), bar plots per column, optional
  ``curves`` (metrics over training: a table and a plot) and an optional ``sweep`` (``x_label``,
  ``log_x``, ``series: {name: {variant: x}}``): each column against x, one line per series.

``report.claims`` are the paper's qualitative findings, each checked on the means and per seed:
``better`` (variant(s) lower than others on a metric, ``at`` final / first / mean_over_training),
``factor`` (others / variant >= min_factor), ``top`` (among the k best), ``last``; a claim's
``higher: true`` makes higher values the better ones (accuracies, PSNR). A ``better`` claim
that holds on the means while a gap is narrower than 2 standard errors of the seed-paired
differences is marked ≈ (not resolved). The verdict is "agrees" when every claim holds clearly,
"does not agree" when none holds even on the means, else "agrees in part".
``report.discussion`` (optional, hand-written; a text, or a mapping budget -> text) is printed under the verdict.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowmatch.objectives.base import DIVERGED_METRIC
from flowmatch.studies.spec import Study, plan
from flowmatch.tracking.report import series_color, pyplot, save_figure

W2_KEY = re.compile(r"^val/w2_(?P<sampler>.+)$")
HEADER = """# Results: the papers' claims at small scale

Each section below is written by `python -m flowmatch study NAME --budget BUDGET --report-only` from
the MLflow runs of that study alone (tags `study`, `variant`, `seed`, `budget`); the runs' ids are
listed at the end of each section, so every number can be looked up in the tracking store
(`mlflow ui --backend-store-uri sqlite:///mlflow.db`, experiment `studies`). Writing one study's
section keeps the others. Plots are in [results/](results/). The studies are defined in
[experiments/studies/](../experiments/studies/); the science and the papers' numbers are in SPEC.md.

Sample quality on 2-D data is W2, the exact 2-Wasserstein distance between 1,000 generated points
and 1,000 held-out data points (lower is better). Two independent 1,000-point samples of the
8-gaussians target are themselves 0.31 ± 0.06 apart (6 pairs), so W2 values near 0.3 mean "as good
as this metric can tell"; a model can score a little below that against the fixed held-out set.
Every run is scored with the same sampling noise against the same held-out points, so differences
between runs are paired. Tables give the mean ± standard deviation over seeds (sample std, n - 1).
"""


class ResultsError(RuntimeError):
    """Nothing to write: no finished runs of the study, or an unreadable store."""


@dataclass
class RunRecord:
    run_id: str
    variant: str
    seed: int
    metrics: dict[str, float]
    params: dict[str, str]
    seconds: float | None
    commit: str = ""
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(steps trained, value)]


# --- reading ------------------------------------------------------------------------------------------------
def collect(study: Study, budget: str, tracking_uri: str, history_keys: list[str] | None = None) -> dict[tuple[str, int], RunRecord]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from flowmatch.studies.runner import search_study_runs

    current = {r.variant.name: r.fingerprint for r in plan(study, budget, seeds=1)}
    # several stores, comma-separated: the shards of a study run by parallel processes, each into its own store
    uris = [u.strip() for u in tracking_uri.split(",") if u.strip()]
    latest: dict[tuple[str, int], Any] = {}
    store_of: dict[str, str] = {}
    for uri in uris:
        try:
            found = search_study_runs(uri, study, budget, statuses=("FINISHED", "FAILED"))
        except MlflowException as err:
            raise ResultsError(f"could not read runs from {uri}: {str(err).splitlines()[0]}") from None
        for run in found:
            if run.info.status == "FAILED" and DIVERGED_METRIC not in run.data.metrics:
                continue  # a crash, not a result; a diverged run (non-finite loss) is one
            tags = run.data.tags
            if not tags.get("seed", "").isdigit() or current.get(tags.get("variant")) != tags.get("study_fingerprint"):
                continue
            key = (tags["variant"], int(tags["seed"]))
            if key not in latest or run.info.start_time > latest[key].info.start_time:
                latest[key] = run
                store_of[run.info.run_id] = uri
    if not latest:
        raise ResultsError(f"no finished runs of study {study.name!r} (budget {budget}, current definitions) in {tracking_uri}, "
                           f"experiment {study.experiment!r}; run `python -m flowmatch study {study.name} --budget {budget}` first")
    out = {}
    for key, run in latest.items():
        seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
        rec = RunRecord(run.info.run_id, key[0], key[1], dict(run.data.metrics), dict(run.data.params), seconds,
                        run.data.tags.get("mlflow.source.git.commit", ""))
        for hk in history_keys or []:
            if hk in rec.metrics:
                # Lightning logs a validation at the 0-based index of the last batch: +1 is the number of steps trained
                history = MlflowClient(store_of[rec.run_id]).get_metric_history(rec.run_id, hk)
                rec.history[hk] = sorted((m.step + 1, m.value) for m in history)
        out[key] = rec
    return out


# --- statistics and formatting ----------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def fmt(v: float | None, digits: int = 3) -> str:
    """``digits`` decimals between 0.1 and 10, 3 significant digits below 0.1, fewer decimals above 10."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e5:
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.1:
        return f"{v:.{digits}f}"
    return f"{v:.3g}" if a >= 1e-4 else f"{v:.2e}"


def fmt_ms(values: list[float], digits: int = 3) -> str:
    """mean ± std, the std to the mean's decimals (3 significant digits for means below 0.1)."""
    m, sd = mean_std(values)
    if math.isnan(m):
        return "—"
    text = fmt(m, digits)
    if math.isnan(sd):
        return text
    a = abs(m)
    decimals = None if a < 0.1 or a >= 1e5 else 0 if a >= 100 else 1 if a >= 10 else digits
    sd_text = fmt(sd, digits) if decimals is None or round(sd, decimals) == 0 else f"{sd:.{decimals}f}"
    return f"{text} ± {sd_text}"


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---:" if a == "c" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _values(runs: dict, variant: str, metric: str, seeds: list[int] | None = None) -> list[float]:
    return [r.metrics[metric] for (v, s), r in sorted(runs.items()) if v == variant and metric in r.metrics and (seeds is None or s in seeds)]


def _as_list(x) -> list[str]:
    return [x] if isinstance(x, str) else list(x or [])


def _sampler_order(sampler: str) -> tuple:
    """euler1 < euler2 < ... < heun4 < dopri5 (adaptive last)."""
    if sampler.startswith("dopri5"):
        return (True, sampler, 0)
    m = re.match(r"^([a-z_]+?)(\d*)((:.*)?)$", sampler)
    solver, steps = (m.group(1) + m.group(3), int(m.group(2) or 0)) if m else (sampler, 0)
    return (False, solver, steps)


# --- claims ----------------------------------------------------------------------------------------------------
def _metric_value(rec: RunRecord, metric: str, at: str) -> float | None:
    if at == "final":
        return rec.metrics.get(metric)
    hist = rec.history.get(metric)
    if not hist:
        return None
    if at == "first":
        return hist[0][1]
    if at == "mean_over_training":
        return float(np.mean([v for _, v in hist]))
    raise ValueError(f"claim 'at' must be final, first or mean_over_training, got {at!r}")


def check_claim(claim: dict, runs: dict[tuple[str, int], RunRecord], seeds: list[int], metric: str | None = None,
                ranks: dict[str, list[float]] | None = None) -> tuple[bool | None, str]:
    """(holds: True / False, or None when it holds on the means but a gap is under 2 standard errors of the
    seed-paired differences; a short account with the per-seed count). ``ranks``: variant -> per-seed ranks."""
    kind = claim.get("kind")
    metric = claim.get("metric", metric)
    at = claim.get("at", "final")
    # higher-is-better claims are checked on negated values (so "lower is better" holds throughout) and shown as measured
    sign = -1.0 if claim.get("higher") and not (ranks is not None and "metric" not in claim) else 1.0

    def per_seed(variant: str) -> dict[int, float]:
        if ranks is not None and "metric" not in claim:
            return dict(zip(seeds, ranks[variant]))
        out = {}
        for s in seeds:
            rec = runs.get((variant, s))
            val = _metric_value(rec, metric, at) if rec else None
            if val is not None and not math.isnan(val):
                out[s] = sign * val
            elif rec is not None and DIVERGED_METRIC in rec.metrics:
                out[s] = math.inf  # the loss diverged before the metric was measured: the worst outcome
        return out

    if kind in ("better", "factor"):
        winners, losers = _as_list(claim["variant"]), _as_list(claim["than"])
        vals = {v: per_seed(v) for v in winners + losers}
        common = [s for s in seeds if all(s in vals[v] for v in vals)]
        if not common:
            return False, "no seed has all the runs"
        if kind == "better":
            means = {v: float(np.mean([vals[v][s] for s in common])) for v in vals}
            holds = all(means[w] < means[loser] for w in winners for loser in losers)
            seeds_ok = sum(all(vals[w][s] < vals[loser][s] for w in winners for loser in losers) for s in common)
            what = "mean ranks" if ranks is not None and "metric" not in claim else f"means of {metric}" + ("" if at == "final" else f" ({at.replace('_', ' ')})")
            detail = ", ".join(f"{v} {fmt(sign * means[v])}" for v in winners + losers)
            text = f"{what}: {detail}; holds in {seeds_ok}/{len(common)} seeds"
            if holds and not _clear(vals, winners, losers, common):
                return None, text + "; the margin is within the seed-to-seed spread"
            return holds, text
        factor = float(claim.get("min_factor", 1.0))
        if sign < 0:  # higher is better: the variant's value over the best of the others
            ratios = [-vals[winners[0]][s] / max(-vals[loser][s] for loser in losers) for s in common]
        else:
            ratios = [min(vals[loser][s] for loser in losers) / vals[winners[0]][s] for s in common]
        m, sd = mean_std(ratios)
        holds = m >= factor
        seeds_ok = sum(r >= factor for r in ratios)
        return holds, f"factor {fmt(m)}{'' if math.isnan(sd) else ' ± ' + fmt(sd)} (>= {factor:g} in {seeds_ok}/{len(common)} seeds)"
    if kind in ("top", "last"):
        # among the variants named by ``among``, else those that have the metric at all
        names = _as_list(claim.get("among")) or sorted({v for v, _ in runs if per_seed(v)})
        vals = {v: per_seed(v) for v in names}
        common = [s for s in seeds if all(s in vals[v] for v in names)]
        if not common:
            return False, "no seed has all the runs"
        means = {v: float(np.mean([vals[v][s] for s in common])) for v in names}
        order = sorted(names, key=lambda v: means[v])
        target = claim["variant"]
        pos = order.index(target) + 1
        k = int(claim.get("k", 1)) if kind == "top" else len(names)
        per = [sorted(names, key=lambda v: vals[v][s]).index(target) + 1 for s in common]
        ok_seeds = sum(p <= k if kind == "top" else p == len(names) for p in per)
        holds = pos <= k if kind == "top" else pos == len(names)
        return holds, f"position {pos} of {len(names)} on the mean (per seed: {', '.join(map(str, per))}; holds in {ok_seeds}/{len(common)} seeds)"
    raise ValueError(f"unknown claim kind {kind!r} (better, factor, top, last)")


def _clear(vals: dict[str, dict[int, float]], winners: list[str], losers: list[str], seeds: list[int]) -> bool:
    """Every winner-loser gap, paired by seed, is at least 2 standard errors wide (needs >= 2 seeds)."""
    if len(seeds) < 2:
        return False
    for w in winners:
        for loser in losers:
            diffs = np.array([vals[loser][s] - vals[w][s] for s in seeds])
            if not np.isfinite(diffs).all():  # a diverged run (inf): clear only if every seed goes the winner's way
                if not (diffs > 0).all():
                    return False
                continue
            se = diffs.std(ddof=1) / math.sqrt(len(diffs))
            if diffs.mean() < 2 * se or diffs.mean() <= 0:
                return False
    return True


def verdict(results: list[bool | None], paper: str) -> str:
    """``None``: holds on the means, but within the noise."""
    clear = sum(r is True for r in results)
    noisy = sum(r is None for r in results)
    if results and clear == len(results):
        return f"**Agrees with {paper}**"
    if clear == 0 and noisy == 0:
        return f"**Does not agree with {paper}**"
    note = f"{clear} of {len(results)} checks hold clearly" + (f", {noisy} only within the noise" if noisy else "")
    return f"**Agrees with {paper} in part** ({note})" if clear else f"**Does not clearly agree with {paper}** ({note})"


def _paper(table: dict, variant: str, column: str) -> str:
    value = table.get(variant, {}).get(column)
    return "—" if value is None else f"{value:.2f}"


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _mark(ok: bool | None) -> str:
    return "≈" if ok is None else "✓" if ok else "✗"


# --- analyses ----------------------------------------------------------------------------------------------------
@dataclass
class Section:
    body: list[str] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)


def _label(study: Study, variant: str) -> str:
    try:
        return study.variant(variant).label
    except Exception:  # noqa: BLE001 - a variant no longer in the file
        return variant


def _complete_seeds(runs: dict, variants: list[str], metrics: list[str]) -> list[int]:
    seeds = sorted({s for _, s in runs})
    return [s for s in seeds if all((v, s) in runs and all(m in runs[(v, s)].metrics for m in metrics) for v in variants)]


def ranking_section(study: Study, runs: dict, out_dir: Path, rel: str) -> Section:
    from scipy.stats import rankdata, spearmanr

    rep = study.report
    columns = rep.get("columns", [])
    paper = rep.get("paper", {})
    paper_ranks: dict[str, dict[str, float]] = paper.get("ranks", {})
    variants = [v.name for v in study.variants if any(k[0] == v.name for k in runs)]
    seeds = _complete_seeds(runs, variants, [c["metric"] for c in columns])
    sec = Section()
    if len(seeds) == 0:
        sec.body.append("_No seed has a finished run of every variant yet: nothing to rank._")
        return sec
    incomplete = sorted({s for _, s in runs} - set(seeds))
    ranks: dict[str, dict[str, list[float]]] = {}  # column label -> variant -> per-seed ranks
    for col in columns:
        per = {v: [] for v in variants}
        for s in seeds:
            r = rankdata([runs[(v, s)].metrics[col["metric"]] for v in variants])
            for v, rv in zip(variants, r):
                per[v].append(float(rv))
        ranks[col["label"]] = per
    all_ranks = {v: [float(np.mean([ranks[c["label"]][v][i] for c in columns])) for i in range(len(seeds))] for v in variants}
    order = sorted(variants, key=lambda v: paper_ranks.get(v, {}).get("all", math.inf))

    sec.body.append(f"Ranks over the {_n(len(seeds), 'seed')} that have every variant ({', '.join(map(str, seeds))})"
                    + (f"; seeds {', '.join(map(str, incomplete))} are incomplete and left out" if incomplete else "")
                    + ". Per seed the variants are ranked 1 (best, lowest W2) to " + str(len(variants))
                    + "; the table gives the mean rank ± std over seeds beside SD3's average rank (SD3 ranked many more "
                    "variants, so its numbers run higher; compare the order). \"all\" averages our columns' ranks per seed.\n")
    header = ["variant"]
    for col in columns:
        header += [f"SD3 {col['paper']}", f"ours, {col['label']}"]
    header += ["SD3 all", "ours, all"]
    rows = []
    for v in order:
        row = [_label(study, v)]
        for col in columns:
            row += [_paper(paper_ranks, v, col["paper"]), fmt_ms(ranks[col["label"]][v], 2)]
        row += [_paper(paper_ranks, v, "all"), fmt_ms(all_ranks[v], 2)]
        rows.append(row)
    sec.body.append(md_table(header, rows))

    # W2 values
    sec.body.append("\nThe metric behind the ranks (final validation, mean ± std over seeds):\n")
    w_rows = [[_label(study, v)] + [fmt_ms([runs[(v, s)].metrics[c["metric"]] for s in seeds]) for c in columns] for v in order]
    sec.body.append(md_table(["variant"] + [f"`{c['metric']}` ({c['label']})" for c in columns], w_rows))

    # agreement of orders
    sec.body.append("\nAgreement of the orders (Spearman's rho between our ranks and SD3's average ranks; 1 = same order):\n")
    rho_rows, col_verdicts = [], []
    pairs = [(c["label"], c["paper"], ranks[c["label"]]) for c in columns] + [("all", "all", all_ranks)]
    for label, pcol, per in pairs:
        have = [v for v in variants if pcol in paper_ranks.get(v, {})]
        if len(have) < 3:
            continue
        ref = [paper_ranks[v][pcol] for v in have]
        mean_r = [float(np.mean(per[v])) for v in have]
        rho, p = spearmanr(mean_r, ref)
        per_seed = [spearmanr([per[v][i] for v in have], ref)[0] for i in range(len(seeds))]
        m, sd = mean_std(per_seed)
        word = "matches" if rho >= 0.7 else "partly matches" if rho >= 0.3 else "does not match"
        col_verdicts.append((label, pcol, word, rho))
        rho_rows.append([f"ours {label} vs SD3 {pcol}", f"{rho:.2f} (p = {p:.2g})",
                         f"{m:.2f}{'' if math.isnan(sd) else f' ± {sd:.2f}'} (min {min(per_seed):.2f}, max {max(per_seed):.2f})", word])
    sec.body.append(md_table(["comparison", "rho of mean ranks", "rho per seed, mean ± std", "order"], rho_rows, "lrrl"))

    png = _ranking_plots(study, runs, seeds, variants, columns, ranks, paper_ranks, out_dir)
    sec.pngs += png
    sec.body.append("\n" + "\n".join(f"![{p.stem}]({rel}/{p.name})" for p in png))

    # claims, per column
    checks, lines = [], []
    for claim in rep.get("claims", []):
        parts = []
        for col in columns:
            ok, detail = check_claim(claim, runs, seeds, ranks=ranks[col["label"]], metric=col["metric"])
            checks.append(ok)
            parts.append(f"{col['label']}: {_mark(ok)} ({detail})")
        lines.append(f"- {claim.get('text', claim)} — " + "; ".join(parts))
    sec.body.append("\nSD3's findings, checked on our mean ranks (and per seed) (✓ holds, ≈ holds on the means but a gap is within 2 standard errors of the seed-paired differences, ✗ does not hold):\n\n" + "\n".join(lines))
    order_words = "; ".join(f"our {label} order {word} SD3's {pcol} order (rho {rho:.2f})" for label, pcol, word, rho in col_verdicts)
    words = [w for _, _, w, _ in col_verdicts]
    head = ("**Agrees with SD3**" if words and all(w == "matches" for w in words)
            else "**Does not agree with SD3**" if all(w == "does not match" for w in words) else "**Agrees with SD3 in part**")
    clear, noisy = sum(c is True for c in checks), sum(c is None for c in checks)
    sec.body.append(f"\n{head}: {order_words}. Of SD3's qualitative findings above, {clear} of {len(checks)} checks hold"
                    + (f" ({noisy} more only within the noise)" if noisy else "") + f". {_n(len(seeds), 'seed')}.")
    return sec


def _ranking_plots(study, runs, seeds, variants, columns, ranks, paper_ranks, out_dir: Path) -> list[Path]:
    plt = pyplot()
    order = sorted(variants, key=lambda v: paper_ranks.get(v, {}).get("all", math.inf))
    labels = [_label(study, v) for v in order]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(len(columns), 1)
    x = np.arange(len(order))
    for j, col in enumerate(columns):
        ms = [mean_std([runs[(v, s)].metrics[col["metric"]] for s in seeds]) for v in order]
        ax.bar(x + (j - (len(columns) - 1) / 2) * width, [m for m, _ in ms], width, yerr=[0 if math.isnan(s) else s for _, s in ms],
               color=series_color(j), capsize=3, label=f"{col['label']} ({col['metric']})")
        for i, v in enumerate(order):
            ax.scatter([x[i] + (j - (len(columns) - 1) / 2) * width] * len(seeds), [runs[(v, s)].metrics[col["metric"]] for s in seeds],
                       s=8, color="black", zorder=3)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("W2 to held-out data (lower is better)")
    ax.set_title(f"{study.name}: final W2 per variant, mean ± std over {len(seeds)} seeds (dots: seeds); SD3's order left to right")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p1 = out_dir / f"{study.name}_w2.png"
    save_figure(fig, p1)

    fig, axes = plt.subplots(1, len(columns), figsize=(5.2 * len(columns), 4.4), squeeze=False)
    for ax, col in zip(axes[0], columns):
        have = [v for v in variants if col["paper"] in paper_ranks.get(v, {})]
        xs = [paper_ranks[v][col["paper"]] for v in have]
        ms = [mean_std(ranks[col["label"]][v]) for v in have]
        ax.errorbar(xs, [m for m, _ in ms], yerr=[0 if math.isnan(s) else s for _, s in ms], fmt="o", capsize=3)
        for xv, (m, _), v in zip(xs, ms, have):
            ax.annotate(_label(study, v), (xv, m), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(f"SD3 average rank, {col['paper']}")
        ax.set_ylabel(f"our mean rank, {col['label']}")
        ax.set_title(f"{col['label']} vs SD3 {col['paper']}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    p2 = out_dir / f"{study.name}_ranks.png"
    save_figure(fig, p2)
    return [p1, p2]


def training_section(study: Study, runs: dict, out_dir: Path, rel: str) -> Section:
    rep = study.report
    variants = [v.name for v in study.variants if any(k[0] == v.name for k in runs)]
    seeds = sorted({s for _, s in runs})
    sec = Section()
    samplers = sorted({m.group("sampler") for r in runs.values() for k in r.metrics if (m := W2_KEY.match(k)) and f"val/nfe_{m.group('sampler')}" in r.metrics},
                      key=_sampler_order)
    # final quality per sampler
    header = ["variant", "`val/loss`"] + [f"W2 {s}" for s in samplers]
    if "dopri5" in samplers:
        header.append("dopri5 NFE")
    rows = []
    for v in variants:
        row = [_label(study, v), fmt_ms(_values(runs, v, "val/loss"))] + [fmt_ms(_values(runs, v, f"val/w2_{s}")) for s in samplers]
        if "dopri5" in samplers:
            row.append(fmt_ms(_values(runs, v, "val/nfe_dopri5"), 3))
        rows.append(row)
    n_per = {v: len(_values(runs, v, "val/loss")) for v in variants}
    counts = ", ".join(f"{_label(study, v)}: {_n(n, 'seed')}" for v, n in n_per.items())
    sec.body.append(f"Final validation ({counts}); W2 per sampler "
                    "(euler N = N network evaluations), mean ± std over seeds. `val/loss` is each objective's own "
                    "regression loss (velocity, eps or v) and is not comparable across objectives.\n")
    sec.body.append(md_table(header, rows))
    _curve_tables(sec, study, runs, variants, rep.get("curves", []))
    pngs = _training_plots(study, runs, variants, samplers, out_dir)
    sec.pngs += pngs
    sec.body.append("\n" + "\n".join(f"![{p.stem}]({rel}/{p.name})" for p in pngs))
    _append_claims(sec, rep, runs, seeds, "the paper")
    return sec


def _curve_tables(sec: "Section", study: Study, runs: dict, variants: list[str], metrics: list[str]) -> None:
    """One table per metric logged over training: its mean ± std over seeds at up to six of the logged steps."""
    for metric in metrics:
        steps = sorted({st for r in runs.values() for st, _ in r.history.get(metric, [])})
        if not steps:
            continue
        shown = sorted({steps[round(i * (len(steps) - 1) / 5)] for i in range(6)}) if len(steps) > 6 else steps
        t_rows = []
        for v in variants:
            row = [_label(study, v)]
            for st in shown:
                row.append(fmt_ms([val for (vv, _), r in runs.items() if vv == v for s2, val in r.history.get(metric, []) if s2 == st]))
            t_rows.append(row)
        sec.body.append(f"\n`{metric}` over training (after N steps; mean ± std over seeds):\n")
        sec.body.append(md_table(["variant"] + [f"{st}" for st in shown], t_rows))


def _append_claims(sec: "Section", rep: dict, runs: dict, seeds: list[int], default_paper: str) -> None:
    """The study's claims checked on the runs, one line each, and the verdict, appended to the section."""
    checks, lines = [], []
    for claim in rep.get("claims", []):
        ok, detail = check_claim(claim, runs, seeds)
        checks.append(ok)
        lines.append(f"- {claim.get('text', claim)}: {_mark(ok)} ({detail})")
    sec.body.append("\nThe paper's claims, checked on the means over seeds (and per seed) (✓ holds, ≈ holds on the means but a gap is within 2 standard errors of the seed-paired differences, ✗ does not hold):\n\n" + "\n".join(lines))
    per_variant = [sum(1 for (v, _) in runs if v == name) for name in {v for v, _ in runs}]
    seeds_text = _n(len(seeds), "seed") if min(per_variant, default=0) == max(per_variant, default=0) else \
        f"{min(per_variant)}-{max(per_variant)} seeds per variant"
    sec.body.append(f"\n{verdict(checks, rep.get('paper_name', default_paper))}. {seeds_text}.")


def _band(ax, runs, variant, metric, color, label):
    by_step: dict[int, list[float]] = {}
    for (v, _), r in runs.items():
        if v == variant:
            for st, val in r.history.get(metric, []):
                by_step.setdefault(st, []).append(val)
    if not by_step:
        return
    st = sorted(by_step)
    ms = [mean_std(by_step[s]) for s in st]
    m = np.array([a for a, _ in ms])
    sd = np.array([0 if math.isnan(b) else b for _, b in ms])
    ax.plot(st, m, color=color, marker="o", ms=3, label=label)
    ax.fill_between(st, m - sd, m + sd, color=color, alpha=0.2)


def _training_plots(study, runs, variants, samplers, out_dir: Path) -> list[Path]:
    plt = pyplot()
    out = []
    curves = [m for m in study.report.get("curves", []) if any(m in r.history for r in runs.values())]
    keys = curves + (["val/loss"] if any("val/loss" in r.history for r in runs.values()) else [])
    if keys:
        out.append(_curves_figure(study, runs, variants, keys, out_dir))
    if samplers:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, v in enumerate(variants):
            eul = [s for s in samplers if s.startswith("euler")]
            pts = [(mean_std(_values(runs, v, f"val/nfe_{s}"))[0], mean_std(_values(runs, v, f"val/w2_{s}"))) for s in eul]
            ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[0 if math.isnan(p[1][1]) else p[1][1] for p in pts],
                        color=series_color(i), marker="o", capsize=3, label=f"{_label(study, v)} (Euler)")
            if "dopri5" in samplers:
                nfe = mean_std(_values(runs, v, "val/nfe_dopri5"))[0]
                w2, sd = mean_std(_values(runs, v, "val/w2_dopri5"))
                ax.errorbar([nfe], [w2], yerr=[0 if math.isnan(sd) else sd], color=series_color(i), marker="D", capsize=3, linestyle="none",
                            label=f"{_label(study, v)} (dopri5)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_ylabel("final W2 (lower is better)")
        ax.set_title(f"{study.name}: final W2 vs NFE, mean ± std over seeds")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"{study.name}_w2_vs_nfe.png"
        save_figure(fig, p)
        out.append(p)
    return out


def reflow_section(study: Study, runs: dict, out_dir: Path, rel: str) -> Section:
    rep = study.report
    variants = [v.name for v in study.variants if any(k[0] == v.name for k in runs)]
    seeds = sorted({s for _, s in runs})
    columns = rep.get("columns", [])
    paper = rep.get("paper", {})
    sec = Section()
    header = ["variant", "seeds"] + [c["label"] for c in columns] + ([f"paper: {paper.get('metric', '1-step FID')}"] if paper.get("values") else [])
    rows = []
    for v in variants:
        row = [_label(study, v), str(len([1 for (vv, _) in runs if vv == v]))]
        row += [fmt_ms(_values(runs, v, c["metric"])) for c in columns]
        if paper.get("values"):
            row.append(f"{paper['values'][v]:g}" if v in paper["values"] else "—")
        rows.append(row)
    sec.body.append("Final validation, mean ± std over seeds (straightness is the RF paper's S of the sampling paths, "
                    "100 Euler steps from 1,000 fixed noise points; the distilled students are one-step maps, so S is not measured). "
                    + (f"Paper column: {paper.get('source')}; FID and W2 are different scales, compare the factors.\n" if paper.get("source") else "\n"))
    sec.body.append(md_table(header, rows))
    pngs = _reflow_plots(study, runs, variants, columns, out_dir)
    sec.pngs += pngs
    sec.body.append("\n" + "\n".join(f"![{p.stem}]({rel}/{p.name})" for p in pngs))
    _append_claims(sec, rep, runs, seeds, "the RF paper")
    return sec


def _reflow_plots(study, runs, variants, columns, out_dir: Path) -> list[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for i, v in enumerate(variants):
        samplers = sorted({m.group("sampler") for (vv, _), r in runs.items() if vv == v for k in r.metrics if (m := W2_KEY.match(k))}, key=_sampler_order)
        for adaptive in (False, True):  # Euler steps as a line, dopri5 as its own marker
            pts = [(mean_std(_values(runs, v, f"val/nfe_{s}"))[0], mean_std(_values(runs, v, f"val/w2_{s}"))) for s in samplers
                   if _values(runs, v, f"val/nfe_{s}") and (s == "dopri5") == adaptive]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[0 if math.isnan(p[1][1]) else p[1][1] for p in pts],
                            color=series_color(i), marker="D" if adaptive else "o", capsize=3, label=None if adaptive else _label(study, v),
                            linestyle="none" if adaptive else "-" if "distill" not in v else ":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (circles: Euler 1, 2, 8 steps; diamonds: dopri5)")
    ax.set_ylabel("final W2 (lower is better)")
    ax.set_title("W2 vs NFE, mean ± std over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax = axes[1]
    have = [v for v in variants if _values(runs, v, "val/straightness")]
    ms = [mean_std(_values(runs, v, "val/straightness")) for v in have]
    ax.bar(range(len(have)), [m for m, _ in ms], yerr=[0 if math.isnan(s) else s for _, s in ms], capsize=3,
           color=[series_color(variants.index(v)) for v in have])
    ax.set_xticks(range(len(have)), [_label(study, v) for v in have])
    ax.set_yscale("log")
    ax.set_ylabel("straightness S (0 = straight paths)")
    ax.set_title("straightness of the sampling paths")
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.suptitle(f"{study.name}: reflow and distillation on 8 gaussians")
    fig.tight_layout()
    p = out_dir / f"{study.name}_reflow.png"
    save_figure(fig, p)
    return [p]


def comparison_section(study: Study, runs: dict, out_dir: Path, rel: str) -> Section:
    """Variants side by side: each column's mean ± std over seeds, the paper's values where given, bars per column,
    optional curves over training and an optional sweep plot (each column against a swept setting)."""
    rep = study.report
    variants = [v.name for v in study.variants if any(k[0] == v.name for k in runs)]
    seeds = sorted({s for _, s in runs})
    columns = rep.get("columns", [])
    paper = rep.get("paper", {})
    paper_values: dict[str, dict] = paper.get("values", {})
    paper_cols = [c for c in columns if any(c["label"] in pv or c["metric"] in pv for pv in paper_values.values())]
    sec = Section()
    header = ["variant", "seeds"]
    any_diverged = any(DIVERGED_METRIC in r.metrics for r in runs.values())
    if any_diverged:
        header.append("loss diverged (at step)")
    for c in columns:
        header.append(f"{c['label']} {'↑' if c.get('higher') else '↓'}")
        if c in paper_cols:
            header.append(f"paper: {c['label']}")
    rows = []
    for v in variants:
        row = [_label(study, v), str(len([1 for (vv, _) in runs if vv == v]))]
        if any_diverged:
            steps = _values(runs, v, DIVERGED_METRIC)
            row.append(f"{len(steps)} ({', '.join(f'{x:.0f}' for x in steps)})" if steps else "0")
        for c in columns:
            row.append(fmt_ms(_values(runs, v, c["metric"])))
            if c in paper_cols:
                pv = paper_values.get(v, {})
                value = pv.get(c["label"], pv.get(c["metric"]))
                row.append("—" if value is None else f"{value:g}")
        rows.append(row)
    sec.body.append("Final validation, mean ± std over seeds (↑ higher is better, ↓ lower is better; — where a variant does not "
                    "have the metric)." + (" A run whose training loss became NaN or infinite stops there (before the bad update); it "
                    "counts in the 'loss diverged' column and has no final metrics, so its variant's means are over the other seeds, and "
                    "the claims count it as the worst outcome." if any_diverged else "") + (f" Paper values: {paper['source']}." if paper.get("source") else "") + "\n")
    sec.body.append(md_table(header, rows))
    curves = [m for m in rep.get("curves", []) if any(m in r.history for r in runs.values())]
    _curve_tables(sec, study, runs, variants, curves)
    pngs = _comparison_plots(study, runs, variants, columns, curves, out_dir)
    sec.pngs += pngs
    sec.body.append("\n" + "\n".join(f"![{p.stem}]({rel}/{p.name})" for p in pngs))
    _append_claims(sec, rep, runs, seeds, "the paper")
    return sec


def _comparison_plots(study, runs, variants, columns, curves, out_dir: Path) -> list[Path]:
    plt = pyplot()
    out = []
    columns = [c for c in columns if any(_values(runs, v, c["metric"]) for v in variants)]  # none of these runs log the others
    sweep = study.report.get("sweep")
    if columns and sweep:  # each column against the swept setting, a line per series
        fig, axes = plt.subplots(1, len(columns), figsize=(4.6 * len(columns), 3.9), squeeze=False)
        for ax, col in zip(axes[0], columns):
            for i, (name, members) in enumerate(sweep.get("series", {}).items()):
                vals = {float(x): _values(runs, v, col["metric"]) for v, x in members.items()}
                pts = sorted((x, mean_std(vs)) for x, vs in vals.items() if vs)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[0 if math.isnan(p[1][1]) else p[1][1] for p in pts],
                                color=series_color(i), marker="o", capsize=3, label=name)
                    for x, vs in vals.items():  # every seed as a dot
                        ax.scatter([x] * len(vs), vs, color=series_color(i), s=8, alpha=0.5)
            if sweep.get("log_x", True):
                ax.set_xscale("log")
            if col.get("log_y"):
                ax.set_yscale("log")
            ax.set_xlabel(sweep.get("x_label", "setting"))
            ax.set_title(f"{col['label']} ({'higher' if col.get('higher') else 'lower'} is better)", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"{study.name}: final values, mean ± std over seeds (dots: seeds)")
        fig.tight_layout()
        p = out_dir / f"{study.name}_sweep.png"
        save_figure(fig, p)
        out.append(p)
    elif columns:  # bars per column
        fig, axes = plt.subplots(1, len(columns), figsize=(max(7.0, max(4.0, 0.9 * len(variants) + 1.6) * len(columns)), 4.2), squeeze=False)
        for ax, col in zip(axes[0], columns):
            have = [v for v in variants if _values(runs, v, col["metric"])]
            for j, v in enumerate(have):  # mean ± std as a marker with error bars (no zero baseline: small gaps stay visible)
                vals = _values(runs, v, col["metric"])
                m, sd = mean_std(vals)
                ax.errorbar([j], [m], yerr=[0 if math.isnan(sd) else sd], color=series_color(variants.index(v)), marker="o",
                            markersize=8, capsize=4)
                ax.scatter([j + 0.12] * len(vals), vals, color="black", s=8, zorder=3)
            ax.set_xlim(-0.5, len(have) - 0.5)
            ax.set_xticks(range(len(have)), [_label(study, v) for v in have], rotation=30, ha="right", fontsize=8)
            if col.get("log_y"):
                ax.set_yscale("log")
            ax.set_title(f"{col['label']} ({'higher' if col.get('higher') else 'lower'} is better)", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{study.name}: final values, mean ± std over seeds (small dots: seeds)")
        fig.tight_layout()
        p = out_dir / f"{study.name}_final.png"
        save_figure(fig, p)
        out.append(p)
    if curves:
        out.append(_curves_figure(study, runs, variants, curves, out_dir))
    return out


def _curves_figure(study, runs, variants, keys, out_dir: Path) -> Path:
    """<study>_training.png: one panel per metric over training, a mean ± std band per variant."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(max(7.0, 4.8 * len(keys)), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, v in enumerate(variants):
            _band(ax, runs, v, key, series_color(i), _label(study, v))
        ax.set_xlabel("training steps")
        ax.set_title(key + (" (own objective's loss)" if key == "val/loss" and study.report.get("kind") == "training" else ""))
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{study.name}: over training, mean ± std over seeds")
    fig.tight_layout()
    p = out_dir / f"{study.name}_training.png"
    save_figure(fig, p)
    return p


ANALYSES = {"ranking": ranking_section, "training": training_section, "reflow": reflow_section, "comparison": comparison_section}


# --- the section and the file ------------------------------------------------------------------------------------
def _history_keys(study: Study) -> list[str]:
    rep = study.report
    keys = set(rep.get("curves", []))
    if rep.get("kind") == "training":
        keys.add("val/loss")
    for claim in rep.get("claims", []):
        if claim.get("at", "final") != "final" and claim.get("metric"):
            keys.add(claim["metric"])
    return sorted(keys)


def run_table(study: Study, runs: dict[tuple[str, int], RunRecord]) -> str:
    metrics = list(study.report.get("headline", []))
    rows = []
    order = {v.name: i for i, v in enumerate(study.variants)}
    for (v, s), r in sorted(runs.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        rows.append([_label(study, v), str(s), f"`{r.run_id}`", r.params.get("trainer.max_steps", "—"),
                     f"{r.seconds:.0f}" if r.seconds else "—"] + [fmt(r.metrics.get(m)) for m in metrics])
    return md_table(["variant", "seed", "MLflow run id", "steps", "seconds"] + [f"`{m}`" for m in metrics], rows)


def render_section(study: Study, budget: str, runs: dict, sec: Section, tracking_uri: str, command: str) -> str:
    steps = sorted({r.params.get("trainer.max_steps", "?") for r in runs.values()})
    seeds = sorted({s for _, s in runs})
    seconds = [r.seconds for r in runs.values() if r.seconds]
    commits = sorted({r.commit[:12] + ("-dirty" if r.commit.endswith("-dirty") else "") for r in runs.values() if r.commit})
    title = study.report.get("title", study.name) + ("" if budget == "small" else f" (budget {budget})")
    parts = [f"<!-- study:{study.name} begin -->", f"## {title}", "",
             study.description, "",
             f"Budget `{budget}`: {len(runs)} finished runs of {_n(len({v for v, _ in runs}), 'variant')} at "
             f"{_n(len(seeds), 'seed')} ({', '.join(map(str, seeds))}), {'/'.join(steps)} training steps each, {sum(seconds) / 60:.1f} min of run time in total"
             f" (MLflow `{tracking_uri}`, experiment `{study.experiment}`). Study file: "
             f"[experiments/studies/{study.path.name}](../experiments/studies/{study.path.name}). "
             f"Regenerate this section: `{command}`.", ""]
    if commits:
        parts += [f"Code (git commit of the runs): {', '.join(commits)}.", ""]
    parts += sec.body
    discussion = study.report.get("discussion", "")
    if isinstance(discussion, dict):  # one text per budget: its runs differ
        discussion = discussion.get(budget, "")
    discussion = str(discussion or "").strip()
    if discussion:
        parts += ["", "Why, at this scale (hand-written for the runs below, in the study file): " + discussion]
    parts += ["", f"<details><summary>The {len(runs)} MLflow runs behind these numbers</summary>", "", run_table(study, runs), "", "</details>",
              f"<!-- study:{study.name} end -->"]
    return "\n".join(parts) + "\n"


def replace_section(text: str, name: str, section: str) -> str:
    begin, end = f"<!-- study:{name} begin -->", f"<!-- study:{name} end -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + section.rstrip("\n") + tail
    if not text.strip():
        text = HEADER
    return text.rstrip("\n") + "\n\n" + section


def write_results(study: Study, budget: str, tracking_uri: str, out: str | Path = "docs/results", command: str | None = None) -> tuple[Path, list[Path]]:
    """Write (or replace) the study's section of OUT.md and its plots OUT/<study>_*.png (budgets other than small:
    section and plots named <study>_<budget>); returns (OUT.md, the plots)."""
    out_dir = Path(out)
    md = out_dir.with_suffix(".md")
    runs = collect(study, budget, tracking_uri, _history_keys(study))
    kind = study.report.get("kind")
    if kind not in ANALYSES:
        raise ResultsError(f"{study.path}: report.kind must be one of {', '.join(ANALYSES)}, got {kind!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = command or f"python -m flowmatch study {study.name} --budget {budget} --report-only"
    # the small budget (this machine's) is the study's main section; larger budgets get their own section and plots
    shown = study if budget == "small" else dataclasses.replace(study, name=f"{study.name}_{budget}")
    sec = ANALYSES[kind](shown, runs, out_dir, out_dir.name)
    section = render_section(shown, budget, runs, sec, tracking_uri, command)
    text = md.read_text(encoding="utf-8") if md.is_file() else ""
    md.write_text(with_summary(replace_section(text, shown.name, section)), encoding="utf-8")
    return md, sec.pngs


SECTION = re.compile(r"<!-- study:(?P<name>[A-Za-z0-9_.-]+) begin -->\n## (?P<title>[^\n]*)\n(?P<body>.*?)<!-- study:(?P=name) end -->", re.S)
VERDICT = re.compile(r"^(\*\*(?:Agrees|Does not)[^*]*\*\*.*)$", re.M)


def with_summary(text: str) -> str:
    """The file with its summary (one line per study section: its verdict) rebuilt after the header."""
    lines = []
    for m in SECTION.finditer(text):
        v = VERDICT.search(m.group("body"))
        anchor = re.sub(r"[^a-z0-9 -]", "", m.group("title").lower()).replace(" ", "-")
        lines.append(f"- [{m.group('title')}](#{anchor}) (`{m.group('name')}`): {v.group(1) if v else '(no verdict)'}")
    block = "<!-- summary begin -->\n## Summary\n\n" + "\n".join(lines) + "\n<!-- summary end -->"
    if "<!-- summary begin -->" in text:
        head, rest = text.split("<!-- summary begin -->", 1)
        return head + block + rest.split("<!-- summary end -->", 1)[1]
    first = text.find("<!-- study:")
    return text[:first].rstrip("\n") + "\n\n" + block + "\n\n" + text[first:] if first >= 0 else text
