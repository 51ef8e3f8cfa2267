"""The runs a comparison report shows, read from MLflow, and how it folds them into columns.

* ``fetch_runs``: the runs of one or more experiments (or all), picked by MLflow filter, tags (``study``,
  ``variant``, any ``key=value``) or ids, with their metric histories, sample images and ``config.yaml``;
* ``fold_evaluations``: a run that evaluated another run's checkpoint from another store (tag
  ``flowmatch.evaluates_run``, flowmatch.tracking.evaluation_run) is folded into that run when both are
  shown, so every trained model is one column with its test metrics under it;
* ``group_runs``: runs that share a tag value (default ``variant``: the seeds of a study's variant) become one
  column whose numbers are mean ± spread over its runs; a run without the tag is a column of its own.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowmatch.tracking.evaluation_run import EVALUATED_RUN_TAG

IMAGE_NAME = re.compile(r"^(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-fA-F-]+\.png$")
LEVEL_KEY = re.compile(r"^(?P<split>val|test)/loss_t(?P<t>[0-9.]+)$")
HISTORY_KEYS = ("val/loss", "train/loss")


class ReportError(RuntimeError):
    """Nothing to compare: unknown experiment, no matching runs, an unreachable store, a bad option."""


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
    images: dict[str, list[tuple[int, Path]]] = field(default_factory=dict)  # image key -> [(step, local png)], by step
    config_yaml: str | None = None  # the resolved config the run was started with (artifact config.yaml)


@dataclass
class Column:
    """One column of the report: a run, or the runs of one group (the seeds of a variant)."""

    name: str
    runs: list[RunData]

    @property
    def grouped(self) -> bool:
        return len(self.runs) > 1

    @property
    def first(self) -> RunData:
        return self.runs[0]

    def values(self, key: str) -> list[float]:
        """The latest value of ``key`` in each run that has it (NaN left out)."""
        return [r.metrics[key] for r in self.runs if key in r.metrics and not math.isnan(r.metrics[key])]

    def mean_spread(self, key: str) -> tuple[float, float, int] | None:
        """(mean, standard deviation over the runs (0 for one), how many runs have it), or None if none has it."""
        vals = self.values(key)
        if not vals:
            return None
        return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)

    def seeds(self) -> list[str]:
        return [r.tags.get("seed", "—") for r in self.runs]


# --- reading ------------------------------------------------------------------------------------------------
def _search_filter(filter_string: str, tags: dict[str, str]) -> str:
    parts = [filter_string] if filter_string else []  # (MLflow filters are AND-only, without parentheses)
    for key, value in tags.items():
        parts.append(f"tags.`{key}` = '{value}'" if not re.fullmatch(r"[A-Za-z0-9_]+", key) else f"tags.{key} = '{value}'")
    return " and ".join(parts)


def fetch_runs(tracking_uri: str, experiments: list[str] | str | None, filter_string: str = "", run_ids: list[str] | None = None,
               max_runs: int = 20, image_keys: tuple[str, ...] = ("samples", "test_samples"), max_images: int = 4,
               workdir: Path | None = None, tags: dict[str, str] | None = None, variants: list[str] | None = None) -> list[RunData]:
    """The runs to compare, oldest first, with what the report draws.

    ``experiments``: names (None: every experiment, which needs ``tags``, a filter or ``run_ids``);
    ``tags``: exact tag values every run must have (e.g. {"study": "architectures", "budget": "small"}); ``variants``: only
    runs whose ``variant`` tag is one of these."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded image buried the report's own lines
    names = [experiments] if isinstance(experiments, str) else list(experiments or [])
    tags = dict(tags or {})
    client = MlflowClient(tracking_uri)
    query = _search_filter(filter_string, tags)
    try:
        if names:
            exp_ids = []
            for name in names:
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    known = sorted(e.name for e in client.search_experiments())
                    raise ReportError(f"no experiment named {name!r} in {tracking_uri}; experiments there: {', '.join(known) or 'none'}")
                exp_ids.append(exp.experiment_id)
        elif run_ids or query:
            exp_ids = [e.experiment_id for e in client.search_experiments()]
        else:
            raise ReportError("give --experiment NAME, --study NAME, --tag KEY=VALUE or --runs ID [ID ...]")
        if run_ids and not names and not query:
            runs = [client.get_run(rid) for rid in run_ids]
        else:
            runs = client.search_runs(exp_ids, filter_string=query, max_results=max_runs if not (run_ids or variants) else 50000,
                                      order_by=["attributes.start_time ASC"])
            if run_ids:
                runs = [r for r in runs if r.info.run_id in set(run_ids)]
    except MlflowException as err:
        raise ReportError(f"could not read runs from {tracking_uri}: {str(err).splitlines()[0]}") from None
    if run_ids:
        missing = set(run_ids) - {r.info.run_id for r in runs}
        if missing:
            raise ReportError(f"runs not found{' in experiment ' + ', '.join(names) if names else ''}: {', '.join(sorted(missing))}")
    if variants:  # (MLflow's search has no IN for tags)
        found = sorted({r.data.tags["variant"] for r in runs if "variant" in r.data.tags})
        runs = [r for r in runs if r.data.tags.get("variant") in set(variants)]
        if not runs:
            raise ReportError(f"no runs of variant {', '.join(variants)}; the variants there: {', '.join(found) or 'none'}")
    if not runs:
        where = f"experiment {', '.join(repr(n) for n in names)}" if names else "the store"
        raise ReportError(f"no runs in {where} match{' the filter ' + repr(query) if query else ''}")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="flowmatch-compare-"))
    out = []
    for r in runs[:max_runs] if not run_ids else runs:
        data = RunData(
            run_id=r.info.run_id, name=r.info.run_name or r.info.run_id[:8], experiment_id=r.info.experiment_id,
            status=r.info.status, tags={k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.source.git.commit"},
            params=dict(r.data.params), metrics=dict(r.data.metrics),
        )
        for key in data.metrics:
            if key in HISTORY_KEYS or (LEVEL_KEY.match(key) and key.startswith("val/")):
                data.history[key] = sorted((m.step, m.value) for m in client.get_metric_history(data.run_id, key))
        data.images = _fetch_images(client, tracking_uri, data.run_id, image_keys, max_images, workdir / data.run_id)
        data.config_yaml = _fetch_text(client, tracking_uri, data.run_id, "config.yaml", workdir / data.run_id)
        out.append(data)
    return out


def _fetch_text(client, tracking_uri: str, run_id: str, path: str, dst: Path) -> str | None:
    import mlflow.artifacts

    try:
        if not any(a.path == path for a in client.list_artifacts(run_id)):
            return None
        dst.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=tracking_uri)
        return Path(local).read_text(encoding="utf-8")
    except Exception:  # an artifact store that cannot be read: the report goes on without the config
        return None


