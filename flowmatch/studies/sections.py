"""The analyses of a study's results, one per ``report.kind``: each builds the section's tables, plots and claims.

* ``kind: ranking`` (SD3's formulation study): per seed, the variants ranked by each column's
  metric (lower is better), the ranks averaged over seeds, and compared with the paper's average
  ranks (Spearman's rho of the mean ranks, and per seed);
* ``kind: training`` (FM vs. VP): final quality per sampler and NFE, and quality over training;
* ``kind: reflow``: the columns' means per variant beside the paper's numbers, and the factors
  between variants;
* ``kind: comparison`` (architectures, latent channels, QK-norm, reflow on images): the columns' means
  per variant (which way is better from flowmatch.metrics.directions, as ``higher``), optional paper values
  (``paper.values: {variant: {column label or metric: number}}``), bar plots per column, optional
  ``curves`` (metrics over training: a table and a plot) and an optional ``sweep`` (``x_label``,
  ``log_x``, ``series: {name: {variant: x}}``): each column against x, one line per series.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from flowmatch.training.divergence import DIVERGED_METRIC
from flowmatch.studies.claims import append_claims, check_claim, mark
from flowmatch.studies.markdown import Section, fmt_ms, md_table, plural
from flowmatch.studies.plots import comparison_plots, ranking_plots, reflow_plots, training_plots
from flowmatch.studies.queries import Runs
from flowmatch.studies.spec import Study
from flowmatch.studies.statistics import W2_KEY, complete_seeds, mean_std, metric_values, runs_per_variant, sampler_order, seeds_of, variants_of


def _best_phrase(columns: list[dict]) -> str:
    """What "best" means for a ranking's columns: "lowest W2" for the point studies, else per column's direction."""
    if all(c["metric"].startswith("val/w2") for c in columns):
        return "lowest W2"
    return "the lowest value of a column marked lower-is-better, the highest where higher is better"


def _paper_rank(table: dict, variant: str, column: str) -> str:
    value = table.get(variant, {}).get(column)
    return "—" if value is None else f"{value:.2f}"


def ranking_section(study: Study, runs: Runs, out_dir: Path, rel: str) -> Section:
    """Per seed, the variants ranked by each column's metric; the mean ranks beside SD3's, the agreement of the orders
    (Spearman's rho), the plots and SD3's findings checked per column."""
    rep = study.report
    columns = rep.get("columns", [])
    paper_ranks: dict[str, dict[str, float]] = rep.get("paper", {}).get("ranks", {})
    variants = variants_of(study, runs)
    seeds = complete_seeds(runs, variants, [c["metric"] for c in columns])
    sec = Section()
    if len(seeds) == 0:
        sec.body.append("_No seed has a finished run of every variant yet: nothing to rank._")
        return sec
    ranks = _per_seed_ranks(runs, variants, seeds, columns)
    all_ranks = {v: [float(np.mean([ranks[c["label"]][v][i] for c in columns])) for i in range(len(seeds))] for v in variants}
    _rank_tables(sec, study, runs, variants, seeds, ranks, all_ranks, paper_ranks)
    agreement = _order_agreement(sec, variants, seeds, columns, ranks, all_ranks, paper_ranks)
    sec.add_plots(ranking_plots(study, runs, seeds, variants, columns, ranks, paper_ranks, out_dir), rel)
    _ranking_claims(sec, rep, runs, seeds, columns, ranks, agreement)
    return sec


def _per_seed_ranks(runs: Runs, variants: list[str], seeds: list[int], columns: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Column label -> variant -> its rank at each seed (1 = the best metric: the lowest, or the highest where
    higher is better)."""
    from scipy.stats import rankdata

    ranks: dict[str, dict[str, list[float]]] = {}
    for col in columns:
        per = {v: [] for v in variants}
        sign = -1.0 if col.get("higher") else 1.0
        for s in seeds:
            r = rankdata([sign * runs[(v, s)].metrics[col["metric"]] for v in variants])
            for v, rv in zip(variants, r):
                per[v].append(float(rv))
        ranks[col["label"]] = per
    return ranks


def _rank_tables(sec: Section, study: Study, runs: Runs, variants: list[str], seeds: list[int], ranks: dict, all_ranks: dict,
                 paper_ranks: dict) -> None:
    """Our mean ranks beside SD3's average ranks (in SD3's order), and the metric values behind them."""
    columns = study.report.get("columns", [])
    incomplete = sorted(set(seeds_of(runs)) - set(seeds))
    order = sorted(variants, key=lambda v: paper_ranks.get(v, {}).get("all", math.inf))
    sec.body.append(f"Ranks over the {plural(len(seeds), 'seed')} that have every variant ({', '.join(map(str, seeds))})"
                    + (f"; seeds {', '.join(map(str, incomplete))} are incomplete and left out" if incomplete else "")
                    + ". Per seed the variants are ranked 1 (best, " + _best_phrase(columns) + ") to " + str(len(variants))
                    + "; the table gives the mean rank ± std over seeds beside SD3's average rank (SD3 ranked many more "
                    "variants, so its numbers run higher; compare the order). \"all\" averages our columns' ranks per seed.\n")
    header = ["variant"]
    for col in columns:
        header += [f"SD3 {col['paper']}", f"ours, {col['label']}"]
    header += ["SD3 all", "ours, all"]
    rows = []
    for v in order:
        row = [study.label(v)]
        for col in columns:
            row += [_paper_rank(paper_ranks, v, col["paper"]), fmt_ms(ranks[col["label"]][v], 2)]
        row += [_paper_rank(paper_ranks, v, "all"), fmt_ms(all_ranks[v], 2)]
        rows.append(row)
    sec.body.append(md_table(header, rows))
    sec.body.append("\nThe metric behind the ranks (final validation, mean ± std over seeds):\n")
    w_rows = [[study.label(v)] + [fmt_ms([runs[(v, s)].metrics[c["metric"]] for s in seeds]) for c in columns] for v in order]
    sec.body.append(md_table(["variant"] + [f"`{c['metric']}` ({c['label']})" for c in columns], w_rows))


def _order_agreement(sec: Section, variants: list[str], seeds: list[int], columns: list[dict], ranks: dict, all_ranks: dict,
                     paper_ranks: dict) -> list[tuple[str, str, str, float]]:
    """The table of Spearman's rho between our ranks and SD3's; returns (our column, SD3's column, word, rho) per comparison."""
    from scipy.stats import spearmanr

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
    return col_verdicts


def _ranking_claims(sec: Section, rep: dict, runs: Runs, seeds: list[int], columns: list[dict], ranks: dict,
                    agreement: list[tuple[str, str, str, float]]) -> None:
    """SD3's findings checked on our mean ranks, per column, and the verdict (the orders' agreement and the findings)."""
    checks, lines = [], []
    for claim in rep.get("claims", []):
        parts = []
        for col in columns:
            ok, detail = check_claim(claim, runs, seeds, ranks=ranks[col["label"]], metric=col["metric"])
            checks.append(ok)
            parts.append(f"{col['label']}: {mark(ok)} ({detail})")
        lines.append(f"- {claim.get('text', claim)} — " + "; ".join(parts))
    sec.body.append("\nSD3's findings, checked on our mean ranks (and per seed) (✓ holds, ≈ holds on the means but a gap is within 2 standard errors of the seed-paired differences, ✗ does not hold):\n\n" + "\n".join(lines))
    order_words = "; ".join(f"our {label} order {word} SD3's {pcol} order (rho {rho:.2f})" for label, pcol, word, rho in agreement)
    words = [w for _, _, w, _ in agreement]
    head = ("**Agrees with SD3**" if words and all(w == "matches" for w in words)
            else "**Does not agree with SD3**" if all(w == "does not match" for w in words) else "**Agrees with SD3 in part**")
    clear, noisy = sum(c is True for c in checks), sum(c is None for c in checks)
    sec.body.append(f"\n{head}: {order_words}. Of SD3's qualitative findings above, {clear} of {len(checks)} checks hold"
                    + (f" ({noisy} more only within the noise)" if noisy else "") + f". {plural(len(seeds), 'seed')}.")


def training_section(study: Study, runs: Runs, out_dir: Path, rel: str) -> Section:
    """Final quality per sampler (one table per quality metric, and the NFE) and quality over training, the plots and
    the paper's claims. ``report.quality`` lists the quality metrics as ``{prefix, label}`` (``val/<prefix>_<sampler>``;
    default W2 of the point studies: ``[{prefix: w2, label: W2}]``)."""
    rep = study.report
    variants = variants_of(study, runs)
    seeds = seeds_of(runs)
    sec = Section()
    qualities = training_qualities(rep)
    samplers = logged_samplers(runs, qualities[0]["prefix"])
    n_per = {v: len(metric_values(runs, v, "val/loss")) for v in variants}
    counts = ", ".join(f"{study.label(v)}: {plural(n, 'seed')}" for v, n in n_per.items())
    for i, q in enumerate(qualities):
        header = ["variant"] + (["`val/loss`"] if i == 0 else []) + [f"{q['label']} {s}" for s in samplers]
        if "dopri5" in samplers:
            header.append("dopri5 NFE")
        rows = []
        for v in variants:
            row = [study.label(v)] + ([fmt_ms(metric_values(runs, v, "val/loss"))] if i == 0 else [])
            row += [fmt_ms(metric_values(runs, v, f"val/{q['prefix']}_{s}")) for s in samplers]
            if "dopri5" in samplers:
                row.append(fmt_ms(metric_values(runs, v, "val/nfe_dopri5"), 3))
            rows.append(row)
        if i == 0:
            sec.body.append(f"Final validation ({counts}); {q['label']} per sampler "
                            "(euler N = N network evaluations), mean ± std over seeds. `val/loss` is each objective's own "
                            "regression loss (velocity, eps or v) and is not comparable across objectives.\n")
        else:
            sec.body.append(f"\n{q['label']} per sampler at the final validation, mean ± std over seeds:\n")
        sec.body.append(md_table(header, rows))
    curve_tables(sec, study, runs, variants, rep.get("curves", []))
    sec.add_plots(training_plots(study, runs, variants, samplers, out_dir, qualities), rel)
    append_claims(sec, rep, runs, seeds, "the paper")
    return sec


def training_qualities(rep: dict) -> list[dict]:
    """The quality metrics of a ``kind: training`` report: ``[{prefix, label}]`` (default W2)."""
    return [{"prefix": str(q["prefix"]), "label": str(q.get("label", q["prefix"]))} for q in rep.get("quality") or [{"prefix": "w2", "label": "W2"}]]


def logged_samplers(runs: Runs, prefix: str) -> list[str]:
    """The samplers with a logged ``val/<prefix>_<sampler>`` and ``val/nfe_<sampler>`` in some run: Euler by steps,
    then the other fixed-step solvers (e.g. DDIM), dopri5 last."""
    pattern = re.compile(rf"^val/{re.escape(prefix)}_(?P<sampler>.+)$")
    found = {m.group("sampler") for r in runs.values() for k in r.metrics if (m := pattern.match(k)) and f"val/nfe_{m.group('sampler')}" in r.metrics}
    return sorted(found, key=lambda s: (sampler_order(s)[0], sampler_order(s)[1] != "euler", *sampler_order(s)[1:]))


def curve_tables(sec: Section, study: Study, runs: Runs, variants: list[str], metrics: list[str]) -> None:
    """One table per metric logged over training: its mean ± std over seeds at up to six of the logged steps."""
    for metric in metrics:
        steps = sorted({st for r in runs.values() for st, _ in r.history.get(metric, [])})
        if not steps:
            continue
        shown = sorted({steps[round(i * (len(steps) - 1) / 5)] for i in range(6)}) if len(steps) > 6 else steps
        t_rows = []
        for v in variants:
            row = [study.label(v)]
            for st in shown:
                row.append(fmt_ms([val for (vv, _), r in runs.items() if vv == v for s2, val in r.history.get(metric, []) if s2 == st]))
            t_rows.append(row)
        sec.body.append(f"\n`{metric}` over training (after N steps; mean ± std over seeds):\n")
        sec.body.append(md_table(["variant"] + [f"{st}" for st in shown], t_rows))


def reflow_section(study: Study, runs: Runs, out_dir: Path, rel: str) -> Section:
    """The columns' means per variant beside the paper's numbers, the plots and the RF paper's claims."""
    rep = study.report
    variants = variants_of(study, runs)
    seeds = seeds_of(runs)
    columns = rep.get("columns", [])
    paper = rep.get("paper", {})
    sec = Section()
    header = ["variant", "seeds"] + [c["label"] for c in columns] + ([f"paper: {paper.get('metric', '1-step FID')}"] if paper.get("values") else [])
    rows = []
    for v in variants:
        row = [study.label(v), str(runs_per_variant(runs, v))]
        row += [fmt_ms(metric_values(runs, v, c["metric"])) for c in columns]
        if paper.get("values"):
            row.append(f"{paper['values'][v]:g}" if v in paper["values"] else "—")
        rows.append(row)
    sec.body.append("Final validation, mean ± std over seeds (straightness is the RF paper's S of the sampling paths, "
                    "100 Euler steps from 1,000 fixed noise points; the distilled students are one-step maps, so S is not measured). "
                    + (f"Paper column: {paper.get('source')}; FID and W2 are different scales, compare the factors.\n" if paper.get("source") else "\n"))
    sec.body.append(md_table(header, rows))
    sec.add_plots(reflow_plots(study, runs, variants, columns, out_dir), rel)
    append_claims(sec, rep, runs, seeds, "the RF paper")
    return sec


def comparison_section(study: Study, runs: Runs, out_dir: Path, rel: str) -> Section:
    """Variants side by side: each column's mean ± std over seeds, the paper's values where given, bars per column,
    optional curves over training and an optional sweep plot (each column against a swept setting)."""
    rep = study.report
    variants = variants_of(study, runs)
    sec = Section()
    _comparison_table(sec, study, runs, variants)
    curves = [m for m in rep.get("curves", []) if any(m in r.history for r in runs.values())]
    curve_tables(sec, study, runs, variants, curves)
    sec.add_plots(comparison_plots(study, runs, variants, rep.get("columns", []), curves, out_dir), rel)
    append_claims(sec, rep, runs, seeds_of(runs), "the paper")
    return sec


def _comparison_table(sec: Section, study: Study, runs: Runs, variants: list[str]) -> None:
    """The columns' final values per variant (with the runs that diverged, and the paper's values where given)."""
    columns = study.report.get("columns", [])
    paper = study.report.get("paper", {})
    paper_values: dict[str, dict] = paper.get("values", {})
    paper_cols = [c for c in columns if any(c["label"] in pv or c["metric"] in pv for pv in paper_values.values())]
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
        row = [study.label(v), str(runs_per_variant(runs, v))]
        if any_diverged:
            steps = metric_values(runs, v, DIVERGED_METRIC)
            row.append(f"{len(steps)} ({', '.join(f'{x:.0f}' for x in steps)})" if steps else "0")
        for c in columns:
            row.append(fmt_ms(metric_values(runs, v, c["metric"])))
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


ANALYSES = {"ranking": ranking_section, "training": training_section, "reflow": reflow_section, "comparison": comparison_section}
