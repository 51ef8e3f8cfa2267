"""Aspect-ratio buckets in prepare (issue 15): the bucket maths (flowmatch.data.buckets), the demo_buckets source
(flowmatch.data.placed_digits), and real tar shards whose manifest "buckets" entry agrees with what the tars hold;
a set without buckets is written exactly as before."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmatch.cli.prepare import main as prepare_main
from flowmatch.data.buckets import bucket_name, check_buckets, fit_to_bucket, is_small, make_buckets, nearest_bucket
from flowmatch.data.digits import split_indices
from flowmatch.data.placed_digits import CANVAS, DEFAULT_BUCKETS, PLACEMENTS, digit_crop, placement_of_caption, placement_of_image
from flowmatch.data.prepare import PrepareConfig, PrepareError, prepare_shards
from flowmatch.data.shard_format import SPLITS, SampleSpec, ShardFormatError, read_manifest, validate_manifest
from flowmatch.data.sources import PlacedDigits, open_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = {"text_encoders": [], "progress": False}


def _read_tars(out: Path, manifest: dict) -> dict[str, list[dict]]:
    """split -> its samples in shard order, each {"key", "latent", "meta", "caption_syn", "raw"}."""
    samples: dict[str, list[dict]] = {}
    for split in SPLITS:
        samples[split] = []
        for shard in manifest["splits"][split]["shards"]:
            members: dict[str, dict] = {}
            with tarfile.open(out / shard) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {"__key__": key, "__url__": shard})[ext] = tar.extractfile(m).read()
            for key, raw in members.items():
                samples[split].append({"key": key, "latent": np.load(io.BytesIO(raw["latent.npy"])), "meta": json.loads(raw["json"]),
                                       "caption_syn": raw["caption_syn.txt"].decode(), "raw": raw, "shard": shard})
    return samples


# --- the bucket maths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, multiple, max_ratio", [(1024, 8, 2.0), (65536, 16, 2.0), (1024 * 1024, 64, 2.0), (4096, 8, 3.0)])
def test_make_buckets_keeps_area_ratio_and_divisibility(target, multiple, max_ratio):
    buckets = make_buckets(target, multiple, max_ratio)
    assert buckets[0][0] == buckets[0][1] and len(set(buckets)) == len(buckets)  # the square first, no repeats
    for h, w in buckets:
        assert h % multiple == 0 and w % multiple == 0
        assert 0.7 * target <= h * w <= target
        assert max(h, w) / min(h, w) <= max_ratio
        assert (w, h) in buckets  # every wide bucket has its tall twin
    ratios = [round(abs(math.log(w / h)), 9) for h, w in buckets]
    assert ratios == sorted(ratios)
    assert check_buckets(buckets, multiple) == buckets


def test_the_demo_buckets_are_the_made_ones_and_nearest_bucket_goes_by_log_ratio():
    assert make_buckets(1024, 8) == DEFAULT_BUCKETS == [(32, 32), (24, 40), (40, 24)]
    assert [nearest_bucket(*CANVAS[s], DEFAULT_BUCKETS) for s in ("square", "wide", "tall")] == DEFAULT_BUCKETS
    assert nearest_bucket(10, 1000, DEFAULT_BUCKETS) == (24, 40) and nearest_bucket(1000, 10, DEFAULT_BUCKETS) == (40, 24)
    assert nearest_bucket(50, 50, [(32, 32), (64, 64), (48, 48)]) == (64, 64)  # equally near: the larger
    # 2:1 and 1:2 are equally far from 1:1 in log ratio: a square image between them takes the larger
    assert nearest_bucket(40, 40, [(16, 32), (48, 24)]) == (48, 24)
    assert bucket_name((24, 40)) == "24x40"
    assert is_small(20, 20, DEFAULT_BUCKETS) and not is_small(30, 30, DEFAULT_BUCKETS) and not is_small(20, 100, DEFAULT_BUCKETS)


@pytest.mark.parametrize("size, bucket", [((36, 36), (32, 32)), ((28, 48), (24, 40)), ((48, 28), (40, 24)), ((100, 60), (40, 24)),
                                          ((16, 16), (32, 32)), ((24, 40), (24, 40))])
def test_fit_to_bucket_gives_the_bucket_and_keeps_a_centred_feature_centred(size, bucket):
    h, w = size
    image = -np.ones((3, h, w), np.float32)
    r = max(2, min(h, w) // 6)
    image[:, h // 2 - r : h // 2 + r, w // 2 - r : w // 2 + r] = 1.0  # a bright square in the middle
    out = fit_to_bucket(image, bucket)
    assert out.shape == (3, *bucket) and out.dtype == np.float32 and out.min() >= -1 and out.max() <= 1
    ink = (out[0] + 1) / 2
    cy, cx = (ink.sum(1) * np.arange(bucket[0])).sum() / ink.sum(), (ink.sum(0) * np.arange(bucket[1])).sum() / ink.sum()
    assert abs(cy - (bucket[0] - 1) / 2) <= 0.6 and abs(cx - (bucket[1] - 1) / 2) <= 0.6
    if size == bucket:
        np.testing.assert_array_equal(out, image)


def test_bad_buckets_are_refused_naming_the_bucket_and_the_multiple(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        check_buckets([], 8)
    with pytest.raises(ValueError, match=r"bucket 32x30: .*multiples of 8"):
        check_buckets([[32, 32], [32, 30]], 8)
    with pytest.raises(ValueError, match="24x40 is listed twice"):
        check_buckets([[24, 40], [24, 40]], 8)
    with pytest.raises(PrepareError, match=r"bucket 36x36: .*multiples of 8"):
        prepare_shards(PrepareConfig(source="demo", out=str(tmp_path / "a"), buckets=[[36, 36]], limit=9, **QUIET), log=lambda *_: None)
    with pytest.raises(PrepareError, match="not both"):
        prepare_shards(PrepareConfig(source="demo", out=str(tmp_path / "b"), buckets=[[32, 32]], bucket_pixels=1024, limit=9, **QUIET))
    with pytest.raises(PrepareError, match="small_images"):
        prepare_shards(PrepareConfig(source="demo_buckets", out=str(tmp_path / "c"), small_images="stretch", limit=9, **QUIET))
    assert prepare_main(["--source", "demo_buckets", "--out", str(tmp_path / "d"), "--buckets", "[[32,32],[24,36]]", "--limit", "9",
                         "--text_encoders", "[]", "--progress", "false"]) == 2


# --- the demo_buckets source ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def placed():
    return open_source("demo_buckets")


def test_demo_buckets_source_places_each_digit_once_on_three_shapes(placed):
    assert isinstance(placed, PlacedDigits) and placed.buckets == DEFAULT_BUCKETS and placed.channels == 1
    assert len(placed.records) == 1797 and [r.label for r in placed.records] == [r.label for r in open_source("demo").records]
    assert [r.caption_syn for r in PlacedDigits().records] == [r.caption_syn for r in placed.records]  # deterministic
    placements = [r.source.rsplit(":", 1)[1] for r in placed.records]
    shapes = Counter(PLACEMENTS[p][1] for p in placements)
    assert all(abs(n / 1797 - 1 / 3) < 0.05 for n in shapes.values()) and set(Counter(placements)) == set(PLACEMENTS)
    assert [placement_of_caption(r.caption_syn) for r in placed.records] == placements
    assert {r.caption for r in placed.records[:20]} <= {f"a {d}" for d in range(10)} | {"an 8"}
    assert len({r.caption_syn.replace(str(r.label), "#") for r in placed.records}) > 10  # several templates
    # the demo's split: the held-out digits are the demo's
    held_out = {int(r.source.split(":")[1]) for r in placed.splits(0, 0.1, 0.1, None)["test"]}
    assert held_out == set(split_indices(1797, 0)["test"].tolist())
    images = placed.load_native(placed.records[:60])
    assert [im.shape[1:] for im in images] == [CANVAS[PLACEMENTS[p][1]] for p in placements[:60]]
    assert [placed.image_size(r) for r in placed.records[:60]] == [im.shape[1:] for im in images]
    fitted = [fit_to_bucket(im, nearest_bucket(*im.shape[1:], DEFAULT_BUCKETS)) for im in images]
    for group in (images, fitted):  # the ink sits where the caption says, before and after fitting to the bucket
        assert [placement_of_image(torch.from_numpy(im)[None])[0] for im in group] == placements[:60]


def test_digit_crop_cuts_the_captioned_square_at_32(placed):
    with pytest.raises(ValueError, match="no placement"):
        placement_of_caption("a 3")
    with pytest.raises(ValueError, match="more than one"):
        placement_of_caption("a 3 on the left at the top")
    assert placement_of_caption("an upright 7 in the centre") == "centre"  # "upright" is not "right"
    wide = torch.full((2, 1, 24, 40), -1.0)
    wide[0, :, :, :24] = torch.linspace(-1, 1, 24)  # a digit-sized pattern on the left; a 24-pixel one on the right
    wide[1, :, :, 16:] = torch.linspace(-1, 1, 24)
    crops = digit_crop(wide, ["left", "right"])
    assert crops.shape == (2, 1, 32, 32)
    torch.testing.assert_close(crops[0], crops[1])
    tall = torch.rand(3, 1, 40, 24) * 2 - 1
    assert digit_crop(tall, ["top", "bottom", "centre"]).shape == (3, 1, 32, 32)
    torch.testing.assert_close(digit_crop(torch.zeros(1, 1, 32, 32) + 0.5, ["centre"]), torch.zeros(1, 1, 32, 32) + 0.5)
    with pytest.raises(ValueError, match="placement"):
        digit_crop(wide, ["left", "middle"])


# --- prepare with buckets, for real -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_buckets_set(tmp_path_factory):
    """`prepare --source demo_buckets --limit 90`: the source's own buckets, no other bucket flag."""
    out = tmp_path_factory.mktemp("demo_buckets")
    assert prepare_main(["--source", "demo_buckets", "--out", str(out), "--limit", "90", "--shard_size", "16",
                         "--text_encoders", "[]", "--progress", "false"]) == 0
    manifest, _ = read_manifest(str(out))
    return out, manifest


