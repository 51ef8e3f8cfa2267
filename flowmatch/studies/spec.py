"""Study files: a base experiment, its variants as config overrides, seeds and per-budget overrides.

A study is a small YAML file (``experiments/studies/<name>.yaml``)::

    description: SD3's formulation study on 8 gaussians
    experiment: studies                      # MLflow experiment of its runs
    base: ../toy2d_rf.yaml                   # the experiment every variant starts from (relative to this file)
    overrides:                               # config overrides of every variant (dotted keys, any YAML value)
      trainer.callbacks: ../../configs/callbacks/toy2d_sd3_steps.yaml
    variants:
      rf_uniform: {label: rf, overrides: {model.init_args.time_sampler: flowmatch.time_samplers.UniformTime}}
      eps_linear: {label: eps/linear, config: ../toy2d_eps.yaml}
      two_rf: {config: ../toy2d_reflow.yaml, couplings_from: one_rf, init_from: one_rf}   # a reflow step
      ae_d4: {config: ../../configs/autoencoder/ae_d4.yaml}                                 # an autoencoder fit
      gen_d4: {config: ../latent_mmdit_small.yaml, latents_from: ae_d4}                   # trained on its latents
    reflow: {num_pairs: 50000, solver: euler, steps: 100}        # options of `python -m flowmatch reflow`
    latents: {shard_size: 256}                                     # options of `python -m flowmatch prepare` (latents_from)
    budgets:
      small: {seeds: 3, overrides: {trainer.max_steps: 1500}, reflow: {num_pairs: 20000}}
      medium: {...}
      large: {...}
    report: {kind: ranking, ...}            # how flowmatch.studies.results writes the study's section

A plan is every (seed, variant) pair in that order (all variants of seed 0 first, so a study cut
short still ranks complete seeds), each a ``fit`` of the variant's config with the study's, the
variant's and the budget's overrides (later ones win) and ``seed_everything`` set to the seed.
A run's *fingerprint* hashes what the study file says about it and the text of the config files it
names directly, so that changing a variant's definition makes the study re-run it rather than count
an old run as done.

``latents_from: V`` names an autoencoder-fit variant listed earlier (its config's model is
flowmatch.autoencoders.conv.AutoencoderModule): the runner writes the demo's latent shards with V's final
model at the same seed (``python -m flowmatch prepare --source demo --autoencoder ...``, with the study's and
the budget's ``latents`` options, e.g. ``{limit: 300}``) and trains the variant on them (see flowmatch.studies.runner).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowmatch.metrics.directions import declared_direction

STUDIES_DIR = Path(__file__).resolve().parents[2] / "experiments" / "studies"
BUDGETS = ("small", "medium", "large")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
STUDY_KEYS = {"description", "experiment", "base", "overrides", "variants", "reflow", "latents", "budgets", "report"}
VARIANT_KEYS = {"label", "config", "overrides", "couplings_from", "init_from", "latents_from", "description"}
AUTOENCODER_MODULE = "flowmatch.autoencoders.conv.AutoencoderModule"  # what a latents_from variant must fit
BUDGET_KEYS = {"seeds", "overrides", "reflow", "latents"}
LATENTS_FIXED = ("out", "autoencoder")  # prepare options the runner sets itself (not allowed under `latents`)


class StudyError(ValueError):
    """A study that does not exist or does not make sense (the message names the file and key)."""


@dataclass
class Variant:
    name: str
    label: str
    config: str  # the experiment config, as written (relative to the study file)
    overrides: dict[str, Any]
    couplings_from: str | None = None  # draw reflow couplings from this variant's final model (same seed)
    init_from: str | None = None  # start from this variant's final weights (same seed)
    latents_from: str | None = None  # train on the demo's latents written by this autoencoder variant's final model (same seed)

    @property
    def depends_on(self) -> list[str]:
        """The variants whose finished run (at the same seed) this one needs, without repeats."""
        return list(dict.fromkeys(d for d in (self.couplings_from, self.init_from, self.latents_from) if d))


@dataclass
class Budget:
    name: str
    seeds: int
    overrides: dict[str, Any]
    reflow: dict[str, Any]
    latents: dict[str, Any] = field(default_factory=dict)


@dataclass
class Study:
    name: str
    path: Path
    description: str
    experiment: str
    variants: list[Variant]
    budgets: dict[str, Budget]
    overrides: dict[str, Any]
    reflow: dict[str, Any]
    report: dict[str, Any]
    latents: dict[str, Any] = field(default_factory=dict)  # options of `prepare` for the latents_from variants

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise StudyError(f"{self.path}: no variant {name!r}; variants: {', '.join(v.name for v in self.variants)}")

    def label(self, variant: str) -> str:
        """The variant's label for tables and plots (its name, for runs of a variant no longer in the file)."""
        return next((v.label for v in self.variants if v.name == variant), variant)

    def resolve(self, value: str) -> Path:
        """A path written in the study file (relative to it) as an absolute path."""
        return (self.path.parent / value).resolve()


