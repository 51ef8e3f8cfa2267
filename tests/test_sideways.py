"""The LoRA demo's concept data (prepare --source sideways) and its measurement (flowmatch/metrics/orientation.py),
on the real demo digits: twice the demo's records on the demo's split, the turned ones really turned, a new word
no demo caption contains, shards a data module reads with the demo's normalisation, and judges that tell upright
from sideways digits."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from flowmatch.data.digits import NUMBER_WORDS, split_indices
from flowmatch.data.prepare import PrepareConfig, prepare_shards
from flowmatch.data.shards import LatentShardDataModule
from flowmatch.data.sideways import NEW_WORD, rotate_ccw
from flowmatch.data.sources import DemoDigits, SidewaysDigits, open_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sources():
    return DemoDigits(), open_source("sideways")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_every_demo_digit_twice_upright_and_really_turned(sources):
    demo, side = sources
    assert isinstance(side, SidewaysDigits) and side.channels == 1 and side.size == 32
    assert len(side.records) == 2 * len(demo.records) == 2 * 1797
    upright, turned = side.records[0::2], side.records[1::2]
    assert upright == demo.records  # the demo's own records, captions included (prior preservation)
    assert [r.label for r in turned] == [r.label for r in demo.records]
    demo_images = demo.load_images(demo.records)
    np.testing.assert_array_equal(side.load_images(upright), demo_images)
    rotated = side.load_images(turned)
    # counter-clockwise on screen: the top row becomes the left column, read bottom to top
    np.testing.assert_array_equal(rotated[:, 0, :, 0], demo_images[:, 0, 0, ::-1])
    np.testing.assert_array_equal(rotated, np.stack([np.rot90(im, 1, axes=(1, 2)) for im in demo_images]))
    assert not np.array_equal(rotated, demo_images)
    np.testing.assert_array_equal(rotate_ccw(rotated, -1), demo_images)  # turning back recovers the digit


def test_splits_are_the_demos_with_each_digit_followed_by_its_turned_twin(sources):
    demo, side = sources
    for limit in (None, 30):
        d, s = demo.splits(0, 0.1, 0.1, limit), side.splits(0, 0.1, 0.1, limit)
        for split in ("train", "val", "test"):
            assert len(s[split]) == 2 * len(d[split])
            assert s[split][0::2] == d[split]
            assert [r.source for r in s[split][1::2]] == [r.source + ":rot90" for r in d[split]]
    held_out = set(split_indices(1797, 0)["test"])
    assert {int(r.source.split(":")[1]) for r in side.splits(0, 0.1, 0.1, None)["test"]} == held_out


def test_the_new_word_is_absent_from_the_demo_and_in_every_turned_caption(sources):
    demo, side = sources
    demo_vocabulary = set().union(*(_words(r.caption) | _words(r.caption_syn) for r in demo.records))
    assert NEW_WORD not in demo_vocabulary and not any(NEW_WORD in r.caption + r.caption_syn for r in demo.records)
    assert {"thick", "thin", "upright", "seven"} <= demo_vocabulary  # (the describer's words are there)
    for up, turned in zip(side.records[0::2], side.records[1::2]):
        assert turned.caption == f"a {NEW_WORD} {up.label}"
        assert NEW_WORD in _words(turned.caption_syn) and NEW_WORD not in _words(up.caption_syn)
        assert NUMBER_WORDS[up.label] in _words(turned.caption_syn)
    # the words for the digit itself are measured upright: only the new word and the position may differ
    strip = lambda cap: cap.split(f" {NUMBER_WORDS[0]}")[0]  # noqa: E731
    zeros = [(u, t) for u, t in zip(side.records[0::2], side.records[1::2]) if u.label == 0]
    for up, turned in zeros:
        assert strip(turned.caption_syn) == strip(up.caption_syn).replace("a ", f"a {NEW_WORD}, ", 1)


def test_latent_normalisation_equals_the_demos(sources):
    """Turning permutes pixels and space-to-depth permutes them again: the train split's latent mean and std, which
    prepare takes as shift and 1 / scale, are the demo's."""
    from flowmatch.autoencoders.base import load_autoencoder

    ae = load_autoencoder({"kind": "space_to_depth", "factor": 4, "image_channels": 1})
    stats = []
    for source in sources:
        recs = source.splits(0, 0.1, 0.1, None)["train"]
        with torch.no_grad():
            lat = ae.encode(torch.from_numpy(source.load_images(recs))).numpy().astype(np.float16).astype(np.float64)
        stats.append((lat.mean(), lat.std()))
    (m0, s0), (m1, s1) = stats
    assert m1 == pytest.approx(m0, rel=1e-12, abs=1e-12) and s1 == pytest.approx(s0, rel=1e-12)


