"""`python -m flowmatch study NAME --budget small`: run a whole study and write its section of the results.

A study (experiments/studies/NAME.yaml) is a base experiment, its variants as config overrides,
seeds and per-budget overrides (steps, seeds, reflow pairs). Every (seed, variant) is a real
`python -m flowmatch fit` in its own process, tracked in MLflow with the tags study, variant, seed and
budget; a variant whose finished run is already in the store is skipped, so a study resumes where it
stopped. Then the study's section of OUT.md (default docs/results.md) is (re)written from the MLflow
runs alone, with its plots in OUT/ (default docs/results/), every number traced to a run id. With
--jobs N, N fits run at once (each in its own process); a fit built from another variant's run
(couplings, weights, latents) starts once that run at its seed is done.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

EXAMPLES = """examples:
  python -m flowmatch study --list
  python -m flowmatch study sd3_formulations --budget small --dry-run
  nice -n 15 python -m flowmatch study sd3_formulations --budget small          # runs, then writes docs/results.md
  python -m flowmatch study sd3_formulations --budget small --report-only       # rewrite the section from MLflow
  python -m flowmatch study reflow --budget medium --seeds 5 --tracking_uri http://127.0.0.1:5000
  nice -n 15 python -m flowmatch study latent_channels --budget small --threads 1   # autoencoders d=4/8/16, generators on their latents
  nice -n 15 python -m flowmatch study sd3_formulations_digits --budget small --threads 1 --jobs 2   # two fits at a time
"""


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from flowmatch.studies.spec import BUDGETS

    p = argparse.ArgumentParser(prog="python -m flowmatch study", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="a study (experiments/studies/NAME.yaml), a path to a study file, or 'all'")
    p.add_argument("--budget", default="small", help=f"one of {', '.join(BUDGETS)} (default small: fits 2 CPU cores)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0 .. N-1; default: the budget's)")
    p.add_argument("--variants", nargs="+", default=None, help="run only these variants (their dependencies must be done)")
    p.add_argument("--tracking_uri", "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--out", default="docs/results", help="results: OUT.md (the markdown) and OUT/ (its plots); default docs/results")
    p.add_argument("--workdir", default="runs/studies", help="logs, downloaded models, reflow couplings and latent shards (default runs/studies)")
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print the plan (what would run, what is done) and exit")
    p.add_argument("--report-only", "--report_only", action="store_true", help="only (re)write the study's results section from MLflow")
    p.add_argument("--no-report", "--no_report", action="store_true", help="run the fits but do not write the results")
    p.add_argument("--force", action="store_true", help="re-run every fit even if a finished run exists")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per fit (OMP_NUM_THREADS / MKL_NUM_THREADS; 1 is fastest for the toy MLP on a busy machine)")
    p.add_argument("--jobs", "-j", type=_jobs, default=1, metavar="N",
                   help="run up to N fits at once, each in its own process (default 1: one after the other). Runs are "
                        "started in plan order (seed-major); a run built from another variant's run (couplings_from, "
                        "init_from, latents_from) starts once that run at its seed is done, and is skipped if it failed. "
                        "Give each fit its share of the cores with --threads (e.g. --jobs 2 --threads 1 on 2 cores)")
    p.add_argument("--list", action="store_true", help="list the studies and their budgets")
    p.add_argument("--studies-dir", "--studies_dir", default=None, help=argparse.SUPPRESS)
    return p


def _list(directory) -> str:
    from flowmatch.studies.spec import StudyError, available_studies, load_study, plan

    lines = []
    for name in available_studies(directory):
        try:
            s = load_study(name, directory)
        except StudyError as err:
            lines.append(f"  {name:<20} (invalid: {err})")
            continue
        budgets = ", ".join(f"{b} {len(plan(s, b))} fits" for b in s.budgets)
        lines.append(f"  {name:<20} {budgets}\n  {'':<20} {s.description}")
    return "studies:\n" + "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the study prints its own progress
    from flowmatch.studies.spec import STUDIES_DIR, StudyError, available_studies, load_study, plan
    from flowmatch.tracking.server import TrackingServerError, check_tracking_uri

    directory = Path(args.studies_dir) if args.studies_dir else STUDIES_DIR
    if args.list or not args.name:
        print(_list(directory))
        return 0 if args.list else 2
    names = available_studies(directory) if args.name == "all" else [args.name]
    status = 0
    for name in names:
        try:
            study = load_study(name, directory)
            runs = plan(study, args.budget, args.seeds, args.variants)
            check_tracking_uri(args.tracking_uri)
        except (StudyError, TrackingServerError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        status = max(status, _run_one(study, runs, args))
    return status


def _run_one(study, runs, args) -> int:
    from flowmatch.studies.runner import StudyRunner

    seeds = len({r.seed for r in runs})
    print(f"study {study.name} ({study.path}), budget {args.budget}: {len(runs)} fits ({len({r.variant.name for r in runs})} variants x {seeds} seeds), "
          f"MLflow {args.tracking_uri} experiment {study.experiment!r}" + (f", jobs {args.jobs}" if args.jobs > 1 else ""))
    status = 0
    if not args.report_only:
        threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else None
        runner = StudyRunner(study, runs, args.tracking_uri, args.workdir, force=args.force, extra_env=threads, jobs=args.jobs)
        outcome = runner.execute(dry_run=args.dry_run)
        if args.dry_run:
            print(f"plan: {len(runs) - len(outcome.skipped)} to run, {len(outcome.skipped)} done"
                  + (f"; {args.jobs} at a time, each after the runs it is built from" if args.jobs > 1 else ""))
            return 0
        print(f"study {study.name}: {len(outcome.ran)} ran, {len(outcome.skipped)} already done, {len(outcome.failed)} failed "
              f"in {outcome.seconds / 60:.1f} min")
        for run, why in outcome.failed:
            print(f"  failed: {run.variant.name} seed {run.seed}: {why.splitlines()[0]}", file=sys.stderr)
        status = 1 if outcome.failed else 0
    if not args.no_report:
        from flowmatch.studies.results import ResultsError, write_results

        try:
            md, pngs = write_results(study, args.budget, args.tracking_uri, args.out,
                                     command=f"python -m flowmatch study {study.name} --budget {args.budget} --report-only"
                                     + (f" --tracking_uri {shlex.quote(args.tracking_uri)}" if args.tracking_uri != "sqlite:///mlflow.db" else ""))
        except ResultsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote the {study.name} section of {md} ({len(pngs)} plots in {Path(args.out)})")
    return status
