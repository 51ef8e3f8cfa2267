"""Statistics over a study's runs: which variants and seeds are there, a metric's values per variant, means and spreads."""

from __future__ import annotations

import math
import re

import numpy as np

from flowmatch.studies.queries import RunRecord, Runs
from flowmatch.studies.spec import Study

W2_KEY = re.compile(r"^val/w2_(?P<sampler>.+)$")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the values that are numbers (nan where there are none / one)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def metric_values(runs: Runs, variant: str, metric: str, seeds: list[int] | None = None) -> list[float]:
    """The final values of ``metric`` of the variant's runs that have it, by seed."""
    return [r.metrics[metric] for (v, s), r in sorted(runs.items()) if v == variant and metric in r.metrics and (seeds is None or s in seeds)]


def metric_value(rec: RunRecord, metric: str, at: str) -> float | None:
    """A run's value of ``metric`` at the ``final`` validation, the ``first`` one, or its ``mean_over_training``."""
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


def seeds_of(runs: Runs) -> list[int]:
    return sorted({s for _, s in runs})


def variants_of(study: Study, runs: Runs) -> list[str]:
    """The study's variants that have runs, in the study file's order."""
    return [v.name for v in study.variants if any(k[0] == v.name for k in runs)]


def runs_per_variant(runs: Runs, variant: str) -> int:
    return len([1 for (v, _) in runs if v == variant])


def complete_seeds(runs: Runs, variants: list[str], metrics: list[str]) -> list[int]:
    """The seeds at which every variant has a run with every metric."""
    return [s for s in seeds_of(runs) if all((v, s) in runs and all(m in runs[(v, s)].metrics for m in metrics) for v in variants)]


def sampler_order(sampler: str) -> tuple:
    """euler1 < euler2 < ... < heun4 < dopri5 (adaptive last)."""
    if sampler.startswith("dopri5"):
        return (True, sampler, 0)
    m = re.match(r"^([a-z_]+?)(\d*)((:.*)?)$", sampler)
    solver, steps = (m.group(1) + m.group(3), int(m.group(2) or 0)) if m else (sampler, 0)
    return (False, solver, steps)
