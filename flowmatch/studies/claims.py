"""The papers' claims checked on a study's runs, and the verdict.

``report.claims`` are the paper's qualitative findings, each checked on the means and per seed:
``better`` (variant(s) lower than others on a metric, ``at`` final / first / mean_over_training),
``factor`` (others / variant >= min_factor), ``top`` (among the k best), ``last``; which way is
better comes from the platform's table (flowmatch.metrics.directions: accuracies and PSNR higher, losses
and distances lower), which ``load_study`` writes into each claim as ``higher``. A ``better`` claim
that holds on the means while a gap is narrower than 2 standard errors of the seed-paired
differences is marked ≈ (not resolved). The verdict is "agrees" when every claim holds clearly,
"does not agree" when none holds even on the means, else "agrees in part".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flowmatch.training.divergence import DIVERGED_METRIC
from flowmatch.studies.markdown import Section, fmt, plural
from flowmatch.studies.queries import Runs
from flowmatch.studies.statistics import mean_std, metric_value, runs_per_variant


def _as_list(x) -> list[str]:
    return [x] if isinstance(x, str) else list(x or [])


@dataclass
class _ClaimValues:
    """Each variant's per-seed values a claim compares (lower is better throughout): its ranks, or its metric at
    ``at`` (negated where higher is better; inf for a run whose loss diverged before the metric was measured)."""

    runs: Runs
    seeds: list[int]
    metric: str | None
    at: str
    sign: float
    ranks: dict[str, list[float]] | None  # set when the claim is checked on ranks

    def __call__(self, variant: str) -> dict[int, float]:
        if self.ranks is not None:
            return dict(zip(self.seeds, self.ranks[variant]))
        out = {}
        for s in self.seeds:
            rec = self.runs.get((variant, s))
            val = metric_value(rec, self.metric, self.at) if rec else None
            if val is not None and not math.isnan(val):
                out[s] = self.sign * val
            elif rec is not None and DIVERGED_METRIC in rec.metrics:
                out[s] = math.inf  # the loss diverged before the metric was measured: the worst outcome
        return out


def check_claim(claim: dict, runs: Runs, seeds: list[int], metric: str | None = None,
                ranks: dict[str, list[float]] | None = None) -> tuple[bool | None, str]:
    """(holds: True / False, or None when it holds on the means but a gap is under 2 standard errors of the
    seed-paired differences; a short account with the per-seed count). ``ranks``: variant -> per-seed ranks."""
    kind = claim.get("kind")
    on_ranks = ranks is not None and "metric" not in claim
    # higher-is-better claims are checked on negated values (so "lower is better" holds throughout) and shown as measured
    sign = -1.0 if claim.get("higher") and not on_ranks else 1.0
    per_seed = _ClaimValues(runs, seeds, claim.get("metric", metric), claim.get("at", "final"), sign, ranks if on_ranks else None)
    if kind in ("better", "factor"):
        return _check_between(claim, per_seed)
    if kind in ("top", "last"):
        return _check_position(claim, per_seed)
    raise ValueError(f"unknown claim kind {kind!r} (better, factor, top, last)")


def _check_between(claim: dict, per_seed: _ClaimValues) -> tuple[bool | None, str]:
    """``better``: the variant(s) below the others on the means (and per seed); ``factor``: others / variant >= min_factor."""
    winners, losers = _as_list(claim["variant"]), _as_list(claim["than"])
    vals = {v: per_seed(v) for v in winners + losers}
    common = [s for s in per_seed.seeds if all(s in vals[v] for v in vals)]
    if not common:
        return False, "no seed has all the runs"
    sign = per_seed.sign
    if claim["kind"] == "better":
        means = {v: float(np.mean([vals[v][s] for s in common])) for v in vals}
        holds = all(means[w] < means[loser] for w in winners for loser in losers)
        seeds_ok = sum(all(vals[w][s] < vals[loser][s] for w in winners for loser in losers) for s in common)
        at = per_seed.at
        what = "mean ranks" if per_seed.ranks is not None else f"means of {per_seed.metric}" + ("" if at == "final" else f" ({at.replace('_', ' ')})")
        detail = ", ".join(f"{v} {fmt(sign * means[v])}" for v in winners + losers)
        text = f"{what}: {detail}; holds in {seeds_ok}/{len(common)} seeds"
        if holds and not clear_margins(vals, winners, losers, common):
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


def _check_position(claim: dict, per_seed: _ClaimValues) -> tuple[bool, str]:
    """``top``: the variant among the k best on the means (and per seed); ``last``: the worst."""
    kind = claim["kind"]
    # among the variants named by ``among``, else those that have the metric at all
    names = _as_list(claim.get("among")) or sorted({v for v, _ in per_seed.runs if per_seed(v)})
    vals = {v: per_seed(v) for v in names}
    common = [s for s in per_seed.seeds if all(s in vals[v] for v in names)]
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


def clear_margins(vals: dict[str, dict[int, float]], winners: list[str], losers: list[str], seeds: list[int]) -> bool:
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


def mark(ok: bool | None) -> str:
    return "≈" if ok is None else "✓" if ok else "✗"


def append_claims(sec: Section, rep: dict, runs: Runs, seeds: list[int], default_paper: str) -> None:
    """The study's claims checked on the runs, one line each, and the verdict, appended to the section."""
    checks, lines = [], []
    for claim in rep.get("claims", []):
        ok, detail = check_claim(claim, runs, seeds)
        checks.append(ok)
        lines.append(f"- {claim.get('text', claim)}: {mark(ok)} ({detail})")
    sec.body.append("\nThe paper's claims, checked on the means over seeds (and per seed) (✓ holds, ≈ holds on the means but a gap is within 2 standard errors of the seed-paired differences, ✗ does not hold):\n\n" + "\n".join(lines))
    per_variant = [runs_per_variant(runs, name) for name in {v for v, _ in runs}]
    seeds_text = plural(len(seeds), "seed") if min(per_variant, default=0) == max(per_variant, default=0) else \
        f"{min(per_variant)}-{max(per_variant)} seeds per variant"
    sec.body.append(f"\n{verdict(checks, rep.get('paper_name', default_paper))}. {seeds_text}.")
