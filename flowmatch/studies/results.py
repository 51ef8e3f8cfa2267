"""A study's section of the results (docs/results.md) and its plots, written from its MLflow runs alone.

The runs are those the study runner tags (``study``, ``budget``, the variant's current
``study_fingerprint``, status FINISHED; the latest per variant and seed). Every number in the
section is a statistic over those runs, and the section ends with the table of their run ids.
The study file's ``report`` chooses the analysis (``kind``: ranking, training, reflow or comparison)
and the paper's ``claims`` it checks; ``report.discussion`` (optional, hand-written; a text, or a
mapping budget -> text) is printed under the verdict.

The jobs, one module each (this one puts them together):

* flowmatch.studies.queries: the runs, read from one or several MLflow stores;
* flowmatch.studies.statistics: which variants and seeds, a metric's values, means and spreads;
* flowmatch.studies.claims: the paper's claims checked on the runs, and the verdict;
* flowmatch.studies.sections: the analysis of each report kind (tables, plots and claims);
* flowmatch.studies.plots: the figures;
* flowmatch.studies.markdown: number formats, tables, the section and the file of all sections.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flowmatch.studies.claims import check_claim, verdict
from flowmatch.studies.markdown import HEADER, Section, fmt, fmt_ms, md_table, render_section, replace_section, run_table, with_summary
from flowmatch.studies.queries import ResultsError, RunRecord, collect, history_metrics
from flowmatch.studies.sections import ANALYSES, comparison_section, ranking_section, reflow_section, training_section
from flowmatch.studies.spec import Study
from flowmatch.studies.statistics import mean_std

__all__ = ["ANALYSES", "HEADER", "ResultsError", "RunRecord", "Section", "check_claim", "collect", "comparison_section", "fmt",
           "fmt_ms", "md_table", "mean_std", "ranking_section", "reflow_section", "render_section", "replace_section", "run_table",
           "training_section", "verdict", "with_summary", "write_results"]


def write_results(study: Study, budget: str, tracking_uri: str, out: str | Path = "docs/results", command: str | None = None) -> tuple[Path, list[Path]]:
    """Write (or replace) the study's section of OUT.md and its plots OUT/<study>_*.png (budgets other than small:
    section and plots named <study>_<budget>); returns (OUT.md, the plots)."""
    out_dir = Path(out)
    md = out_dir.with_suffix(".md")
    runs = collect(study, budget, tracking_uri, history_metrics(study))
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
