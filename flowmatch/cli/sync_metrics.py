"""`python -m flowmatch sync-metrics FILE`: send the metric values a run kept while its MLflow tracking server was
away (``unsent_metrics.jsonl`` in the run's default_root_dir, flowmatch.tracking.resilient) to their runs.

Each line names its tracking server and run; ``--tracking_uri`` sends them to another server (a moved one). The
values keep their steps and timestamps. A file that was sent is renamed FILE.sent, so it is not sent twice."""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowmatch sync-metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="the unsent_metrics.jsonl a run left")
    p.add_argument("--tracking_uri", default=None, help="send to this server instead of the one each line names")
    args = p.parse_args(argv)
    from mlflow.tracking import MlflowClient

    from flowmatch.tracking.resilient import send_rows
    from flowmatch.tracking.server import TrackingServerError, check_tracking_uri

    try:
        with open(args.file) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        print(f"error: cannot read {args.file}: {err}", file=sys.stderr)
        return 1
    missing = [k for k in ("run_id", "key", "value", "step", "timestamp") if rows and k not in rows[0]]
    if missing:
        print(f"error: {args.file} is not a file of kept metrics (no {', '.join(missing)})", file=sys.stderr)
        return 1
    by_uri: dict[str, list[dict]] = {}
    for row in rows:
        by_uri.setdefault(args.tracking_uri or row["tracking_uri"], []).append(row)
    for uri, group in by_uri.items():
        try:
            check_tracking_uri(uri)
        except TrackingServerError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        sent = send_rows(MlflowClient(uri), group)
        print(f"sent {sent} metric values to {len({r['run_id'] for r in group})} run(s) on {uri}")
    os.replace(args.file, args.file + ".sent")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