def test_demo_buckets_manifest_agrees_with_the_tars(demo_buckets_set):
    out, manifest = demo_buckets_set
    b = manifest["buckets"]
    assert b["names"] == ["32x32", "24x40", "40x24"] and b["sizes"] == [[32, 32], [24, 40], [40, 24]]
    assert b["latent_sizes"] == [[8, 8], [6, 10], [10, 6]] and b["target_pixels"] is None
    assert b["small_images"] == "skip" and b["skipped_small"] == {"train": 0, "val": 0, "test": 0}
    train = b["counts"]["train"]
    most = train.index(max(train))
    assert manifest["latent"]["shape"] == [16, *b["latent_sizes"][most]] and manifest["image"]["size"] == b["sizes"][most]
    samples = _read_tars(out, manifest)
    spec = SampleSpec(manifest)
    shapes = {name: (16, *ls) for name, ls in zip(b["names"], b["latent_sizes"])}
    for split in SPLITS:
        got = samples[split]
        assert len(got) == manifest["splits"][split]["samples"] == sum(b["counts"][split])
        assert [s["key"] for s in got] == [f"{split}_{i:07d}" for i in range(len(got))]
        assert [s["meta"]["index"] for s in got] == list(range(len(got)))
        order = [b["names"].index(s["meta"]["bucket"]) for s in got]
        assert np.bincount(order, minlength=3).tolist() == b["counts"][split]
        for s in got:
            assert s["latent"].shape == shapes[s["meta"]["bucket"]] and s["meta"]["size"] == b["sizes"][b["names"].index(s["meta"]["bucket"])]
            assert PLACEMENTS[placement_of_caption(s["caption_syn"])][1] == {"32x32": "square", "24x40": "wide", "40x24": "tall"}[s["meta"]["bucket"]]
            assert spec.decode(s["raw"])["latent"].shape == s["latent"].shape
        if split != "train":
            assert order == sorted(order)  # each bucket's samples are consecutive
    assert any(len({s["meta"]["bucket"] for s in samples["train"] if s["shard"] == sh}) > 1 for sh in manifest["splits"]["train"]["shards"])
    # the normalisation is measured on the train latents of every shape together
    lat = np.concatenate([s["latent"].astype(np.float64).ravel() for s in samples["train"]])
    assert manifest["latent"]["shift"] == pytest.approx(lat.mean(), abs=1e-6)
    assert manifest["latent"]["scale"] == pytest.approx(1 / lat.std(), rel=1e-5)


