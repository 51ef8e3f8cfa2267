"""Run the platform's CLI the way a user does: `python -m flowmatch ...` in a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, timeout: int = 300, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # tests use the default store in their own working directory
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "flowmatch", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def checkpoint_from_output(stdout: str) -> Path:
    """The `checkpoint: PATH` line that `fit` prints at the end."""
    for line in stdout.splitlines():
        if line.startswith("checkpoint: "):
            return Path(line.split("checkpoint: ", 1)[1].strip())
    raise AssertionError(f"fit printed no checkpoint line:\n{stdout[-2000:]}")
