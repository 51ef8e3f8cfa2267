"""Training goes on when the MLflow tracking server goes away mid-run, and its metrics reach the run later.

The CLI makes every MLFlowLogger of a run that tracks to an http(s) server resilient (rank 0 only, where
logging happens): its MLflow client is wrapped so that

* a call that fails because the server does not answer (refused, reset, timed out, 5xx after MLflow's own
  retries) puts the run "away", said once (a warning naming the server and the file below);
* while away, metric values are kept, in memory and appended to ``<default_root_dir>/unsent_metrics.jsonl``
  (one JSON object a line: tracking URI, run id, key, value, step, timestamp); other writes (params, tags,
  images, artifacts) are skipped and counted; the server is asked (its /health, 2 s) at most every 30 s
  (``FLOWMATCH_TRACKING_PROBE_S``);
* when it answers again, the kept values are sent in order with their original steps and timestamps (said
  once), so the run's curves have no gap;
* at the end of the fit one more try is made; what still could not be sent stays in the file, and
  ``python -m flowmatch sync-metrics FILE`` sends it later (the run then also stays RUNNING in MLflow).

MLflow retries a failing request for minutes by default; unless set, its retries are lowered to 2 and its
request timeout to 20 s, so training stalls for seconds, not minutes, when the server goes away.
Decision (issue 18): buffer and send later, with the file as the fallback, rather than only writing beside the
checkpoint: the run in MLflow is then complete without any step by the user when the server comes back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from flowmatch.error_chain import causes
from flowmatch.tracking.server import TrackingServerError, check_tracking_uri

UNSENT_FILE = "unsent_metrics.jsonl"
_UNREACHABLE_SIGNS = ("max retries exceeded", "connection refused", "failed to establish a new connection", "connection aborted",
                      "connection reset", "remote end closed", "read timed out", "timed out", "bad gateway", "service unavailable",
                      "too many 500 error responses", "too many 502 error responses", "too many 503 error responses")
_BATCH = 1000  # MLflow's limit of metrics per log_batch


def _say(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def is_unreachable(err: BaseException | None) -> bool:
    """Did ``err`` (or what it was raised from) come from a tracking server that does not answer?"""
    return any(isinstance(e, (ConnectionError, TimeoutError)) or any(sign in str(e).lower() for sign in _UNREACHABLE_SIGNS)
               for e in causes(err))


class ResilientClient:
    """An MlflowClient that keeps metrics while its server is away and sends them when it is back (module docstring)."""

    def __init__(self, client, uri: str, unsent_path: str | Path, probe_every_s: float | None = None):
        self._client, self._uri, self._path = client, uri, Path(unsent_path)
        self._probe_every = float(probe_every_s if probe_every_s is not None else os.environ.get("FLOWMATCH_TRACKING_PROBE_S", 30))
        self._away_since: float | None = None
        self._next_probe = 0.0
        self._kept: list[dict] = []
        self._skipped = 0

    @property
    def away(self) -> bool:
        return self._away_since is not None

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.away and not self._back():
                self._skipped += 1
                return None
            try:
                return attr(*args, **kwargs)
            except Exception as err:
                if not is_unreachable(err):
                    raise
                self._went_away(err)
                self._skipped += 1
                return None

        return call

    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **kwargs) -> None:
        if self.away and not self._back():
            self._keep(run_id, metrics)
            self._skipped += bool(params) + bool(tags)
            return
        try:
            self._client.log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)
        except Exception as err:
            if not is_unreachable(err):
                raise
            self._went_away(err)
            self._keep(run_id, metrics)

    def flush_at_end(self) -> None:
        """One last try at the end of the fit (whatever the probe interval); else say where the values are."""
        if not self.away:
            return
        self._next_probe = 0.0
        if not self._back():
            _say(f"the MLflow tracking server {self._uri} is still away at the end of the run: {len(self._kept)} metric "
                 f"values are in {self._path}; send them when it is back with  python -m flowmatch sync-metrics {self._path}"
                 f"{'' if not self._skipped else f' ({self._skipped} other tracking calls, params / images / artifacts, were skipped)'}")

    # ---- the away state ----
    def _went_away(self, err: BaseException) -> None:
        if self.away:
            return
        self._away_since = time.monotonic()
        self._next_probe = self._away_since + self._probe_every
        self._path.parent.mkdir(parents=True, exist_ok=True)
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        _say(f"lost the MLflow tracking server {self._uri} ({reason}); training goes on, metrics are kept in {self._path} "
             f"and sent when the server answers again (asked every {self._probe_every:g} s)")

    def _keep(self, run_id: str, metrics) -> None:
        rows = [{"tracking_uri": self._uri, "run_id": run_id, "key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}
                for m in metrics]
        self._kept += rows
        with open(self._path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def _back(self) -> bool:
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + self._probe_every
        try:
            check_tracking_uri(self._uri, timeout=2.0)
            sent = send_rows(self._client, self._kept)
        except Exception as err:  # (TrackingServerError: still away)
            if isinstance(err, TrackingServerError) or is_unreachable(err):
                return False
            raise
        away_s = now - (self._away_since or now)
        _say(f"the MLflow tracking server {self._uri} answers again after {away_s:.0f} s: {sent} kept metric values sent"
             f"{'' if not self._skipped else f'; {self._skipped} other tracking calls made while it was away were skipped'}")
        self._kept, self._skipped, self._away_since = [], 0, None
        self._path.unlink(missing_ok=True)
        return True


def send_rows(client, rows: list[dict]) -> int:
    """Log kept metric rows ({run_id, key, value, step, timestamp}) with ``client``, in order; the count sent."""
    from mlflow.entities import Metric

    by_run: dict[str, list] = {}
    for row in rows:
        by_run.setdefault(row["run_id"], []).append(Metric(row["key"], float(row["value"]), int(row["timestamp"]), int(row["step"])))
    for run_id, metrics in by_run.items():
        for start in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[start : start + _BATCH])
    return len(rows)


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger whose client survives its server going away (module docstring)."""

    _resilient: ResilientClient | None = None
    _unsent_path: str | Path = UNSENT_FILE

    @property
    def experiment(self):
        client = MLFlowLogger.experiment.fget(self)
        if self._resilient is None or self._resilient._client is not client:
            self._resilient = ResilientClient(client, self._tracking_uri, self._unsent_path)
        return self._resilient

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._resilient is not None:
            self._resilient.flush_at_end()
        super().finalize(status)


def make_resilient(logger: MLFlowLogger, unsent_path: str | Path) -> None:
    """Turn an MLFlowLogger (exactly Lightning's class) that tracks to an http(s) server into a ResilientMLFlowLogger."""
    uri = str(getattr(logger, "_tracking_uri", "") or "")
    if type(logger) is not MLFlowLogger or not uri.lower().startswith(("http://", "https://")):
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    logger.__class__ = ResilientMLFlowLogger
    logger._unsent_path = Path(unsent_path)


__all__ = ["ResilientClient", "ResilientMLFlowLogger", "UNSENT_FILE", "is_unreachable", "make_resilient", "send_rows"]
