"""The output directory of a coupling run: written as ``OUT.partial/``, renamed to ``OUT`` once complete.

``OUT.partial/settings.json`` holds the run's settings (a run with other settings refuses to mix into
it) and ``progress.json`` the shards already complete, so an interrupted run continues with the next
missing shard. Only when every shard and the manifest are on disk is the directory renamed, so a
finished set is never half-written (``overwrite`` replaces an old one only then).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from flowmatch.atomic_io import fsync_dir
from flowmatch.reflow.format import write_manifest

SETTINGS_NAME = "settings.json"
PROGRESS_NAME = "progress.json"


class CouplingRunError(RuntimeError):
    """The output directory or an unfinished run's state is in the way (names it and what to do)."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_partial(out: Path, settings: dict[str, Any], overwrite: bool) -> tuple[Path, list[dict[str, Any]]]:
    """Create or reopen OUT.partial/; returns it and the shards already complete in it."""
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not overwrite:
        raise CouplingRunError(f"{out} already exists; pass --overwrite to replace it (or choose another --out)")
    if partial.exists():
        old = _read_json(partial / SETTINGS_NAME)
        if old != settings:
            if not overwrite:
                diff = sorted(k for k in set(settings) | set(old or {}) if (old or {}).get(k) != settings.get(k))
                raise CouplingRunError(f"{partial} holds an unfinished run with other settings (differs in {diff}); "
                                       "run with the same settings to finish it, or pass --overwrite to start afresh")
            shutil.rmtree(partial)
    if not partial.exists():
        partial.mkdir(parents=True)
        _write_json(partial / SETTINGS_NAME, settings)
        _write_json(partial / PROGRESS_NAME, [])
    done = _read_json(partial / PROGRESS_NAME) or []
    done = [s for s in done if (partial / s["name"]).is_file()]
    return partial, done


def record_progress(partial: Path, done: list[dict[str, Any]]) -> None:
    """Note the shards complete so far (after each shard file is on disk under its final name)."""
    _write_json(partial / PROGRESS_NAME, done)


def publish(partial: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest and rename OUT.partial/ to OUT (the old OUT, with overwrite, goes only once the new one is complete)."""
    for name in (SETTINGS_NAME, PROGRESS_NAME):
        (partial / name).unlink(missing_ok=True)
    write_manifest(partial, manifest)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)
    fsync_dir(out.parent)
