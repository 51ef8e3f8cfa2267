"""MLflow for a team: a real `mlflow server` with a PostgreSQL backend store (Debian's PostgreSQL, which .ci/run
installs and starts, handing the tests FLOWMATCH_TEST_POSTGRES) and MLflow's basic-auth app, on loopback:

* two fits at once, authenticated by MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, log two separate runs,
  which are rows of the PostgreSQL store;
* a fit without credentials, and one with a wrong password, are refused before training with a clear error,
  and log nothing;
* `compare` reads the runs from the server with the same variables.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from cli_utils import REPO, run_cli
from helpers_mlflow import free_port, start_mlflow_server, stop_mlflow_server

POSTGRES = os.environ.get("FLOWMATCH_TEST_POSTGRES")  # postgresql://user:password@host:port, from .ci/run
pytestmark = pytest.mark.skipif(not POSTGRES, reason="needs PostgreSQL: .ci/run starts Debian's and sets FLOWMATCH_TEST_POSTGRES")
ADMIN, PASSWORD = "admin", "team-secret-" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    import psycopg

    root = tmp_path_factory.mktemp("team")
    database = f"flowmatch_test_{secrets.token_hex(4)}"
    admin = psycopg.connect(f"{POSTGRES}/postgres", autocommit=True)
    admin.execute(f"CREATE DATABASE {database}")
    store = f"{POSTGRES}/{database}"
    (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                                   f"admin_username = {ADMIN}\nadmin_password = {PASSWORD}\n"
                                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    proc = None
    try:
        proc = start_mlflow_server(root, port, backend_store=store, extra=["--app-name", "basic-auth"], env=env)
        yield {"uri": uri, "store": store, "artifacts": root / "artifacts"}
    finally:
        if proc is not None:
            stop_mlflow_server(proc)
        admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.close()


def _fit_args(uri: str, name: str) -> list[str]:
    return ["fit", "--config", REPO / "experiments" / "toy2d_rf.yaml", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.tracking_uri", uri, "--trainer.logger.init_args.experiment_name", "team",
            "--trainer.logger.init_args.run_name", name, "--trainer.max_steps", "30", "--trainer.val_check_interval", "15",
            "--trainer.log_every_n_steps", "5", "--data.init_args.num_train", "1024", "--trainer.callbacks", "[]",
            "--trainer.default_root_dir", name]


def _env(user: str | None, password: str | None) -> dict:
    env = {**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        env.pop(key, None)
    if user is not None:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    return env


def _runs_in_postgres(store: str) -> list[str]:
    import psycopg

    with psycopg.connect(store) as conn:
        return [row[0] for row in conn.execute("SELECT name FROM runs ORDER BY name").fetchall()]


def test_a_team_server_on_postgres_with_accounts(team_server, tmp_path):
    uri, store = team_server["uri"], team_server["store"]
    # two fits at once, authenticated
    fits = [subprocess.Popen([sys.executable, "-m", "flowmatch", *map(str, _fit_args(uri, name))], cwd=tmp_path,
                             env=_env(ADMIN, PASSWORD), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("alice_run", "bob_run")]
    for fit in fits:
        out, err = fit.communicate(timeout=400)
        assert fit.returncode == 0, err[-3000:]
    assert _runs_in_postgres(store) == ["alice_run", "bob_run"]  # two runs, stored in PostgreSQL

    from mlflow.tracking import MlflowClient

    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    try:
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("team").experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["alice_run", "bob_run"] and len({r.info.run_id for r in runs}) == 2
        for run in runs:
            assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [4, 9, 14, 19, 24, 29]
            # artifacts go through the server to its shared artifact root
            assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
        assert list((team_server["artifacts"]).rglob("config.yaml"))
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})

    # no credentials, then a wrong password: refused before training, nothing logged
    for user, password, says in ((None, None, "no credentials were given"), (ADMIN, "wrong", "were refused")):
        out = run_cli(_fit_args(uri, "intruder"), tmp_path, extra_env={} if user is None else
                      {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password})
        if user is None:  # run_cli keeps the caller's environment: make sure no credentials leak in
            assert "MLFLOW_TRACKING_USERNAME" not in os.environ
        assert out.returncode != 0 and "requires an account (HTTP 401)" in out.stderr and says in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    assert _runs_in_postgres(store) == ["alice_run", "bob_run"]

    # compare reads the server
    report = run_cli(["compare", "--experiment", "team", "--out", "report", "--tracking_uri", uri], tmp_path,
                     extra_env={"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": PASSWORD}, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "report" / "index.html").read_text()
    assert "alice_run" in html and "bob_run" in html
