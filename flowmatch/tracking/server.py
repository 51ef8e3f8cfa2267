"""Check an MLflow tracking URI before a run starts, so an unreachable server is a clear error at
start-up rather than a crash when the first metric is logged hours later."""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urlparse

START_HINT = ("start one with  mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000  "
              "(see docs/scale_and_tracking.md), or track locally with  --trainer.logger.init_args.tracking_uri sqlite:///mlflow.db")


class TrackingServerError(RuntimeError):
    """The tracking URI names an MLflow server that does not answer."""


def check_tracking_uri(uri: str, timeout: float = 10.0) -> None:
    """Raise TrackingServerError unless an http(s) tracking URI answers MLflow's /health endpoint.

    Local stores (sqlite:///..., postgresql://... used directly, file paths) are not checked here:
    MLflow creates or opens them when the run starts."""
    scheme = urlparse(uri).scheme.lower()
    if scheme not in ("http", "https"):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status != 200:
                raise TrackingServerError(f"the MLflow tracking server {uri} answered {url} with HTTP {response.status}; {START_HINT}")
    except urllib.error.HTTPError as err:
        raise TrackingServerError(f"the MLflow tracking server {uri} answered {url} with HTTP {err.code} ({err.reason}); {START_HINT}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingServerError(f"the MLflow tracking server {uri} is not reachable ({reason}); {START_HINT}") from None
