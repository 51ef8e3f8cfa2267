"""Reading a study's runs from its MLflow store(s): the latest result per variant and seed.

A result is a run the study runner tagged (``study``, ``budget``, the variant's current
``study_fingerprint``) that FINISHED, or that FAILED after its loss diverged (it logged
``train/diverged_at_step``); a crash is no result. Several stores may be given, comma-separated:
the shards of a study run by parallel processes, each into its own store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowmatch.training.divergence import DIVERGED_METRIC
from flowmatch.studies.spec import Study, plan


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


Runs = dict[tuple[str, int], RunRecord]  # (variant, seed) -> its run


def history_metrics(study: Study) -> list[str]:
    """The metrics whose whole history the study's report reads: its curves, the training loss of a
    ``training`` report, and the metrics of claims checked at another point than the final one."""
    rep = study.report
    keys = set(rep.get("curves", []))
    if rep.get("kind") == "training":
        keys.add("val/loss")
    for claim in rep.get("claims", []):
        if claim.get("at", "final") != "final" and claim.get("metric"):
            keys.add(claim["metric"])
    return sorted(keys)


def collect(study: Study, budget: str, tracking_uri: str, history_keys: list[str] | None = None) -> Runs:
    """The latest result per (variant, seed) of the study's current definitions, from every store in ``tracking_uri``."""
    latest, store_of = _latest_runs(study, budget, tracking_uri)
    if not latest:
        raise ResultsError(f"no finished runs of study {study.name!r} (budget {budget}, current definitions) in {tracking_uri}, "
                           f"experiment {study.experiment!r}; run `python -m flowmatch study {study.name} --budget {budget}` first")
    return {key: _record(key, run, store_of[run.info.run_id], history_keys or []) for key, run in latest.items()}


def _latest_runs(study: Study, budget: str, tracking_uri: str) -> tuple[dict[tuple[str, int], Any], dict[str, str]]:
    """(variant, seed) -> the latest MLflow run that is a result, and run id -> the store it was read from."""
    from mlflow.exceptions import MlflowException

    from flowmatch.studies.runner import search_study_runs

    current = {r.variant.name: r.fingerprint for r in plan(study, budget, seeds=1)}
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
    return latest, store_of


def _record(key: tuple[str, int], run: Any, uri: str, keys: list[str]) -> RunRecord:
    from mlflow.tracking import MlflowClient

    seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
    rec = RunRecord(run.info.run_id, key[0], key[1], dict(run.data.metrics), dict(run.data.params), seconds,
                    run.data.tags.get("mlflow.source.git.commit", ""))
    for hk in keys:
        if hk in rec.metrics:
            # Lightning logs a validation at the 0-based index of the last batch: +1 is the number of steps trained
            history = MlflowClient(uri).get_metric_history(rec.run_id, hk)
            rec.history[hk] = sorted((m.step + 1, m.value) for m in history)
    return rec
