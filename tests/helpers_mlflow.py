"""Test helpers: a real `mlflow server` on a free loopback port, started and stopped as the tests need it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int, backend_store: str | None = None, extra: list[str] | None = None,
                        env: dict | None = None, timeout: float = 180) -> subprocess.Popen:
    """`mlflow server` (default store: SQLite in ``root``; artifacts proxied into root/artifacts) in its own session,
    once its /health answers; its output goes to root/server.log."""
    cmd = [sys.executable, "-m", "mlflow", "server", *(extra or []), "--backend-store-uri", backend_store or f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, **(env or {})}, stdout=open(root / "server.log", "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_mlflow_server(proc)
            raise RuntimeError(f"mlflow server did not come up:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.3)


def stop_mlflow_server(proc: subprocess.Popen, kill: bool = False) -> None:
    """Stop the server and the workers it started (its own session): SIGTERM, or SIGKILL (``kill``: gone at once, as
    a crashed machine would be)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
