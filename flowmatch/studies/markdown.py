"""The Markdown of a study's results: number formats, tables, the section's frame and the file of all sections.

Each study's text sits between ``<!-- study:NAME begin -->`` and ``<!-- study:NAME end -->`` so that
writing one study keeps the others; the summary after the file's header lists every section's verdict.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from flowmatch.studies.queries import Runs
from flowmatch.studies.spec import Study
from flowmatch.studies.statistics import mean_std, seeds_of

HEADER = """# Results: the papers' claims at small scale

Each section below is written by `python -m flowmatch study NAME --budget BUDGET --report-only` from
the MLflow runs of that study alone (tags `study`, `variant`, `seed`, `budget`); the runs' ids are
listed at the end of each section, so every number can be looked up in the tracking store
(`mlflow ui --backend-store-uri sqlite:///mlflow.db`, experiment `studies`). Writing one study's
section keeps the others. Plots are in [results/](results/). The studies are defined in
[experiments/studies/](../experiments/studies/); the science and the papers' numbers are in [spec.md](spec.md).

Sample quality on 2-D data is W2, the exact 2-Wasserstein distance between 1,000 generated points
and 1,000 held-out data points (lower is better). Two independent 1,000-point samples of the
8-gaussians target are themselves 0.31 ± 0.06 apart (6 pairs), so W2 values near 0.3 mean "as good
as this metric can tell"; a model can score a little below that against the fixed held-out set.
Every run is scored with the same sampling noise against the same held-out points, so differences
between runs are paired. Tables give the mean ± standard deviation over seeds (sample std, n - 1).
"""


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


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class Section:
    """A study's analysis: its Markdown paragraphs and tables, and the plots they show."""

    body: list[str] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)

    def add_plots(self, pngs: list[Path], rel: str) -> None:
        """The plots, shown as images linked relative to the Markdown file (``rel``: the plots' folder)."""
        self.pngs += pngs
        self.body.append("\n" + "\n".join(f"![{p.stem}]({rel}/{p.name})" for p in pngs))


def run_table(study: Study, runs: Runs) -> str:
    """Every run behind the section: variant, seed, MLflow run id, steps, seconds and the report's headline metrics."""
    metrics = list(study.report.get("headline", []))
    rows = []
    order = {v.name: i for i, v in enumerate(study.variants)}
    for (v, s), r in sorted(runs.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        rows.append([study.label(v), str(s), f"`{r.run_id}`", r.params.get("trainer.max_steps", "—"),
                     f"{r.seconds:.0f}" if r.seconds else "—"] + [fmt(r.metrics.get(m)) for m in metrics])
    return md_table(["variant", "seed", "MLflow run id", "steps", "seconds"] + [f"`{m}`" for m in metrics], rows)


def render_section(study: Study, budget: str, runs: Runs, sec: Section, tracking_uri: str, command: str) -> str:
    """The study's whole section: title, description, the runs' budget and code, the analysis, the discussion, the run table."""
    steps = sorted({r.params.get("trainer.max_steps", "?") for r in runs.values()})
    seeds = seeds_of(runs)
    seconds = [r.seconds for r in runs.values() if r.seconds]
    commits = sorted({r.commit[:12] + ("-dirty" if r.commit.endswith("-dirty") else "") for r in runs.values() if r.commit})
    title = study.report.get("title", study.name) + ("" if budget == "small" else f" (budget {budget})")
    parts = [f"<!-- study:{study.name} begin -->", f"## {title}", "",
             study.description, "",
             f"Budget `{budget}`: {len(runs)} finished runs of {plural(len({v for v, _ in runs}), 'variant')} at "
             f"{plural(len(seeds), 'seed')} ({', '.join(map(str, seeds))}), {'/'.join(steps)} training steps each, {sum(seconds) / 60:.1f} min of run time in total"
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
    """The file's text with the study's section replaced (or appended; an empty file starts with HEADER)."""
    begin, end = f"<!-- study:{name} begin -->", f"<!-- study:{name} end -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + section.rstrip("\n") + tail
    if not text.strip():
        text = HEADER
    return text.rstrip("\n") + "\n\n" + section


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
