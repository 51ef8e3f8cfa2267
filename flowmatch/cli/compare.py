"""`python -m flowmatch compare`: one self-contained HTML report comparing MLflow runs.

Reads the runs of an experiment (optionally filtered with MLflow's search syntax, or picked by id)
from any tracking store, local (sqlite:///mlflow.db) or a server (http://host:5000), and writes
OUT/index.html with validation loss curves, the loss per t-level, sample quality against NFE, the
runs' sample images side by side and tables of the params that differ and of the final metrics
(PNG files beside it in OUT/plots and OUT/images). See flowmatch.tracking.report.
"""

from __future__ import annotations

import os
import sys

import argparse

from jsonargparse import ArgumentParser, DefaultHelpFormatter

EXAMPLE = """examples:
  python -m flowmatch compare --experiment toy2d --out report/
  python -m flowmatch compare --experiment toy2d --filter "tags.objective = 'RectifiedFlow'" --out report_rf/
  python -m flowmatch compare --experiment toy2d --runs 3f2a... 9c1e... --out report/
  python -m flowmatch compare --tracking_uri http://127.0.0.1:5000 --experiment sd3-small --out report/
"""


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help with the description and examples kept as written."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch compare", description=__doc__, epilog=EXAMPLE,
                       formatter_class=_HelpFormatter, exit_on_error=True)
    p.add_argument("--experiment", type=str | None, default=None, help="MLflow experiment name (e.g. toy2d, flowmatch)")
    p.add_argument("--out", type=str, required=True, help="output directory; the report is OUT/index.html")
    p.add_argument("--tracking_uri", "--tracking-uri", type=str, default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--filter", type=str, default="", help="MLflow search filter, e.g. \"tags.objective = 'RectifiedFlow'\" or \"params.model.lr = '0.002'\"")
    p.add_argument("--runs", type=str, default=None, nargs="+", help="compare exactly these run ids (space-separated)")
    p.add_argument("--max_runs", type=int, default=20, help="at most this many runs (the oldest first)")
    p.add_argument("--max_images", type=int, default=4, help="sample images per run (evenly spaced over its logged steps, always the last)")
    p.add_argument("--title", type=str | None, default=None, help="page title")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from flowmatch.tracking.report import ReportError, build_report, summary
    from flowmatch.tracking.server import TrackingServerError, check_tracking_uri

    try:
        check_tracking_uri(args.tracking_uri)
        index, runs = build_report(args.out, args.tracking_uri, args.experiment, args.filter, args.runs, args.max_runs, args.title, args.max_images)
    except (ReportError, TrackingServerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"compared {len(runs)} runs:\n{summary(runs)}\nwrote {index}")
    return 0
