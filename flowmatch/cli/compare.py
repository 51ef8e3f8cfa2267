"""`python -m flowmatch compare`: one self-contained HTML report comparing MLflow runs.

Reads the runs of one or more experiments (or of a study, or with given tags, optionally filtered with
MLflow's search syntax, or picked by id) from any tracking store, local (sqlite:///mlflow.db) or a server
(http://host:5000), and writes OUT/index.html. One column per trained model (its `validate` / `test`
are logged into its run); runs that share a --group_by tag (default: variant, the seeds of a study
variant) fold into one column of mean ± standard deviation. The page shows the metrics at the last
validation and test with which way is better and the best of each row in bold (and, with --diff, the
difference between two columns), loss curves, the loss per t-level, sample quality against NFE (network
evaluations per sample: guidance costs 2 a step), the sample grids side by side and the config that
differs as YAML (PNG files beside it in OUT/plots and OUT/images). See flowmatch.tracking.report.
"""

from __future__ import annotations

import os
import sys

import argparse

from jsonargparse import ArgumentParser, DefaultHelpFormatter

EXAMPLE = """examples:
  python -m flowmatch compare --experiment demo_digits --out report/
  python -m flowmatch compare --experiment demo_digits demo_buckets --out report/
  python -m flowmatch compare --study architectures --budget small --out report/           # seeds folded per variant
  python -m flowmatch compare --study architectures --diff dit mmdit_2sets --out report/   # with a B - A column
  python -m flowmatch compare --experiment toy2d --tag objective=RectifiedFlow --out report_rf/
  python -m flowmatch compare --experiment toy2d --filter "params.model.lr = '0.002'" --out report/
  python -m flowmatch compare --runs 3f2a... 9c1e... --out report/
  python -m flowmatch compare --tracking_uri http://127.0.0.1:5000 --experiment sd3-small --out report/
"""


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help with the description and examples kept as written."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch compare", description=__doc__, epilog=EXAMPLE,
                       formatter_class=_HelpFormatter, exit_on_error=True)
    p.add_argument("--experiment", type=str, default=None, nargs="+", help="MLflow experiment name(s) (e.g. demo_digits); default: every experiment")
    p.add_argument("--out", type=str, required=True, help="output directory; the report is OUT/index.html")
    p.add_argument("--tracking_uri", "--tracking-uri", type=str, default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--study", type=str, default=None, help="only the runs of this study (tag study=NAME, written by `python -m flowmatch study`)")
    p.add_argument("--budget", type=str, default=None, help="with --study: only this budget's runs (small, medium, large)")
    p.add_argument("--variant", type=str, default=None, nargs="+", help="only these variants (tag variant)")
    p.add_argument("--tag", type=str, default=None, nargs="+", help="only runs with these tag values, KEY=VALUE (e.g. objective=RectifiedFlow seed=0)")
    p.add_argument("--filter", type=str, default="", help="MLflow search filter, e.g. \"tags.objective = 'RectifiedFlow'\" or \"params.model.lr = '0.002'\"")
    p.add_argument("--runs", type=str, default=None, nargs="+", help="compare exactly these run ids (space-separated)")
    p.add_argument("--group_by", type=str, default="variant", help="fold runs sharing this tag's value into one column (mean ± std); 'none' shows every run")
    p.add_argument("--diff", type=str, default=None, nargs=2, metavar=("A", "B"), help="add a column B - A: columns named by variant, run name or run id (prefix)")
    p.add_argument("--max_runs", type=int, default=50, help="at most this many runs (the oldest first)")
    p.add_argument("--max_images", type=int, default=4, help="sample images per run and key (evenly spaced over its logged steps, always the last)")
    p.add_argument("--title", type=str, default=None, help="page title")
    return p


def _tags(args) -> dict[str, str]:
    from flowmatch.tracking.report_runs import ReportError

    tags = {}
    for item in args.tag or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ReportError(f"--tag {item!r}: expected KEY=VALUE, e.g. objective=RectifiedFlow")
        tags[key] = value
    if args.study:
        tags["study"] = args.study
    if args.budget:
        if not args.study:
            raise ReportError("--budget needs --study (a budget belongs to a study)")
        tags["budget"] = args.budget
    return tags


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from flowmatch.tracking.report import build_report, summary
    from flowmatch.tracking.report_runs import ReportError
    from flowmatch.tracking.server import TrackingServerError, check_tracking_uri

    try:
        check_tracking_uri(args.tracking_uri)
        group_by = None if str(args.group_by).lower() in ("none", "") else args.group_by
        index, columns = build_report(args.out, args.tracking_uri, args.experiment, args.filter, args.runs, args.max_runs, args.title,
                                      args.max_images, tags=_tags(args), group_by=group_by, diff=tuple(args.diff) if args.diff else None,
                                      variants=args.variant)
    except (ReportError, TrackingServerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = sum(len(c.runs) for c in columns)
    print(f"compared {runs} runs in {len(columns)} columns:\n{summary(columns)}\nwrote {index}")
    return 0
