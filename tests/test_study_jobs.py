"""`python -m flowmatch study ... --jobs N`: a study's independent fits run N at a time.

The fits here are a stand-in for `python -m flowmatch fit|reflow|prepare` (FAKE below, given to the runner as its
`python`): it records when it starts and ends, sleeps as its variant's overrides say, and records its run either in
a JSON-lines file that stands for the tracking store (the runner's `finished_runs` and the artifact download are
patched to read it; fast) or, in the last test, in a real SQLite MLflow store, with the CLI as a user runs it. So the
tests time the runner's scheduling, not the training: two fits overlap, a dependent fit starts only after its
source ended, a failing fit is reported while the others go on, a shared preparation step (couplings, latents) runs
once, and the outcome equals the one of --jobs 1."""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from flowmatch.cli.main import main as flowmatch_main
from flowmatch.studies import load_study, plan
from flowmatch.studies import runner as runner_module
from flowmatch.studies.runner import FinishedRun, StudyRunner

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "toy2d_rf.yaml"
AE_D4 = REPO / "configs" / "autoencoder" / "ae_d4.yaml"
GEN = REPO / "experiments" / "latent_mmdit_small.yaml"

FAKE = '''#!{python}
"""A stand-in for `python -m flowmatch fit|reflow|prepare` (tests/test_study_jobs.py)."""
import json, os, sys, time, uuid
from pathlib import Path

argv = sys.argv[1:]
assert argv[:2] == ["-m", "flowmatch"], argv
cmd, rest = argv[2], argv[3:]
opts = {{rest[i][2:]: rest[i + 1] for i in range(len(rest) - 1) if rest[i].startswith("--")}}


def event(**kw):
    line = json.dumps({{"t": time.time(), "cmd": cmd, **kw}}) + "\\n"
    fd = os.open(os.environ["FAKE_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, line.encode())
    os.close(fd)


if cmd in ("reflow", "prepare"):  # couplings / latents: a manifest in --out
    event(phase="start", out=opts["out"])
    time.sleep(0.5)
    Path(opts["out"]).mkdir(parents=True, exist_ok=True)
    (Path(opts["out"]) / "manifest.json").write_text("{{}}")
    event(phase="end", out=opts["out"])
    sys.exit(0)

tags = json.loads(opts["trainer.logger.init_args.tags"])
who = dict(variant=tags["variant"], seed=int(tags["seed"]))
event(phase="start", args={{k: v for k, v in opts.items() if k.startswith(("model.", "data."))}}, **who)
start = int(time.time() * 1000)
time.sleep(float(opts.get("fake.sleep", 0)))
if int(opts.get("fake.exit", 0)):
    print("the fake fit fails on purpose")
    event(phase="end", status="failed", **who)
    sys.exit(int(opts["fake.exit"]))
uri = opts["trainer.logger.init_args.tracking_uri"]
if uri.startswith("sqlite:"):  # a real MLflow run, with a final model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    name = opts["trainer.logger.init_args.experiment_name"]
    try:
        exp = client.create_experiment(name)
    except Exception:  # created by the other fit at the same moment
        exp = client.get_experiment_by_name(name).experiment_id
    run = client.create_run(exp, tags=tags, run_name=opts["trainer.logger.init_args.run_name"])
    client.log_metric(run.info.run_id, "val/loss", 0.5)
    ckpt = Path(os.environ["FAKE_EVENTS"]).parent / "models" / run.info.run_id / "final.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_text(tags["variant"])
    client.log_artifact(run.info.run_id, str(ckpt), "model")  # model/final.ckpt
    client.set_terminated(run.info.run_id)
else:  # the JSON-lines store: one record a run, its final model beside it
    run_id = uuid.uuid4().hex
    (Path(uri).parent / "artifacts" / run_id).mkdir(parents=True)
    (Path(uri).parent / "artifacts" / run_id / "final.ckpt").write_text(tags["variant"])
    record = dict(run_id=run_id, tags=tags, start=start, end=int(time.time() * 1000), metrics={{"val/loss": 0.5}})
    fd = os.open(uri, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (json.dumps(record) + "\\n").encode())
    os.close(fd)
event(phase="end", status="done", **who)
'''


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """The stand-in `python`, its events file (FAKE_EVENTS) and the working directory (tmp_path)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    script = tmp_path / "fake_python"
    script.write_text(FAKE.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("FAKE_EVENTS", str(tmp_path / "events.jsonl"))
    return script


@pytest.fixture()
def json_store(monkeypatch):
    """The runner's store reads (finished runs, the download of a final model) from the stand-in's JSON-lines store;
    returns the list of downloaded run ids."""
    import mlflow.artifacts

    def finished_runs(tracking_uri, study, budget):
        out = {}
        path = Path(tracking_uri)
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a record being written
            tags = rec["tags"]
            if (tags["study"], tags["budget"]) != (study.name, budget):
                continue
            found = FinishedRun(rec["run_id"], tags["variant"], int(tags["seed"]), tags["study_fingerprint"], rec["start"], rec["end"],
                                rec["metrics"], tags)
            key = (found.variant, found.seed)
            if key not in out or found.start_time > out[key].start_time:
                out[key] = found
        return out

    downloads = []

    def download_artifacts(run_id, artifact_path, dst_path, tracking_uri):
        downloads.append(run_id)
        time.sleep(0.3)  # a window for a second download of the same model, were it not locked
        dst = Path(dst_path) / "final.ckpt"
        shutil.copy(Path(tracking_uri).parent / "artifacts" / run_id / "final.ckpt", dst)
        return str(dst)

    monkeypatch.setattr(runner_module, "finished_runs", finished_runs)
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download_artifacts)
    return downloads


def _study(tmp_path: Path, variants: str, seeds: int = 1, name: str = "par"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"description: a parallel study (test)\nexperiment: {name}\nbase: {BASE}\nvariants:\n{variants}"
                    f"budgets: {{small: {{seeds: {seeds}}}}}\nreport: {{kind: comparison, columns: [{{metric: val/loss, label: loss}}]}}\n")
    study = load_study(str(path))
    return study, plan(study, "small")


def _run(study, runs, tmp_path: Path, fake: Path, jobs: int, store: str = "store"):
    lines: list[str] = []
    runner = StudyRunner(study, runs, str(tmp_path / store / "runs.jsonl"), tmp_path / store / "w", echo=lines.append, python=str(fake),
                         jobs=jobs)
    (tmp_path / store).mkdir(exist_ok=True)
    outcome = runner.execute()
    return outcome, "\n".join(lines)


def _events(tmp_path: Path) -> dict:
    """(variant, seed) -> {'start': t, 'end': t, 'args': {...}} of the stand-in's fits (then forgets them)."""
    out: dict = {}
    path = tmp_path / "events.jsonl"
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e["cmd"] != "fit":
            continue
        out.setdefault((e["variant"], e["seed"]), []).append(e)
    path.unlink()
    return {k: {"start": next(e["t"] for e in v if e["phase"] == "start"), "end": max(e["t"] for e in v if e["phase"] == "end"),
                "args": v[0].get("args")} for k, v in out.items()}


