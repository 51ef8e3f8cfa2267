"""Fixtures shared by several test files."""

import contextlib
import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_CONFIG = REPO / "configs/classifier/digits.yaml"
# a shorter run than the config's (which reaches ~99% test accuracy), logged to a real MLflow store
CLASSIFIER_SHORT = ["--trainer.max_epochs", "4", "--trainer.check_val_every_n_epoch", "4"]


# The quick tier, `python -m pytest -q -m "not slow"`, leaves out the tests that train or serve for tens of seconds
# (real fits in subprocesses, DeepSpeed / torchrun process groups, MLflow servers, studies); CI runs everything.
# module -> the slow tests in it (None: all of them). Chosen from `--durations=40` of the whole suite (docs/testing.md).
SLOW = {
    "test_tracking_outage": None, "test_team_tracking": None, "test_multinode": None, "test_lora_fit": None,
    "test_toy_experiments": None, "test_distributed_faults": None, "test_resume": None, "test_resume_extend": None,
    "test_main_job": None, "test_flux_cli": None, "test_mlflow_server": None, "test_study_latents": None,
    "test_deepspeed": None, "test_reflow": None, "test_bench_backbones": None,
    "test_compare": {"test_report_of_a_fit_its_test_and_seeded_variants"},
    "test_cli": {"test_fit_validate_sample_roundtrip_with_mlflow", "test_bad_config_exits_nonzero_and_names_the_key",
                 "test_bad_checkpoint_paths_are_reported"},
    "test_study": {"test_a_real_study_runs_resumes_and_is_written_up"},
    "test_study_comparison": {"test_a_study_keeps_a_diverged_fit_as_its_result"},
    "test_study_jobs": {"test_a_parallel_study_through_the_cli_with_mlflow"},  # three MLflow-writing processes: 19-27 s on 2 busy cores
    # a tiny MM-DiT fitted on prepared scenes, then every prompt through validate: ~17 s on 2 busy cores
    "test_scene_eval": {"test_the_callback_logs_every_category_and_sampler_in_0_1", "test_an_oracle_scores_one_and_noise_scores_zero"},
    "test_bench_gpu": {"test_gpu_studies_script_dry_run_prints_both_medium_plans"},  # two study processes: 12-55 s
    "test_import_sd3_cli": {"test_import_load_compare_and_finetune"},
    "test_bucket_stream": {"test_a_finished_fit_extended_equals_the_uninterrupted_fit", "test_fit_resumed_mid_pass_ends_at_the_same_weights",
                           "test_test_reports_every_bucket_and_the_judge_reads_real_pictures"},
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or serves for tens of seconds; left out of the quick tier (-m 'not slow')")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if module in SLOW and (SLOW[module] is None or item.originalname in SLOW[module]):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def trained_digit_classifier(tmp_path_factory):
    """The demo's feature network, trained once per session by ensure_feature_network, i.e. by
    `python -m flowmatch fit --config configs/classifier/digits.yaml` in a fresh process."""
    from flowmatch.metrics import ensure_feature_network

    workdir = tmp_path_factory.mktemp("classifier")
    target = workdir / "feature_networks" / "digits.ckpt"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)  # the run's mlflow.db and runs/ land here
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # one thread: on 2 shared cores two OpenMP threads make this small CNN several times slower
        mp.setenv("OMP_NUM_THREADS", "1")
        with contextlib.redirect_stdout(printed):
            path = ensure_feature_network(str(target), str(CLASSIFIER_CONFIG), overrides=CLASSIFIER_SHORT)
    return {"path": path, "target": target, "workdir": workdir, "printed": printed.getvalue()}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest single-threaded (and do not stall when other jobs share the cores).
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def main_job(tmp_path_factory, trained_digit_classifier):
    """The main job, tiny (helpers_main_job), fitted once per session in a fresh working directory."""
    from helpers_main_job import EXPERIMENT, SHORT, fit_in_fresh_directory

    return fit_in_fresh_directory(tmp_path_factory.mktemp("main_job"), trained_digit_classifier["path"], EXPERIMENT, SHORT)


@pytest.fixture(scope="session")
def main_job_tested(main_job):
    """`python -m flowmatch test` of the main job's checkpoint (three samplers), once per session: it logs into the fit's run."""
    from cli_utils import run_cli
    from helpers_main_job import EXPERIMENT, TEST_SAMPLERS, TINY

    work = main_job["work"]
    (work / "test_samplers.yaml").write_text(TEST_SAMPLERS)
    test = run_cli(["test", "--config", EXPERIMENT, "--config", "test_samplers.yaml", *TINY, "--ckpt_path", main_job["ckpt"],
                    "--trainer.enable_progress_bar", "false"], cwd=work, timeout=600, extra_env={"OMP_NUM_THREADS": "1"})
    assert test.returncode == 0, test.stderr[-4000:]
    return test