def test_bucketed_sets_are_checked_and_resume(demo_buckets_set, tmp_path):
    out, manifest = demo_buckets_set
    spec = SampleSpec(manifest)
    raw = dict(_read_tars(out, manifest)["val"][0]["raw"])
    raw["latent.npy"] = _npy(np.zeros((16, 6, 10), np.float16)) if json.loads(raw["json"])["bucket"] != "24x40" else _npy(np.zeros((16, 8, 8), np.float16))
    with pytest.raises(ShardFormatError, match="differs from bucket"):
        spec.decode(raw)
    raw["latent.npy"] = _npy(np.zeros((16, 4, 4), np.float16))
    with pytest.raises(ShardFormatError, match="4, 4"):
        spec.decode(raw)
    bad = json.loads(json.dumps(manifest))
    bad["buckets"]["counts"]["val"][0] += 1
    with pytest.raises(ShardFormatError, match="buckets.counts.val sums to"):
        validate_manifest(bad, "m.json")
    bad["buckets"]["latent_sizes"].pop()
    with pytest.raises(ShardFormatError, match="one length"):
        validate_manifest(bad, "m.json")
    # resume: a re-run with the same settings writes nothing; other bucket settings are refused
    cfg = PrepareConfig(source="demo_buckets", out=str(out), limit=90, shard_size=16, **QUIET)
    assert prepare_shards(cfg, log=lambda *_: None)["summary"]["written"] == {"train": 0, "val": 0, "test": 0}
    with pytest.raises(PrepareError, match="buckets"):
        prepare_shards(PrepareConfig(source="demo_buckets", out=str(out), limit=90, shard_size=16, buckets=[[32, 32], [24, 40]], **QUIET))
    part = tmp_path / "part"  # an interrupted run (a finished shard lost) redoes only that shard
    first = prepare_shards(PrepareConfig(source="demo_buckets", out=str(part), limit=40, shard_size=8, buckets=[[32, 32], [24, 40]], **QUIET),
                           log=lambda *_: None)
    assert first["buckets"]["counts"]["train"][1] > 0 and first["settings"]["buckets"] == [[32, 32], [24, 40]]
    (part / "train-000001.tar").unlink()
    again = prepare_shards(PrepareConfig(source="demo_buckets", out=str(part), limit=40, shard_size=8, buckets=[[32, 32], [24, 40]], **QUIET),
                           log=lambda *_: None)
    assert again["summary"]["written"] == {"train": 8, "val": 0, "test": 0}
    assert {k: v for k, v in again.items() if k not in ("summary", "created")} == {k: v for k, v in first.items() if k not in ("summary", "created")}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_a_set_without_buckets_is_written_as_before(tmp_path):
    out = tmp_path / "demo"
    manifest = prepare_shards(PrepareConfig(source="demo", out=str(out), limit=12, shard_size=8, **QUIET), log=lambda *_: None)
    assert "buckets" not in manifest and manifest["latent"]["shape"] == [16, 8, 8] and manifest["image"]["size"] == [32, 32]
    assert not any(k.startswith("bucket") or k == "small_images" for k in manifest["settings"])
    samples = _read_tars(out, manifest)
    assert all("bucket" not in s["meta"] and s["meta"]["size"] == [32, 32] for split in SPLITS for s in samples[split])
    raw = dict(samples["train"][0]["raw"], **{"latent.npy": _npy(np.zeros((16, 6, 10), np.float16))})
    with pytest.raises(ShardFormatError, match="differs from the manifest's"):
        SampleSpec(manifest).decode(raw)