def _max_concurrent(intervals) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def _keys(items) -> list:
    return [(run.variant.name, run.seed) for run, _ in items]


# --- the option ---------------------------------------------------------------------------------------------
def test_jobs_must_be_at_least_one_and_the_help_explains_it(tmp_path, capsys):
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exc:
            flowmatch_main(["study", "reflow", "--jobs", bad])
        assert exc.value.code == 2
        assert "argument --jobs/-j: expected an integer >= 1, got" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flowmatch_main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--jobs N, -j N run up to N fits at once" in text and "starts once that run at its seed is done" in text
    assert "python -m flowmatch study sd3_formulations_digits --budget small --threads 1 --jobs 2" in text
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        StudyRunner(*_study(tmp_path, "  a: {}\n"), "sqlite:///unused.db", jobs=0)


def test_dry_run_with_jobs_prints_the_same_plan_and_says_jobs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner_module, "finished_runs", lambda *args: {})  # an empty store (no SQLite store to create)
    argv = ["study", "reflow", "--dry-run", "--tracking_uri", f"sqlite:///{tmp_path / 'm.db'}", "--workdir", str(tmp_path / "w")]
    assert flowmatch_main(argv) == 0
    one = capsys.readouterr().out.splitlines()
    assert flowmatch_main(argv + ["--jobs", "2"]) == 0
    two = capsys.readouterr().out.splitlines()
    assert two[0] == one[0] + ", jobs 2" and two[1:-1] == one[1:-1]
    assert two[-1] == "plan: 18 to run, 0 done; 2 at a time, each after the runs it is built from"
    assert not (tmp_path / "w").exists()


