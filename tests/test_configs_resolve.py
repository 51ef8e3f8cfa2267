"""Every YAML in experiments/ and configs/ resolves through the CLI's own parser (`fit --print_config`).

Run configs (experiments/*.yaml, configs/autoencoder/, configs/classifier/) are parsed as they are;
a component (a network, objective, data module, trainer or callback list) is parsed inside a base
experiment the way the README tells users to compose it. Study files (experiments/studies/) are not
LightningCLI configs: every fit their plan would run is parsed with the study's own overrides.
Parsing only: nothing is built, nothing trains. The store MLflow writes to comes from
MLFLOW_TRACKING_URI (default sqlite:///mlflow.db), never from an experiment file.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml


REPO = Path(__file__).resolve().parents[1]
TOY = "experiments/toy2d_rf.yaml"
DIGITS = "experiments/mmdit_d16.yaml"


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _yaml_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.yaml"))


def _base_for(path: Path) -> str:
    """The experiment a component is composed into: the 2-D one for toy parts, the main job otherwise."""
    return TOY if "toy" in path.stem else DIGITS


def _compose(path: Path) -> list[str]:
    """`fit` arguments that use ``path`` the way a user would."""
    rel, parts = _rel(path), path.relative_to(REPO).parts
    if parts[0] == "experiments" or parts[1] in ("autoencoder", "classifier"):
        return ["--config", rel]
    kind = parts[1]
    base = _base_for(path)
    if kind == "model":
        return ["--config", base, "--model.init_args.network", rel]
    if kind == "objective":
        return ["--config", TOY, "--model", rel]
    if kind == "data":
        return ["--config", base, "--data", rel]
    if kind == "trainer":
        return ["--config", DIGITS, "--trainer", rel]
    if kind == "callbacks":
        return ["--config", base, "--trainer.callbacks", rel]
    raise AssertionError(f"{rel}: no rule says how to compose configs/{kind}/ into a run; add one to this test")


@pytest.fixture(scope="module")
def print_config(monkeypatch_module):
    """print_config(args) -> the resolved config (a dict), parsed in this process by the CLI's own parser."""
    from flowmatch.cli.lightning_cli import FlowCLI

    def _print(args: list[str]) -> dict:
        out, err = io.StringIO(), io.StringIO()
        code = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                FlowCLI(args=["fit", *args, "--print_config"])
            except SystemExit as stop:
                code = stop.code
        assert code in (0, None), f"fit {' '.join(args)} --print_config failed:\n{err.getvalue()[-3000:]}"
        text = out.getvalue()  # DeepSpeed may log a line before the config: the config starts at its header
        return yaml.safe_load(text[text.index("# lightning.pytorch"):])

    return _print


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the configs' relative paths are written for the repository root
        mp.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield mp


RUN_AND_COMPONENT_CONFIGS = [p for p in _yaml_files("experiments", "configs") if "studies" not in p.parts]


@pytest.mark.parametrize("path", RUN_AND_COMPONENT_CONFIGS, ids=_rel)
def test_config_resolves(print_config, path):
    resolved = print_config(_compose(path))
    assert resolved["model"]["class_path"], path
    own = yaml.safe_load(path.read_text())
    kind = path.relative_to(REPO).parts[1]
    # the component really is in the resolved run (not silently dropped)
    if kind == "model":
        assert resolved["model"]["init_args"]["network"]["class_path"] == own["class_path"]
    elif kind == "objective":
        assert resolved["model"]["class_path"] == own["class_path"]
        assert resolved["model"]["init_args"]["network"]["class_path"], "the base experiment's network was lost"
    elif kind == "data":
        assert resolved["data"]["class_path"] == own["class_path"]
    elif kind == "callbacks":
        assert [c["class_path"] for c in resolved["trainer"]["callbacks"]] == [c["class_path"] for c in own]
    elif kind == "trainer":
        assert all(resolved["trainer"][k] == v for k, v in own.items() if not isinstance(v, dict)), path


def _study_fits() -> list:
    from flowmatch.studies.spec import STUDIES_DIR, available_studies, load_study, plan

    fits = {}
    for name in available_studies(STUDIES_DIR):
        study = load_study(name, STUDIES_DIR)
        first, *others = list(study.budgets)
        # every variant at the first budget; the other budgets (which change steps and sizes) with one variant
        runs = plan(study, first, seeds=1) + [plan(study, budget, seeds=1)[0] for budget in others]
        for run in runs:
            args = ["--config", str(run.config_path), *run.override_args()]
            fits.setdefault(tuple(args), f"{name}/{run.budget}/{run.variant.name}")
    return [pytest.param(list(args), id=label) for args, label in fits.items()]


@pytest.mark.parametrize("args", _study_fits())
def test_every_fit_of_every_study_resolves(print_config, args):
    assert print_config(args)["trainer"]["max_steps"] > 0


def test_no_config_hard_codes_the_tracking_store():
    offenders = [_rel(p) for p in _yaml_files("experiments", "configs") if "tracking_uri" in p.read_text()]
    assert not offenders, f"these set tracking_uri; the store must come from MLFLOW_TRACKING_URI: {offenders}"


def test_mlflow_tracking_uri_chooses_the_store(print_config, tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert print_config(["--config", str(REPO / TOY)])["trainer"]["logger"]["init_args"]["tracking_uri"] == store
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert print_config(["--config", str(REPO / TOY)])["trainer"]["logger"]["init_args"]["tracking_uri"] == "sqlite:///mlflow.db"