def _fetch_images(client, tracking_uri: str, run_id: str, keys: tuple[str, ...], max_images: int, dst: Path) -> dict[str, list[tuple[int, Path]]]:
    import mlflow.artifacts

    if max_images <= 0:
        return {}
    try:
        files = [a.path for a in client.list_artifacts(run_id, "images")]
    except Exception:
        return {}
    found: dict[str, list[tuple[int, str]]] = {}
    for path in files:
        m = IMAGE_NAME.match(path.rsplit("/", 1)[-1])
        if m and m.group("key") in keys:
            found.setdefault(m.group("key"), []).append((int(m.group("step")), path))
    out = {}
    for key, items in found.items():
        items.sort()
        if len(items) > max_images:  # evenly spaced over the run, always the last
            idx = sorted({round(i * (len(items) - 1) / (max_images - 1)) for i in range(max_images)}) if max_images > 1 else [len(items) - 1]
            items = [items[i] for i in idx]
        dst.mkdir(parents=True, exist_ok=True)
        out[key] = [(step, Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=tracking_uri)))
                    for step, path in items]
    return out


# --- folding into columns -------------------------------------------------------------------------------------
def _legacy_parent(run: RunData, earlier: list[RunData]) -> RunData | None:
    """The fit an evaluation run of the platform's older releases (a separate `test` / `validate` run with no link to
    its checkpoint's run) most likely evaluated: the latest earlier fit of the same name in the same experiment."""
    if run.tags.get("stage") not in ("test", "validate") or EVALUATED_RUN_TAG in run.tags:
        return None
    fits = [r for r in earlier if r.name == run.name and r.experiment_id == run.experiment_id and r.tags.get("stage") == "fit"]
    return fits[-1] if fits else None


def fold_evaluations(runs: list[RunData]) -> list[RunData]:
    """Runs that evaluated a shown run's checkpoint (tag flowmatch.evaluates_run) merged into it: their metrics
    and images that the training run lacks are added to it. A separate evaluation run from before evaluations
    logged into their training run is folded into the latest earlier fit of its name (said in the Runs table)."""
    by_id = {r.run_id: r for r in runs}
    kept = []
    for i, r in enumerate(runs):
        parent = by_id.get(r.tags.get(EVALUATED_RUN_TAG, ""))
        if parent is None:
            parent = _legacy_parent(r, runs[:i])
            if parent is not None:
                parent.tags["flowmatch.evaluation_folded_by_name"] = r.run_id
        if parent is None or parent is r:
            kept.append(r)
            continue
        for key, value in r.metrics.items():
            parent.metrics.setdefault(key, value)
        for key, items in r.images.items():
            parent.images.setdefault(key, items)
        parent.tags.setdefault("flowmatch.evaluated_in_run", r.run_id)
    return kept


def group_runs(runs: list[RunData], group_by: str | None = "variant") -> list[Column]:
    """Columns in the order of the runs' first appearance: the runs sharing a ``group_by`` tag value (within one
    study, when the runs have a ``study`` tag) as one column, every other run alone."""
    columns: list[Column] = []
    index: dict[tuple[str, str], Column] = {}
    for r in runs:
        value = r.tags.get(group_by) if group_by else None
        if value is None:
            columns.append(Column(r.name, [r]))
            continue
        key = (r.tags.get("study", ""), value)
        if key not in index:
            label = r.tags.get("study_label") or value
            index[key] = Column(label, [])
            columns.append(index[key])
        index[key].runs.append(r)
    names = [c.name for c in columns]
    for c in columns:  # two columns of one name (a model trained twice): tell them apart by run id
        if names.count(c.name) > 1 and not c.grouped:
            c.name = f"{c.name} ({c.first.run_id[:8]})"
    return columns


def find_column(columns: list[Column], ref: str) -> Column:
    """The column a ``--diff`` reference names: its name, a run name, or a run id or its prefix."""
    for match in (lambda c: c.name == ref, lambda c: any(r.name == ref for r in c.runs),
                  lambda c: any(r.run_id.startswith(ref) for r in c.runs)):
        hits = [c for c in columns if match(c)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ReportError(f"--diff {ref!r} names {len(hits)} columns ({', '.join(c.name for c in hits)}): give a run id")
    raise ReportError(f"--diff {ref!r} names no column of the report; columns: {', '.join(c.name for c in columns)}")