# --- the scheduling (stand-in fits, JSON-lines store) --------------------------------------------------------------
def test_two_fits_overlap_a_dependent_waits_and_the_outcome_equals_one_job(tmp_path, fake, json_store):
    study, runs = _study(tmp_path, "  slow: {overrides: {fake.sleep: 1.5}}\n  quick: {overrides: {fake.sleep: 0.1}}\n"
                                   "  after: {init_from: slow}\n  other: {overrides: {fake.sleep: 0.1}}\n", seeds=2)
    t0 = time.time()
    outcome, out = _run(study, runs, tmp_path, fake, jobs=2)
    parallel_s = time.time() - t0
    fits = _events(tmp_path)
    assert len(fits) == 8 and not outcome.failed and not outcome.skipped, out
    assert _keys(outcome.ran) == [r.key for r in runs]  # listed in plan order, as with one job
    # two fits really run at once, never more
    slow, quick = fits[("slow", 0)], fits[("quick", 0)]
    assert slow["start"] < quick["end"] and quick["start"] < slow["end"]
    assert _max_concurrent([(f["start"], f["end"]) for f in fits.values()]) == 2
    # the dependent variant starts after its source (same seed) ended, from that run's final model
    ids = {(r.variant.name, r.seed): rid for r, rid in outcome.ran}
    for seed in (0, 1):
        assert fits[("after", seed)]["start"] > fits[("slow", seed)]["end"]
        assert fits[("after", seed)]["args"]["model.init_args.init_weights"].endswith(
            f"models/slow_seed{seed}_{ids[('slow', seed)][:12]}/final.ckpt")
    # the runs without dependencies start in plan order; every line names its run
    started = re.findall(r"^\[(\d+)/8\] par (\w+) seed (\d) \.\.\. started  \[elapsed \d:\d\d:\d\d, [12] of 2 running\]$", out, re.M)
    assert len(started) == 8, out
    independent = [int(i) for i, v, _ in started if v != "after"]
    assert independent == sorted(independent)
    for run, rid in outcome.ran:
        assert re.search(rf"^{re.escape(run.describe())}: done in \d+ s: run {rid}$", out, re.M), out
    assert sorted(set(json_store)) == sorted({ids[("slow", 0)], ids[("slow", 1)]})

    # --jobs 1: the same outcome (another store), one fit at a time
    t0 = time.time()
    single, out1 = _run(study, runs, tmp_path, fake, jobs=1, store="single")
    serial_s = time.time() - t0
    assert (_keys(single.ran), _keys(single.skipped), _keys(single.failed)) == (_keys(outcome.ran), [], [])
    assert _max_concurrent([(f["start"], f["end"]) for f in _events(tmp_path).values()]) == 1
    assert "[1/8] par slow seed 0 ...  [elapsed 0:00:00]\n    done in" in out1  # one job: today's lines
    assert parallel_s < serial_s, (parallel_s, serial_s)

    # run again with two jobs: everything is done
    again, out2 = _run(study, runs, tmp_path, fake, jobs=2)
    assert not again.ran and not again.failed and again.skipped == outcome.ran
    assert f"[1/8] par slow seed 0 ... skip: finished run {ids[('slow', 0)]}" in out2 and "started" not in out2
    assert not (tmp_path / "events.jsonl").exists()


