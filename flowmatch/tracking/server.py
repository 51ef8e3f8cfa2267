"""Check an MLflow tracking URI before a run starts, so an unreachable server is a clear error at
start-up rather than a crash when the first metric is logged hours later."""

from __future__ import annotations

import base64
import os
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
    _check_credentials(uri, timeout)


def _credentials_header() -> dict[str, str]:
    """The Authorization header MLflow's client sends: MLFLOW_TRACKING_TOKEN (bearer) or
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (basic)."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user is not None or password is not None:
        pair = base64.b64encode(f"{user or ''}:{password or ''}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def _check_credentials(uri: str, timeout: float) -> None:
    """A server with authentication (MLflow's basic-auth app) refuses a request without valid credentials: say so
    before the run starts (/health answers everyone, so ask for something that needs an account)."""
    headers = _credentials_header()
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code not in (401, 403):
            return  # (404: no such experiment; anything else the run itself reports)
        what = ("no credentials were given: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
                if not headers else f"the credentials of MLFLOW_TRACKING_USERNAME={os.environ.get('MLFLOW_TRACKING_USERNAME', '')!r} "
                "were refused (a wrong password, or an account without permission)")
        raise TrackingServerError(f"the MLflow tracking server {uri} requires an account (HTTP {err.code}); {what}") from None
    except (urllib.error.URLError, OSError):
        return  # reachability was checked just before; a blip here is the run's to report


def ensure_experiment(uri: str, name: str) -> None:
    """Create the MLflow experiment ``name`` unless it exists, tolerating another run creating it at the same moment
    (two fits started together on a shared store would otherwise both try, and one would die with
    RESOURCE_ALREADY_EXISTS when Lightning's logger creates it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if client.get_experiment_by_name(name) is not None:
        return
    try:
        client.create_experiment(name)
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(err).lower():
            raise