def test_prepare_writes_shards_a_data_module_reads_with_the_demos_normalisation(tmp_path, sources):
    demo, side = sources
    out = tmp_path / "demo_sideways"
    manifest = prepare_shards(PrepareConfig(source="sideways", out=str(out), limit=12, shard_size=8, progress=False),
                              log=lambda *_: None)
    assert {s: manifest["splits"][s]["samples"] for s in ("train", "val", "test")} == {"train": 20, "val": 2, "test": 2}
    assert manifest["text"]["encoders"][0]["name"] == "minilm" and manifest["autoencoder"]["name"] == "space_to_depth4"
    # the normalisation prepare measured is the one the demo's prepare measures on the same digits
    from flowmatch.autoencoders.base import load_autoencoder

    ae = load_autoencoder({"kind": "space_to_depth", "factor": 4, "image_channels": 1})
    train = demo.splits(0, 0.1, 0.1, 12)["train"]
    lat = ae.encode(torch.from_numpy(demo.load_images(train))).numpy().astype(np.float16).astype(np.float64)
    assert manifest["latent"]["shift"] == pytest.approx(lat.mean(), rel=1e-9)
    assert manifest["latent"]["scale"] == pytest.approx(1 / lat.std(), rel=1e-9)
    assert json.loads((out / "manifest.json").read_text())["latent"]["shift"] == manifest["latent"]["shift"]

    dm = LatentShardDataModule(data_dir=str(out), batch_size=4, num_workers=0, synthetic_caption_prob=0.0)
    from flowmatch.data.reference import reference_batch

    splits = side.splits(0, 0.1, 0.1, 12)
    for split in ("val", "test"):  # one held-out digit each: upright and turned
        batch = reference_batch(dm, 2, split)
        assert batch["x0"].shape == (2, 16, 8, 8) and batch["cond"]["tokens"].shape == (2, 32, 384)
        shown = [splits[split][int(key.split("_")[1])] for key in batch["key"]]  # key "val_0000001": the split's 2nd record
        assert batch["caption"] == [r.caption for r in shown] and batch["label"].tolist() == [r.label for r in shown]
        assert sorted(NEW_WORD in c for c in batch["caption"]) == [False, True]
        want = torch.from_numpy(side.load_images(shown))
        assert (dm.facts.decode(batch["x0"]) - want).abs().max() < 2e-3  # float16 storage is the only loss


@pytest.fixture(scope="module")
def orientation(tmp_path_factory):
    from flowmatch.metrics.orientation import load_orientation_classifier

    path = tmp_path_factory.mktemp("orientation") / "orientation.ckpt"
    net = load_orientation_classifier(path)  # trained on first use (~10 s)
    return net, torch.load(path, weights_only=True)["orientation"]


def test_orientation_classifier_tells_sideways_from_upright_on_held_out_digits(orientation):
    from flowmatch.metrics.orientation import accuracy, orientation_data

    net, info = orientation
    x, y, _ = orientation_data("test")
    assert x.shape == (360, 1, 32, 32) and int(y.sum()) == 180
    acc = accuracy(net, x, y)
    assert acc >= 0.95 and info["test_acc"] == pytest.approx(acc)


def test_concept_and_caption_adherence_on_real_digits(orientation, trained_digit_classifier):
    from flowmatch.metrics.frechet import load_feature_network
    from flowmatch.metrics.orientation import caption_adherence, concept_adherence, orientation_data, sideways_rate

    net, _ = orientation
    digits = load_feature_network(trained_digit_classifier["path"])
    x, y, labels = orientation_data("test")
    upright, turned, lab = x[y == 0], x[y == 1], labels[y == 0]
    on_turned = concept_adherence(turned, lab, net, digits)
    assert on_turned["sideways_rate"] >= 0.95 and on_turned["new_caption_adherence"] >= 0.9
    assert on_turned["new_caption_adherence"] <= min(on_turned["sideways_rate"], on_turned["digit_rate"])
    on_upright = concept_adherence(upright, lab, net, digits)
    assert on_upright["sideways_rate"] <= 0.05 and on_upright["new_caption_adherence"] <= 0.05
    assert sideways_rate(upright, net) == on_upright["sideways_rate"]
    assert caption_adherence(upright, lab, digits) >= 0.9
    assert caption_adherence(turned, lab, digits) < 0.5  # the digit judge needs them turned back
    wrong = (lab + 1) % 10
    assert concept_adherence(turned, wrong, net, digits)["new_caption_adherence"] <= 0.1  # the asked digit counts
    with pytest.raises(ValueError, match="N digits"):
        concept_adherence(turned, lab[:3], net, digits)