def test_a_failing_fit_is_reported_and_the_others_go_on(tmp_path, fake, json_store):
    study, runs = _study(tmp_path, "  bad: {overrides: {fake.exit: 3, fake.sleep: 0.3}}\n  good: {overrides: {fake.sleep: 0.6}}\n"
                                   "  after_bad: {init_from: bad}\n  after_good: {init_from: good}\n  last: {}\n")
    outcome, out = _run(study, runs, tmp_path, fake, jobs=2)
    fits = _events(tmp_path)
    assert _keys(outcome.ran) == [("good", 0), ("after_good", 0), ("last", 0)]
    assert _keys(outcome.failed) == [("bad", 0), ("after_bad", 0)]
    (_, why_bad), (_, why_after) = outcome.failed
    assert why_bad.startswith("fit exited with status 3; log ") and "the fake fit fails on purpose" in why_bad
    assert why_after == "needs bad at seed 0, which did not finish (or diverged)"
    assert re.search(r"^\[1/5\] par bad seed 0: FAILED: fit exited with status 3; log .*bad_seed0\.log:\n .*\n      the fake fit fails on purpose",
                     out, re.M), out
    assert re.search(r"^\[3/5\] par after_bad seed 0 \.\.\. skip: needs bad at seed 0, which did not finish \(or diverged\)  \[elapsed", out, re.M)
    assert ("after_bad", 0) not in fits and fits[("after_good", 0)]["start"] > fits[("good", 0)]["end"]
    single, _ = _run(study, runs, tmp_path, fake, jobs=1, store="single")
    assert (_keys(single.ran), _keys(single.failed)) == (_keys(outcome.ran), _keys(outcome.failed))
    assert [why.split("; log ")[0] for _, why in single.failed] == [why.split("; log ")[0] for _, why in outcome.failed]


def test_shared_couplings_latents_and_models_are_prepared_once(tmp_path, fake, json_store):
    """Two reflow variants of one source and two generators on one autoencoder's latents, all four at once: the
    couplings, the latents and each final model are written once (under the folder's lock); the other run reuses them."""
    slow = "overrides: {fake.sleep: 0.5}"
    study, runs = _study(tmp_path, f"  src: {{}}\n  ae: {{config: {AE_D4}}}\n  r1: {{couplings_from: src, {slow}}}\n  r2: {{couplings_from: src, {slow}}}\n"
                                   f"  g1: {{config: {GEN}, latents_from: ae, {slow}}}\n  g2: {{config: {GEN}, latents_from: ae, {slow}}}\n")
    outcome, out = _run(study, runs, tmp_path, fake, jobs=4)
    assert len(outcome.ran) == 6 and not outcome.failed, out
    ids = {r.variant.name: rid for r, rid in outcome.ran}
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    steps = {c: [e["out"] for e in events if e["cmd"] == c and e["phase"] == "start"] for c in ("reflow", "prepare")}
    w = tmp_path / "store" / "w" / "par" / "small"
    assert steps["reflow"] == [str(w / "couplings" / f"src_seed0_{ids['src'][:12]}")]
    assert len(steps["prepare"]) == 1 and Path(steps["prepare"][0]).name.startswith(f"ae_seed0_{ids['ae'][:12]}")
    assert sorted(json_store) == sorted([ids["src"], ids["ae"]])  # each final model downloaded once
    fit_args = {e["variant"]: e["args"] for e in events if e["cmd"] == "fit" and e["phase"] == "start"}
    assert fit_args["r1"]["data.init_args.path"] == fit_args["r2"]["data.init_args.path"] == steps["reflow"][0]
    assert fit_args["g1"]["data.init_args.data_dir"] == fit_args["g2"]["data.init_args.data_dir"] == steps["prepare"][0]
    assert len(re.findall(r"^\[\d/6\] par r\d seed 0: couplings of src \(run \w+\) drawn in \d+ s", out, re.M)) == 1
    assert len(re.findall(r"^\[\d/6\] par r\d seed 0: couplings of src \(run \w+\): reusing ", out, re.M)) == 1
    assert len(re.findall(r"^\[\d/6\] par g\d seed 0: latents of ae seed 0 \(run \w+\) written in", out, re.M)) == 1
    assert len(re.findall(r"^\[\d/6\] par g\d seed 0: latents of ae seed 0 \(run \w+\): reusing ", out, re.M)) == 1
    # the two runs of each pair were in flight together (so the lock, not their order, kept the step single)
    starts = {e["variant"]: e["t"] for e in events if e["cmd"] == "fit" and e["phase"] == "start"}
    ends = {e["variant"]: e["t"] for e in events if e["cmd"] == "fit" and e["phase"] == "end"}
    for one, two in (("r1", "r2"), ("g1", "g2")):
        assert starts[one] < ends[two] and starts[two] < ends[one]


