"""Reflow end to end through the real CLI (docs/spec.md §5): 1-RF on 8 gaussians -> its couplings -> 2-RF (and a
one-step distilled student) on them. Reflow must straighten the paths and make one Euler step sample well."""

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_utils import REPO, checkpoint_from_output, run_cli
from flowmatch.objectives.loading import load_objective
from flowmatch.cli.main import OWN_COMMANDS
from flowmatch.cli.reflow import _source_info
from flowmatch.cli.reflow import main as reflow_main
from flowmatch.data.toy2d import sample_target
from flowmatch.metrics import wasserstein2_exact
from flowmatch.metrics.straightness import straightness
from flowmatch.objectives.distillation import FewStepDistillation
from flowmatch.reflow import read_couplings, read_manifest
from flowmatch.sampling import SamplerConfig

torch.set_num_threads(1)

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 cores shared: no thread oversubscription
QUICK = ["--model.init_args.network.init_args.hidden", "128", "--trainer.enable_progress_bar", "false",
         "--trainer.callbacks", "null", "--trainer.logger", "false"]
STEPS_1RF, STEPS_2RF, NUM_PAIRS, NUM_EVAL = 800, 500, 10000, 1000


def _env() -> dict:
    env = {**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", **ONE_THREAD}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def reflow_argv(args: list) -> list[str]:
    """`python -m flowmatch reflow ...` once the command is registered, the module itself until then."""
    head = ["-m", "flowmatch", "reflow"] if "reflow" in OWN_COMMANDS else ["-m", "flowmatch.cli.reflow"]
    return [sys.executable, *head, *map(str, args)]


def run_reflow(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(reflow_argv(args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _fit_popen(config: str, extra: list, cwd: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "flowmatch", "fit", "--config", str(REPO / "experiments" / config), *QUICK, *map(str, extra)]
    return subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, cwd: Path) -> Path:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return cwd / checkpoint_from_output(out)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("reflow")
    start = time.time()
    fit1 = run_cli(["fit", "--config", REPO / "experiments" / "toy2d_rf.yaml", *QUICK, "--trainer.max_steps", STEPS_1RF,
                    "--trainer.val_check_interval", STEPS_1RF, "--trainer.default_root_dir", "runs_1rf"], root, extra_env=ONE_THREAD)
    assert fit1.returncode == 0, fit1.stderr[-3000:]
    ckpt1 = root / checkpoint_from_output(fit1.stdout)
    times = {"fit 1-RF": time.time() - start}
    # the reflow command's own entry point, in this process (saves a process start-up; `python -m` runs the same main)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            rc = reflow_main(["--ckpt", str(ckpt1), "--num-pairs", str(NUM_PAIRS), "--out", "couplings/2rf", "--solver", "euler",
                              "--steps", "50", "--seed", "1", "--progress", "false"])
    finally:
        os.chdir(cwd)
    assert rc == 0
    times["reflow"] = time.time() - start - sum(times.values())
    couplings = root / "couplings" / "2rf"
    common = ["--data.init_args.path", couplings, "--model.init_args.init_weights", ckpt1, "--trainer.max_steps", STEPS_2RF,
              "--trainer.val_check_interval", STEPS_2RF]
    # the two students of the same couplings train side by side (one thread each)
    rf2 = _fit_popen("toy2d_reflow.yaml", [*common, "--trainer.default_root_dir", "runs_2rf"], root)
    distill = _fit_popen("toy2d_distill.yaml", [*common, "--trainer.default_root_dir", "runs_distill"], root)
    ckpt2, ckpt_distill = _finish(rf2, root), _finish(distill, root)
    times["fit 2-RF + distill"] = time.time() - start - sum(times.values())
    print("\n" + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return {"root": root, "ckpt1": ckpt1, "couplings": couplings, "reflow_stdout": out.getvalue(), "ckpt2": ckpt2, "ckpt_distill": ckpt_distill}


def _one_step_w2(model, ref: torch.Tensor) -> float:
    x, nfe = model.generate(ref.shape[0], SamplerConfig("euler", 1), seed=7)
    assert nfe == 1
    return wasserstein2_exact(x, ref)


def test_reflow_straightens_the_flow_and_one_step_sampling_improves(pipeline):
    rf1, rf2 = load_objective(pipeline["ckpt1"]), load_objective(pipeline["ckpt2"])
    s1, s2 = straightness(rf1, 1000, steps=100, seed=11), straightness(rf2, 1000, steps=100, seed=11)
    fresh, _ = sample_target("8gaussians", NUM_EVAL, seed=999)  # never seen by any of the models
    floor = wasserstein2_exact(sample_target("8gaussians", NUM_EVAL, seed=998)[0], fresh)  # two samples of the target: ~0.35
    w1, w2 = _one_step_w2(rf1, fresh), _one_step_w2(rf2, fresh)
    print(f"\nstraightness S: 1-RF {s1.straightness:.4f} (normalised {s1.normalized:.4f}, length ratio {s1.length_ratio:.4f}), "
          f"2-RF {s2.straightness:.5f} (normalised {s2.normalized:.5f}, length ratio {s2.length_ratio:.5f}); ratio {s1.straightness / s2.straightness:.0f}x")
    print(f"W2 at one Euler step: 1-RF {w1:.3f}, 2-RF {w2:.3f} ({w1 / w2:.1f}x better); target-vs-target floor {floor:.3f}")
    assert s1.straightness > 10 * s2.straightness  # measured ~100-400x at this budget
    assert w1 > 3 * w2  # measured ~5-6x
    assert w2 < 2.5 * floor
    # the paper's bound min_k S(Z^k) <= E||X_1 - X_0||^2 / K for K = 2, on these couplings
    pairs = read_couplings(pipeline["couplings"])
    bound = float(((torch.from_numpy(pairs["noise"]) - torch.from_numpy(pairs["sample"])) ** 2).sum(1).mean()) / 2
    assert min(s1.straightness, s2.straightness) <= bound


def test_distilled_student_samples_in_one_step(pipeline):
    student = load_objective(pipeline["ckpt_distill"])
    assert isinstance(student, FewStepDistillation) and student.student_steps == 1
    x, nfe = student.generate(NUM_EVAL, seed=7)  # the student's own single step by default
    assert nfe == 1 and x.shape == (NUM_EVAL, 2)
    fresh, _ = sample_target("8gaussians", NUM_EVAL, seed=999)
    w_student, w_teacher = wasserstein2_exact(x, fresh), _one_step_w2(load_objective(pipeline["ckpt1"]), fresh)
    print(f"\nW2 at one step: 1-RF {w_teacher:.3f}, 1-RF distilled {w_student:.3f} ({w_teacher / w_student:.1f}x better)")
    assert w_teacher > 3 * w_student


def test_manifest_records_where_the_pairs_came_from(pipeline):
    m = read_manifest(pipeline["couplings"])
    assert m["count"] == NUM_PAIRS and m["sampler"]["name"] == "euler50" and m["nfe"] == 50 and m["seed"] == 1
    assert m["source_checkpoint"] == str(pipeline["ckpt1"].resolve()) and m["objective"] == "RectifiedFlow"
    assert m["rectified"] == 2 and not m["conditional"] and m["guidance"] == 1.0
    assert (pipeline["couplings"] / m["shards"][0]["name"]).is_file() and "2-rectified" in pipeline["reflow_stdout"]
    # pairs drawn from the 2-RF checkpoint would train the 3-rectified flow
    assert _source_info(str(pipeline["ckpt2"]), load_objective(pipeline["ckpt2"]))["rectified"] == 3


def test_reflow_command_refuses_bad_input(pipeline, capsys):
    root, ckpt = pipeline["root"], pipeline["ckpt1"]
    reflow = lambda *args: reflow_main([str(a) for a in args])  # noqa: E731  (the command's own entry point, in-process)
    assert reflow("--ckpt", ckpt, "--num-pairs", 10, "--out", pipeline["couplings"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert reflow("--ckpt", root / "nope.ckpt", "--num-pairs", 10, "--out", root / "x") == 2
    assert "not found" in capsys.readouterr().err
    assert reflow("--ckpt", ckpt, "--num-pairs", 10, "--out", root / "y", "--labels", "uniform") == 2
    assert "class-conditional" in capsys.readouterr().err
    assert reflow("--ckpt", ckpt, "--num-pairs", 10, "--out", root / "z", "--solver", "rk4") == 2
    assert "unknown solver" in capsys.readouterr().err
    assert not any((root / name).exists() for name in ("x", "y", "z", "x.partial", "y.partial", "z.partial"))


def test_reflow_runs_as_a_command(pipeline):
    """`python -m flowmatch reflow` (or the module itself until the command is registered) in a fresh process."""
    root = pipeline["root"]
    proc = run_reflow(["--ckpt", pipeline["ckpt2"], "--num-pairs", 300, "--out", "couplings/3rf", "--solver", "heun", "--steps", 2,
                       "--shard-size", 128], root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_manifest(root / "couplings" / "3rf")
    assert m["count"] == 300 and len(m["shards"]) == 3 and m["sampler"]["name"] == "heun2" and m["nfe"] == 4 and m["rectified"] == 3
    assert "3-rectified" in proc.stdout