# --- an image folder of several sizes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """PNGs of four shapes: wide 64x96, tall 96x64, square 80x80 (each expected in its bucket) and a tiny 8x8 one."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    expect = {}
    for shape, (h, w), bucket in (("wide", (64, 96), "32x48"), ("tall", (96, 64), "48x32"), ("square", (80, 80), "32x32"), ("tiny", (8, 8), None)):
        for i in range(4 if shape != "tiny" else 1):
            path = root / f"{shape}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            expect[str(path.resolve())] = bucket
    return root, expect


@pytest.mark.parametrize("small_images", ["skip", "upscale"])
def test_an_image_folder_of_several_sizes_lands_in_its_buckets(folder, tmp_path, small_images):
    root, expect = folder
    lines = []
    cfg = PrepareConfig(source=str(root), out=str(tmp_path / "set"), buckets=[[32, 32], [32, 48], [48, 32]], small_images=small_images,
                        shard_size=4, **QUIET)
    manifest = prepare_shards(cfg, log=lines.append)
    samples = _read_tars(tmp_path / "set", manifest)
    got = {s["meta"]["source"]: s["meta"]["bucket"] for split in SPLITS for s in samples[split]}
    for s in (s for split in SPLITS for s in samples[split]):
        assert s["latent"].shape == (48, *[v // 4 for v in s["meta"]["size"]])  # 3 channels x 4 x 4
    tiny = next(p for p in expect if expect[p] is None)
    skipped = sum(manifest["buckets"]["skipped_small"].values())
    if small_images == "skip":
        assert skipped == 1 and tiny not in got
        assert any("skipped 1 images smaller than every bucket" in line and "tiny_0.png (8x8)" in line for line in lines)
    else:
        assert skipped == 0 and got.pop(tiny) == "32x32" and manifest["summary"]["upscaled_small"] == 1
    assert got == {p: b for p, b in expect.items() if b is not None}
    assert manifest["buckets"]["small_images"] == small_images
    assert sum(sum(c) for c in manifest["buckets"]["counts"].values()) == 12 + (small_images == "upscale")
