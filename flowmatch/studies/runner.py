"""Run a study's plan: one real `python -m flowmatch fit` per (seed, variant), each tracked in MLflow.

Every fit runs in its own process (the platform's CLI exactly as a user runs it; its output goes to
``WORKDIR/<study>/<budget>/logs/``) with the tags ``study``, ``variant``, ``seed``, ``budget``,
``study_fingerprint`` and ``study_label``. Before a fit the runner looks for a FINISHED run with the
same tags and fingerprint in the tracking store and skips the fit if there is one, so an
interrupted study continues where it stopped.

Reflow steps: a variant with ``couplings_from: V`` first downloads the final model of V's run at the
same seed (the MLflow artifact ``model/final.ckpt``), draws couplings from it with
``python -m flowmatch reflow`` into ``WORKDIR/<study>/<budget>/couplings/<V>_seed<k>_<run id>`` (kept
and reused: named by the source run, so they never go stale) and trains on them
(``--data.init_args.path``); ``init_from: V`` starts from V's weights (``--model.init_args.init_weights``).

Latents of a study's own autoencoder: a variant with ``latents_from: V`` (V fits
flowmatch.autoencoders.conv.AutoencoderModule) downloads V's final model at the same seed, writes the demo's
latent/caption shards with it, ``python -m flowmatch prepare --source demo --autoencoder <V's final.ckpt>``,
into ``WORKDIR/<study>/<budget>/latents/<V>_seed<k>_<run id>`` (once: reused when its manifest.json exists;
the manifest names the checkpoint, so training and evaluation decode through the same autoencoder) and
trains on them (``--data.init_args.data_dir DIR --data.init_args.prepare_source null``: never the demo's
own shards). The run is tagged ``latents_from_run``.

A finished run built from another variant's run (tags ``couplings_from_run``, ``init_from_run``,
``latents_from_run``) is out of date, and runs again, when that variant's current run at the same seed is
another one (e.g. the autoencoder was fitted again after its config changed).

Parallel fits (``jobs`` > 1, ``python -m flowmatch study ... --jobs N``): up to N fits run at once, each still its
own process writing its own MLflow run; the runner's threads only wait on them. A run is decided (skipped as
finished, out of date, or blocked by a dependency that failed or diverged) once the runs it is built from at its
seed are settled, then launched in plan order (seed-major) as slots free up; so a dependent run waits for its
source, and a study cut short leaves complete seeds first. Progress lines name their run, since they interleave.
The runner's own MLflow calls (finished runs, artifact downloads) happen one at a time, and a shared preparation
step (a downloaded final model, couplings, latents: one folder each, used by every variant built from the same
run) is written under a lock on that folder (``WORKDIR/<study>/<budget>/.locks/``, flock: also across study
processes sharing the workdir), so that it is written once and the other runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from flowmatch.training.divergence import DIVERGED_METRIC
from flowmatch.studies.spec import PlannedRun, Study, cli_value

FINAL_MODEL_ARTIFACT = "model/final.ckpt"
#: the tag in which a run records the run of each variant it was built from (couplings, weights, latents)
SOURCE_TAGS = {"couplings_from": "couplings_from_run", "init_from": "init_from_run", "latents_from": "latents_from_run"}


@dataclass
class FinishedRun:
    run_id: str
    variant: str
    seed: int
    fingerprint: str
    start_time: int
    end_time: int | None
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def seconds(self) -> float | None:
        return (self.end_time - self.start_time) / 1000 if self.end_time else None

    @property
    def diverged(self) -> bool:
        """The fit stopped on a non-finite loss: a result of the study (kept, not re-run), but it has no final model."""
        return DIVERGED_METRIC in self.metrics


@dataclass
class StudyOutcome:
    ran: list[tuple[PlannedRun, str]] = field(default_factory=list)  # (run, MLflow run id)
    skipped: list[tuple[PlannedRun, str]] = field(default_factory=list)
    failed: list[tuple[PlannedRun, str]] = field(default_factory=list)  # (run, why)
    seconds: float = 0.0


def _fmt_time(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def finished_runs(tracking_uri: str, study: Study, budget: str) -> dict[tuple[str, int], FinishedRun]:
    """(variant, seed) -> the latest FINISHED run of the study under the budget whose fingerprint is current, or the
    latest FAILED one that diverged (logged DIVERGED_METRIC: its NaN loss is the result, re-running would repeat it)."""
    from flowmatch.studies.spec import plan

    current = {r.variant.name: r.fingerprint for r in plan(study, budget, seeds=1)}  # the fingerprint does not depend on the seed
    out: dict[tuple[str, int], FinishedRun] = {}
    for run in search_study_runs(tracking_uri, study, budget, statuses=("FINISHED", "FAILED")):
        if run.info.status == "FAILED" and DIVERGED_METRIC not in run.data.metrics:
            continue
        tags = run.data.tags
        try:
            key = (tags["variant"], int(tags["seed"]))
        except (KeyError, ValueError):
            continue
        fp = tags.get("study_fingerprint", "")
        if current.get(key[0]) != fp:
            continue
        found = FinishedRun(run.info.run_id, key[0], key[1], fp, run.info.start_time, run.info.end_time, dict(run.data.metrics),
                            dict(tags))
        if key not in out or found.start_time > out[key].start_time:
            out[key] = found
    return out


def search_study_runs(tracking_uri: str, study: Study, budget: str, statuses: tuple[str, ...] = ("FINISHED",)) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(study.experiment)
    if exp is None:
        return []
    runs = []
    for status in statuses:
        query = f"tags.study = '{study.name}' and tags.budget = '{budget}' and attributes.status = '{status}'"
        token = None
        while True:
            page = client.search_runs([exp.experiment_id], filter_string=query, max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
    return runs


class StudyRunner:
    """Runs (or prints) a study's plan against a tracking store; see this module's docstring."""

    def __init__(self, study: Study, runs: list[PlannedRun], tracking_uri: str, workdir: str | Path = "runs/studies",
                 force: bool = False, echo: Callable[[str], None] = print, python: str = sys.executable,
                 extra_env: dict[str, str] | None = None, jobs: int = 1):
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.study, self.runs, self.tracking_uri, self.force, self.jobs = study, runs, tracking_uri, force, jobs
        self.budget = runs[0].budget if runs else ""
        self.workdir = Path(workdir) / study.name / self.budget
        self.echo, self.python = echo, python
        self.env = {**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", **(extra_env or {})}
        self.headline = list(study.report.get("headline", []))
        self._echo_lock = threading.Lock()  # one progress line (or a failure's log tail) at a time
        self._store_lock = threading.Lock()  # the runner's own MLflow calls, one at a time
        self._procs: set[subprocess.Popen] = set()  # the fits (and prepare / reflow steps) running now
        self._procs_lock = threading.Lock()

    # --- commands --------------------------------------------------------------------------------------------
    def fit_argv(self, run: PlannedRun, extra: list[str] | None = None, extra_tags: dict[str, str] | None = None) -> list[str]:
        tags = cli_value({**run.tags(), **(extra_tags or {})})
        return [self.python, "-m", "flowmatch", "fit", "--config", str(run.config_path), *run.override_args(), *(extra or []),
                "--seed_everything", str(run.seed), "--trainer.enable_progress_bar", "false",
                "--trainer.logger.init_args.tracking_uri", self.tracking_uri,
                "--trainer.logger.init_args.experiment_name", self.study.experiment,
                "--trainer.logger.init_args.run_name", run.run_name, "--trainer.logger.init_args.tags", tags]

    def prepare_argv(self, run: PlannedRun, ckpt: Path, out: Path) -> list[str]:
        """The demo's shards written with an autoencoder checkpoint (by default the demo's fixed split, seed 0),
        with the study's / budget's ``latents`` options."""
        opts = {"source": "demo", **run.latents}
        args = [self.python, "-m", "flowmatch", "prepare", "--source", cli_value(opts.pop("source")), "--out", str(out),
                "--autoencoder", str(ckpt), "--progress", "false"]
        for key, value in opts.items():
            args += [f"--{key}", cli_value(value)]
        return args

    def latents_dir(self, run: PlannedRun, source: FinishedRun | None) -> Path:
        """Where the latents of the run's autoencoder variant go: named by that variant's run (a placeholder when it has
        not run yet), and by a hash of the ``latents`` options when there are any."""
        variant = run.variant.latents_from
        rid = source.run_id[:12] if source is not None else "<run id>"
        opts = f"_{hashlib.sha1(json.dumps(run.latents, sort_keys=True, default=str).encode()).hexdigest()[:8]}" if run.latents else ""
        return self.workdir / "latents" / f"{variant}_seed{run.seed}_{rid}{opts}"

    def reflow_argv(self, run: PlannedRun, ckpt: Path, out: Path) -> list[str]:
        opts = {"num_pairs": 50000, "solver": "euler", "steps": 100, **run.reflow}
        args = [self.python, "-m", "flowmatch", "reflow", "--ckpt", str(ckpt), "--out", str(out), "--seed", str(run.seed), "--progress", "false"]
        for key, value in opts.items():
            args += [f"--{key.replace('_', '-')}", cli_value(value)]
        return args

    # --- the plan --------------------------------------------------------------------------------------------------
    def execute(self, dry_run: bool = False) -> StudyOutcome:
        """Run the plan (``jobs`` fits at a time), or with ``dry_run`` print it."""
        if self.jobs > 1 and not dry_run:
            return self._execute_parallel()
        outcome = StudyOutcome()
        start = time.time()
        # finished runs: skipped unless --force, and always the source of a reflow or latents step's model (updated as fits finish)
        done = self._finished()
        failed_keys: set[tuple[str, int]] = set()

        for run in self.runs:
            elapsed = _fmt_time(time.time() - start)
            prev = self._previous(run, done)
            if prev is not None:
                self._skip(run, prev, elapsed, outcome)
                continue
            if dry_run:
                self._print_plan(run, done)
                continue
            why = self._blocked(run, done, failed_keys)
            if why is not None:
                self._say(f"{run.describe()} ... skip: {why}  [elapsed {elapsed}]")
                self._failed(run, why, outcome, failed_keys)
                continue
            self._say(f"{run.describe()} ...  [elapsed {elapsed}]")
            t0 = time.time()
            err = None
            try:
                self._attempt(run, done)
            except StudyRunError as e:
                err = e
            self._record(run, t0, err, done, outcome, failed_keys)
        outcome.seconds = time.time() - start
        return outcome

    def _execute_parallel(self) -> StudyOutcome:
        """Up to ``jobs`` fits at once (threads, each waiting on its fit's process). A run is decided once the runs it
        is built from at its seed are settled (so a finished run is checked against their current runs, and a run whose
        source failed is blocked); the runs to fit are launched in plan order as slots free up."""
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        outcome = StudyOutcome()
        start = time.time()
        done = self._finished()
        failed_keys: set[tuple[str, int]] = set()
        planned = {run.key for run in self.runs}
        settled: set[tuple[str, int]] = set()  # skipped, blocked, failed or fitted
        waiting = list(self.runs)  # not decided yet: a source of theirs (same seed, in this plan) is not settled
        ready: list[PlannedRun] = []  # to fit, in plan order
        running: dict[Future, tuple[PlannedRun, float]] = {}
        pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="study-fit")
        try:
            while waiting or ready or running:
                for run in list(waiting):
                    if any((d, run.seed) in planned and (d, run.seed) not in settled for d in run.variant.depends_on):
                        continue
                    waiting.remove(run)
                    elapsed = _fmt_time(time.time() - start)
                    prev = self._previous(run, done)
                    if prev is not None:
                        self._skip(run, prev, elapsed, outcome)
                        settled.add(run.key)
                        continue
                    why = self._blocked(run, done, failed_keys)
                    if why is not None:
                        self._say(f"{run.describe()} ... skip: {why}  [elapsed {elapsed}]")
                        self._failed(run, why, outcome, failed_keys)
                        settled.add(run.key)
                        continue
                    ready.append(run)
                ready.sort(key=lambda r: r.index)
                while ready and len(running) < self.jobs:
                    run = ready.pop(0)
                    self._say(f"{run.describe()} ... started  [elapsed {_fmt_time(time.time() - start)}, "
                              f"{len(running) + 1} of {self.jobs} running]")
                    running[pool.submit(self._attempt, run, dict(done))] = (run, time.time())
                if not running:
                    if waiting or ready:  # cannot happen: a run's sources come before it in the plan
                        raise RuntimeError(f"study runner: nothing running, but {', '.join(r.describe() for r in waiting + ready)} not decided")
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=lambda f: running[f][0].index):
                    run, t0 = running.pop(future)
                    err = future.exception()
                    if err is not None and not isinstance(err, StudyRunError):
                        raise err
                    self._record(run, t0, err, done, outcome, failed_keys)
                    settled.add(run.key)
        except BaseException:
            self._stop_running()  # interrupted (or a bug): the study's running fits stop with it, as with one job
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for runs in (outcome.ran, outcome.skipped, outcome.failed):
            runs.sort(key=lambda item: item[0].index)  # as one job lists them: in plan order
        outcome.seconds = time.time() - start
        return outcome

    # --- the decisions and the record of one run ------------------------------------------------------------
    def _finished(self) -> dict[tuple[str, int], FinishedRun]:
        with self._store_lock:
            return finished_runs(self.tracking_uri, self.study, self.budget)

    def _previous(self, run: PlannedRun, done: dict[tuple[str, int], FinishedRun]) -> FinishedRun | None:
        """The run's finished (or diverged) run to keep, unless --force or it was built from an outdated source run."""
        prev = None if self.force else done.get(run.key)
        stale = self._stale_sources(run, prev, done) if prev is not None else []
        if stale:
            self._say(f"{run.describe()} ... out of date: finished run {prev.run_id} was built from {'; '.join(stale)}")
            prev = None
        return prev

    def _skip(self, run: PlannedRun, prev: FinishedRun, elapsed: str, outcome: StudyOutcome) -> None:
        self._say(f"{run.describe()} ... skip: finished run {prev.run_id}{self._headline(prev.metrics)}  [elapsed {elapsed}]")
        outcome.skipped.append((run, prev.run_id))

    @staticmethod
    def _blocked(run: PlannedRun, done: dict[tuple[str, int], FinishedRun], failed_keys: set[tuple[str, int]]) -> str | None:
        """Why the run cannot be fitted (a source at its seed failed, diverged or is missing), or None."""
        deps = run.variant.depends_on
        if any((d, run.seed) in failed_keys or (d, run.seed) not in done or done[(d, run.seed)].diverged for d in deps):
            return f"needs {', '.join(deps)} at seed {run.seed}, which did not finish (or diverged)"
        return None

    @staticmethod
    def _failed(run: PlannedRun, why: str, outcome: StudyOutcome, failed_keys: set[tuple[str, int]]) -> None:
        outcome.failed.append((run, why))
        failed_keys.add(run.key)

    def _print_plan(self, run: PlannedRun, done: dict[tuple[str, int], FinishedRun]) -> None:
        missing = [d for d in run.variant.depends_on if (d, run.seed) not in done]
        after = f" (after {' and '.join(missing)} at seed {run.seed})" if missing else ""
        self._say(f"{run.describe()} ... would run{after}")
        if run.variant.couplings_from:
            self._say(f"    couplings: {shlex.join(self._rel(self.reflow_argv(run, Path('<' + run.variant.couplings_from + ' final.ckpt>'), Path('<couplings>'))))}")
        if run.variant.latents_from:
            src = run.variant.latents_from
            out = self.latents_dir(run, done.get((src, run.seed)))
            reuse = " (exists: reused)" if (out / "manifest.json").is_file() else ""
            self._say(f"    latents: {shlex.join(self._rel(self.prepare_argv(run, Path('<' + src + ' final.ckpt>'), out)))}{reuse}")
        self._say(f"    {shlex.join(self._rel(self.fit_argv(run, self._dep_args_placeholder(run, done))))}")

    def _attempt(self, run: PlannedRun, done: dict[tuple[str, int], FinishedRun]) -> None:
        """The run's preparation steps and its fit (raises StudyRunError); in a worker thread when jobs > 1."""
        extra, extra_tags = self._prepare_dependencies(run, done)
        self._fit(run, extra, extra_tags)

    def _record(self, run: PlannedRun, t0: float, err: StudyRunError | None, done: dict[tuple[str, int], FinishedRun],
                outcome: StudyOutcome, failed_keys: set[tuple[str, int]]) -> None:
        """After a fit (started at t0): its run from the store (done, diverged) or its failure."""
        found = self._finished().get(run.key)
        if err is not None:
            if found is not None and found.diverged and found.start_time >= t0 * 1000 - 1000:  # this attempt diverged
                done[run.key] = found
                outcome.ran.append((run, found.run_id))
                self._note(run, f"diverged in {time.time() - t0:.0f} s: run {found.run_id}{self._headline(found.metrics)} "
                                "(a result of the study: kept, not re-run)")
                return
            self._note(run, f"FAILED: {err}")
            self._failed(run, str(err), outcome, failed_keys)
            return
        if found is None:
            why = f"fit exited normally but no FINISHED MLflow run tagged study={self.study.name} variant={run.variant.name} seed={run.seed} is in {self.tracking_uri}"
            self._note(run, f"FAILED: {why}")
            self._failed(run, why, outcome, failed_keys)
            return
        done[run.key] = found
        outcome.ran.append((run, found.run_id))
        self._note(run, f"done in {time.time() - t0:.0f} s: run {found.run_id}{self._headline(found.metrics)}")

    def _say(self, line: str) -> None:
        with self._echo_lock:
            self.echo(line)

    def _note(self, run: PlannedRun, text: str) -> None:
        """A line about a run's steps: indented under the run's line with one job; naming the run with several
        (their lines interleave)."""
        self._say(f"    {text}" if self.jobs <= 1 else f"{run.describe()}: {text}")

    @staticmethod
    def _stale_sources(run: PlannedRun, prev: FinishedRun, done: dict[tuple[str, int], FinishedRun]) -> list[str]:
        """The sources (couplings, weights, latents) of a finished run that are no longer the current runs of their
        variants (e.g. its autoencoder variant was fitted again): then the run is out of date too."""
        out = []
        for attr, tag in SOURCE_TAGS.items():
            dep = getattr(run.variant, attr)
            current = done.get((dep, run.seed)) if dep else None
            used = prev.tags.get(tag)
            if current is not None and used and used != current.run_id:
                out.append(f"{dep} run {used[:12]}, not the current {current.run_id[:12]}")
        return out

    def _headline(self, metrics: dict[str, float]) -> str:
        parts = [f"{k} {metrics[k]:.4g}" for k in self.headline if k in metrics]
        if DIVERGED_METRIC in metrics:
            parts.append(f"loss diverged at step {metrics[DIVERGED_METRIC]:.0f}")
        return f" ({', '.join(parts)})" if parts else ""

    def _rel(self, argv: list[str]) -> list[str]:
        cwd = Path.cwd()
        out = []
        for a in argv:
            p = Path(a)
            if p.is_absolute() and a != self.python:
                try:
                    a = str(p.relative_to(cwd))
                except ValueError:
                    pass
            out.append("python" if a == self.python else a)
        return out

    def _dep_args_placeholder(self, run: PlannedRun, done: dict[tuple[str, int], FinishedRun]) -> list[str]:
        args = []
        if run.variant.couplings_from:
            args += ["--data.init_args.path", f"<couplings of {run.variant.couplings_from}>"]
        if run.variant.init_from:
            args += ["--model.init_args.init_weights", f"<{run.variant.init_from} final.ckpt>"]
        if run.variant.latents_from:
            latents = self.latents_dir(run, done.get((run.variant.latents_from, run.seed)))
            args += ["--data.init_args.data_dir", str(latents), "--data.init_args.prepare_source", "null"]
        return args

    # --- steps --------------------------------------------------------------------------------------------------------
    def _log(self, name: str) -> Path:
        path = self.workdir / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _call(self, argv: list[str], log: Path, what: str) -> None:
        with open(log, "w") as fh:
            fh.write("$ " + shlex.join(argv) + "\n")
            fh.flush()
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
            with self._procs_lock:
                self._procs.add(proc)
            try:
                returncode = proc.wait()
            except BaseException:  # interrupted: the step stops with the study (as subprocess.run does)
                self._stop(proc)
                raise
            finally:
                with self._procs_lock:
                    self._procs.discard(proc)
        if returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise StudyRunError(f"{what} exited with status {returncode}; log {log}:\n      " + "\n      ".join(tail))

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        """A step interrupted with the study: a moment to end on its own (Ctrl-C reaches the whole process group), then killed."""
        try:
            proc.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _stop_running(self) -> None:
        with self._procs_lock:
            procs = list(self._procs)
        for proc in procs:
            self._stop(proc)

    @contextmanager
    def _exclusive(self, out: Path) -> Iterator[None]:
        """Hold the lock of a shared output folder (a downloaded final model, couplings, latents) while checking for
        and writing it: concurrent runs built from the same source run write it once, the others then reuse it.
        flock on a file of its own per folder: it serialises this runner's threads and other study processes alike."""
        import fcntl

        locks = self.workdir / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{out.parent.name}_{out.name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _fit(self, run: PlannedRun, extra: list[str], extra_tags: dict[str, str]) -> None:
        self._call(self.fit_argv(run, extra, extra_tags), self._log(f"{run.variant.name}_seed{run.seed}"), "fit")

    def _final_model(self, source: FinishedRun) -> Path:
        """The final model of a finished run (its MLflow artifact model/final.ckpt), downloaded once."""
        import mlflow.artifacts

        dst = self.workdir / "models" / f"{source.variant}_seed{source.seed}_{source.run_id[:12]}"
        path = dst / Path(FINAL_MODEL_ARTIFACT).name  # where MLflow puts a single downloaded file
        with self._exclusive(dst):
            if not path.is_file():
                dst.mkdir(parents=True, exist_ok=True)
                try:
                    with self._store_lock:
                        local = mlflow.artifacts.download_artifacts(run_id=source.run_id, artifact_path=FINAL_MODEL_ARTIFACT,
                                                                    dst_path=str(dst), tracking_uri=self.tracking_uri)
                except Exception as err:  # noqa: BLE001 - any store error is reported with the run it concerns
                    raise StudyRunError(f"could not download {FINAL_MODEL_ARTIFACT} of run {source.run_id} (variant {source.variant}, "
                                        f"seed {source.seed}): {str(err).splitlines()[0]}") from None
                path = Path(local)
        return path

    def _prepare_dependencies(self, run: PlannedRun, done: dict[tuple[str, int], FinishedRun]) -> tuple[list[str], dict[str, str]]:
        """Couplings and initial weights of a reflow / distillation variant, latents of an autoencoder variant:
        (fit arguments, extra tags)."""
        args: list[str] = []
        tags: dict[str, str] = {}
        if run.variant.couplings_from:
            source = done[(run.variant.couplings_from, run.seed)]
            ckpt = self._final_model(source)
            out = self.workdir / "couplings" / f"{source.variant}_seed{source.seed}_{source.run_id[:12]}"
            with self._exclusive(out):
                if (out / "manifest.json").is_file():
                    self._note(run, f"couplings of {source.variant} (run {source.run_id[:12]}): reusing {out}")
                else:
                    t0 = time.time()
                    self._call(self.reflow_argv(run, ckpt, out), self._log(f"reflow_{source.variant}_seed{source.seed}"), "reflow")
                    self._note(run, f"couplings of {source.variant} (run {source.run_id[:12]}) drawn in {time.time() - t0:.0f} s: {out}")
            args += ["--data.init_args.path", str(out.resolve())]
            tags["couplings_from_run"] = source.run_id
        if run.variant.init_from:
            source = done[(run.variant.init_from, run.seed)]
            args += ["--model.init_args.init_weights", str(self._final_model(source).resolve())]
            tags["init_from_run"] = source.run_id
        if run.variant.latents_from:
            source = done[(run.variant.latents_from, run.seed)]
            out = self._latents(run, source)
            args += ["--data.init_args.data_dir", str(out.resolve()), "--data.init_args.prepare_source", "null"]
            tags["latents_from_run"] = source.run_id
        return args, tags

    def _latents(self, run: PlannedRun, source: FinishedRun) -> Path:
        """The demo's latent shards written with an autoencoder run's final model (written once, then reused)."""
        out = self.latents_dir(run, source)
        what = f"latents of {source.variant} seed {source.seed} (run {source.run_id[:12]})"
        with self._exclusive(out):
            if (out / "manifest.json").is_file():
                self._note(run, f"{what}: reusing {out}")
                return out
            ckpt = self._final_model(source)
            t0 = time.time()
            self._call(self.prepare_argv(run, ckpt.resolve(), out), self._log(f"prepare_{source.variant}_seed{source.seed}"),
                       f"prepare of the {what}")
            if not (out / "manifest.json").is_file():
                raise StudyRunError(f"prepare of the {what} exited normally but wrote no {out / 'manifest.json'}")
            self._note(run, f"{what} written in {time.time() - t0:.0f} s: {out}")
        return out


class StudyRunError(RuntimeError):
    """A step of a study failed (the message holds the tail of its log)."""