@dataclass
class PlannedRun:
    """One fit of a study: a variant at a seed under a budget."""

    index: int  # 1-based position in the plan
    total: int
    study: Study
    variant: Variant
    seed: int
    budget: str
    overrides: dict[str, Any]  # study, variant and budget overrides merged (later win)
    reflow: dict[str, Any] = field(default_factory=dict)  # options of the reflow step (variants with couplings_from)
    latents: dict[str, Any] = field(default_factory=dict)  # options of the prepare step (variants with latents_from)

    @property
    def key(self) -> tuple[str, int]:
        return self.variant.name, self.seed

    @property
    def config_path(self) -> Path:
        return self.study.resolve(self.variant.config)

    @property
    def run_name(self) -> str:
        return f"{self.study.name}.{self.variant.name}.seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        """Hash of what the study file says about this run and of the text of the config files it names
        (the variant's config, YAML files given as override values; not the files those include)."""
        files = [self.variant.config] + [v for v in self.overrides.values() if isinstance(v, str) and v.endswith((".yaml", ".yml"))]
        texts = {f: self.study.resolve(f).read_text() for f in files if self.study.resolve(f).is_file()}
        spec = {"config": self.variant.config, "overrides": self.overrides, "couplings_from": self.variant.couplings_from,
                "init_from": self.variant.init_from, "reflow": self.reflow if self.variant.couplings_from else None, "files": texts}
        if self.variant.latents_from:  # only when set: the fingerprints of studies without it stay as they were
            spec["latents_from"], spec["latents"] = self.variant.latents_from, self.latents
        return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def tags(self) -> dict[str, str]:
        return {"study": self.study.name, "variant": self.variant.name, "seed": str(self.seed), "budget": self.budget,
                "study_fingerprint": self.fingerprint, "study_label": self.variant.label}

    def override_args(self) -> list[str]:
        """The overrides as `fit` command-line arguments (paths to YAML files made absolute)."""
        args = []
        for key, value in self.overrides.items():
            args += [f"--{key}", cli_value(value, self.study)]
        return args

    def describe(self) -> str:
        return f"[{self.index}/{self.total}] {self.study.name} {self.variant.name} seed {self.seed}"


def cli_value(value: Any, study: Study | None = None) -> str:
    """A YAML value as jsonargparse reads it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, str) and study is not None and value.endswith((".yaml", ".yml")) and study.resolve(value).is_file():
        return str(study.resolve(value))
    return str(value)


# --- loading ------------------------------------------------------------------------------------------------
def available_studies(directory: Path = STUDIES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def find_study(name: str, directory: Path = STUDIES_DIR) -> Path:
    """A study name (experiments/studies/NAME.yaml) or a path to a study file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate.resolve()
    path = Path(directory) / f"{name}.yaml"
    if not NAME.match(name) or not path.is_file():
        names = available_studies(directory)
        raise StudyError(f"unknown study {name!r}; the studies are: {', '.join(names) or 'none'} (files in {directory})")
    return path.resolve()


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _unknown(keys, allowed: set[str], where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise StudyError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def load_study(name: str, directory: Path = STUDIES_DIR) -> Study:
    path = find_study(name, directory)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise StudyError(f"{path}: not valid YAML ({err})") from None
    raw = _mapping(raw, str(path))
    _unknown(raw, STUDY_KEYS, str(path))
    study_name = path.stem
    base = raw.get("base")
    variants_raw = _mapping(raw.get("variants"), f"{path}: variants")
    if not variants_raw:
        raise StudyError(f"{path}: a study needs at least one variant (key 'variants')")
    variants: list[Variant] = []
    for vname, vraw in variants_raw.items():
        where = f"{path}: variants.{vname}"
        vraw = _mapping(vraw, where)
        _unknown(vraw, VARIANT_KEYS, where)
        if not NAME.match(str(vname)):
            raise StudyError(f"{where}: variant names may use letters, digits, '_', '.', '-'")
        config = vraw.get("config", base)
        if not config:
            raise StudyError(f"{where}: no config (give the study a 'base' or the variant a 'config')")
        if not (path.parent / config).is_file():
            raise StudyError(f"{where}: config {config!r} not found (looked for {(path.parent / config).resolve()})")
        earlier = [v.name for v in variants]
        for dep_key in ("couplings_from", "init_from", "latents_from"):
            dep = vraw.get(dep_key)
            if dep is not None and dep not in earlier:
                raise StudyError(f"{where}: {dep_key} {dep!r} must name a variant listed before it ({', '.join(earlier) or 'none'})")
        latents_from = vraw.get("latents_from")
        if latents_from is not None:
            if vraw.get("couplings_from") is not None:
                raise StudyError(f"{where}: latents_from and couplings_from both choose the training data; give one")
            source = variants[earlier.index(latents_from)]
            fits = _model_class(path.parent / source.config, source.overrides, path.parent)
            if fits is not None and fits.rsplit(".", 1)[-1] != AUTOENCODER_MODULE.rsplit(".", 1)[-1]:
                raise StudyError(f"{where}: latents_from {latents_from!r} must name an autoencoder fit (model {AUTOENCODER_MODULE}), "
                                 f"but variant {latents_from!r} fits {fits} (config {(path.parent / source.config).resolve()})")
        variants.append(Variant(name=str(vname), label=str(vraw.get("label", vname)), config=str(config),
                                overrides=_mapping(vraw.get("overrides"), f"{where}.overrides"),
                                couplings_from=vraw.get("couplings_from"), init_from=vraw.get("init_from"), latents_from=latents_from))
    budgets_raw = _mapping(raw.get("budgets"), f"{path}: budgets")
    if not budgets_raw:
        raise StudyError(f"{path}: a study needs 'budgets' (any of {', '.join(BUDGETS)})")
    budgets = {}
    for bname, braw in budgets_raw.items():
        where = f"{path}: budgets.{bname}"
        if bname not in BUDGETS:
            raise StudyError(f"{where}: unknown budget; budgets are {', '.join(BUDGETS)}")
        braw = _mapping(braw, where)
        _unknown(braw, BUDGET_KEYS, where)
        seeds = braw.get("seeds", 1)
        if not isinstance(seeds, int) or seeds < 1:
            raise StudyError(f"{where}.seeds: expected an integer >= 1, got {seeds!r}")
        budgets[bname] = Budget(bname, seeds, _mapping(braw.get("overrides"), f"{where}.overrides"), _mapping(braw.get("reflow"), f"{where}.reflow"),
                                _latents_options(braw.get("latents"), f"{where}.latents"))
    return Study(name=study_name, path=path, description=str(raw.get("description", "")).strip(),
                 experiment=str(raw.get("experiment", "studies")), variants=variants, budgets=budgets,
                 overrides=_mapping(raw.get("overrides"), f"{path}: overrides"), reflow=_mapping(raw.get("reflow"), f"{path}: reflow"),
                 report=_report_directions(_mapping(raw.get("report"), f"{path}: report"), path),
                 latents=_latents_options(raw.get("latents"), f"{path}: latents"))


def _report_directions(report: dict, path: Path) -> dict:
    """Each column's and metric claim's ``higher`` from the platform's direction table (flowmatch.metrics.directions):
    a study may repeat it, not contradict it."""
    for key in ("columns", "claims"):
        for i, item in enumerate(report.get(key) or []):
            if isinstance(item, dict) and item.get("metric"):
                try:
                    item["higher"] = declared_direction(str(item["metric"]), item.get("higher"), f"{path}: report.{key}[{i}]")
                except ValueError as err:
                    raise StudyError(str(err)) from None
    return report


def _latents_options(value: Any, where: str) -> dict[str, Any]:
    options = _mapping(value, where)
    fixed = sorted(set(options) & set(LATENTS_FIXED))
    if fixed:
        raise StudyError(f"{where}: {', '.join(fixed)} is set by the study runner (the latents folder, the autoencoder variant's final model)")
    return options


def _model_class(config: Path, overrides: dict[str, Any], study_dir: Path) -> str | None:
    """The model class a variant fits, as far as its config file and overrides say (None if they do not say)."""

    def of(model: Any, base: Path) -> str | None:
        if isinstance(model, str) and model.endswith((".yaml", ".yml")):
            try:
                model = yaml.safe_load((base / model).read_text())
            except (OSError, yaml.YAMLError):
                return None
        if isinstance(model, str):
            return model
        return model.get("class_path") if isinstance(model, dict) and isinstance(model.get("class_path"), str) else None

    for key in ("model.class_path", "model"):
        if key in overrides:
            return of(overrides[key], study_dir)
    try:
        raw = yaml.safe_load(Path(config).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return of(raw.get("model"), Path(config).parent) if isinstance(raw, dict) else None


def plan(study: Study, budget: str, seeds: int | None = None, variants: list[str] | None = None) -> list[PlannedRun]:
    """Every (seed, variant) fit of the study under the budget, seed-major, in the study file's variant order."""
    if budget not in study.budgets:
        known = [b for b in BUDGETS if b in study.budgets]
        raise StudyError(f"unknown budget {budget!r} for study {study.name}; its budgets are: {', '.join(known)}")
    b = study.budgets[budget]
    n_seeds = b.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise StudyError(f"--seeds must be >= 1, got {n_seeds}")
    chosen = study.variants
    if variants:
        for name in variants:
            study.variant(name)  # raises on an unknown name
        chosen = [v for v in study.variants if v.name in set(variants)]
    runs = []
    for seed in range(n_seeds):
        for v in chosen:
            merged = {**study.overrides, **v.overrides, **b.overrides}
            reflow = {**study.reflow, **b.reflow} if v.couplings_from else {}
            latents = {**study.latents, **b.latents} if v.latents_from else {}
            runs.append(PlannedRun(0, 0, study, v, seed, budget, merged, reflow, latents))
    for i, r in enumerate(runs, 1):
        r.index, r.total = i, len(runs)
    return runs