# --- the CLI with a real MLflow store --------------------------------------------------------------------------------
def test_a_parallel_study_through_the_cli_with_mlflow(tmp_path, fake, monkeypatch, capsys):
    """`python -m flowmatch study FILE --jobs 2` with a SQLite MLflow store written by the (stand-in) fits themselves:
    two fits at once, the dependent one from its source's final model (downloaded from MLflow) while the other still
    runs, then all skipped."""
    from mlflow.tracking import MlflowClient

    study, _ = _study(tmp_path, "  a: {}\n  b: {overrides: {fake.sleep: 3.0}}\n  c: {init_from: a}\n", name="cli")
    monkeypatch.setattr(runner_module, "StudyRunner", functools.partial(StudyRunner, python=str(fake)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["study", str(study.path), "--budget", "small", "--tracking_uri", uri, "--workdir", str(tmp_path / "w"), "--no-report",
            "--threads", "1", "--jobs", "2"]
    assert flowmatch_main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert re.search(r"^study cli .*: 3 fits \(3 variants x 1 seeds\), MLflow sqlite:.* experiment 'cli', jobs 2$", out, re.M), out
    assert re.search(r"^\[1/3\] cli a seed 0 \.\.\. started  \[elapsed 0:00:\d\d, 1 of 2 running\]\n"
                     r"\[2/3\] cli b seed 0 \.\.\. started  \[elapsed 0:00:\d\d, 2 of 2 running\]$", out, re.M), out
    assert "3 ran, 0 already done, 0 failed" in out
    fits = _events(tmp_path)
    assert fits[("a", 0)]["start"] < fits[("b", 0)]["end"] and fits[("b", 0)]["start"] < fits[("a", 0)]["end"]
    assert fits[("a", 0)]["end"] < fits[("c", 0)]["start"] < fits[("b", 0)]["end"]
    client = MlflowClient(uri)
    by = {r.data.tags["variant"]: r for r in client.search_runs([client.get_experiment_by_name("cli").experiment_id])}
    assert set(by) == {"a", "b", "c"} and all(r.info.status == "FINISHED" for r in by.values())
    assert by["c"].data.tags["init_from_run"] == by["a"].info.run_id
    for v, r in by.items():
        assert re.search(rf"^\[\d/3\] cli {v} seed 0: done in \d+ s: run {r.info.run_id}$", out, re.M), out
    assert flowmatch_main(argv) == 0
    assert "0 ran, 3 already done, 0 failed" in capsys.readouterr().out
