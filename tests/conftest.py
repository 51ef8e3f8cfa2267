"""Fixtures shared by several test files."""

import contextlib
import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER_CONFIG = REPO / "configs/classifier/digits.yaml"
# a shorter run than the config's (which reaches ~99% test accuracy), logged to a real MLflow store
CLASSIFIER_SHORT = ["--trainer.max_epochs", "4", "--trainer.check_val_every_n_epoch", "4"]


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
