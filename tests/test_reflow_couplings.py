"""Coupling shards: bitwise round trip, generation from a model, atomic and resumable runs, the data module."""

import tarfile

import numpy as np
import pytest
import torch

from flowmatch.cli.reflow import _labels, _labels_from_data
from flowmatch.data.toy2d import Toy2DDataModule
from flowmatch.networks.mlp import MLPVelocity
from flowmatch.objectives import RectifiedFlow
from flowmatch.reflow import (
    CouplingDataModule,
    CouplingFormatError,
    CouplingRecord,
    CouplingRunError,
    generate_couplings,
    read_couplings,
    read_manifest,
    write_shard,
)
from flowmatch.reflow.format import shard_name, write_manifest
from flowmatch.sampling import SamplerConfig

torch.set_num_threads(1)


def _model(num_classes: int = 0, seed: int = 0) -> RectifiedFlow:
    torch.manual_seed(seed)
    net = MLPVelocity(2, 32, 2, 16, num_classes=num_classes)
    torch.nn.init.normal_(net.out.weight, std=0.3)  # not the zero field of a fresh network
    return RectifiedFlow(net, sample_shape=[2]).eval()


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def test_shards_round_trip_bitwise(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1000, 3, 2)).astype(np.float32)
    sample = rng.standard_normal((1000, 3, 2)).astype(np.float32)
    sample.reshape(-1)[:6] = [np.nan, np.inf, -np.inf, -0.0, np.float32(1e-45), np.finfo(np.float32).max]  # awkward values survive too
    cond = rng.integers(0, 10, 1000)
    shards, first = [], 0
    for k, size in enumerate((400, 400, 200)):
        recs = [CouplingRecord(i, noise[i : i + 64][: first + size - i], sample[i : i + 64][: first + size - i], cond[i : i + 64][: first + size - i])
                for i in range(first, first + size, 64)]
        shards.append({"name": shard_name(k), "count": write_shard(tmp_path / shard_name(k), recs)})
        first += size
    write_manifest(tmp_path, {"count": 1000, "noise_shape": [3, 2], "sample_shape": [3, 2], "conditional": True, "shards": shards})
    back = read_couplings(tmp_path)
    for key, ref in (("noise", noise), ("sample", sample), ("cond", cond)):
        assert back[key].dtype == (np.int64 if key == "cond" else np.float32)
        assert np.array_equal(_bits(back[key]), _bits(ref.astype(back[key].dtype))), key
    # keys carry no dots; members are KEY.noise.npy / KEY.sample.npy / KEY.cond.npy
    names = tarfile.open(tmp_path / shard_name(0)).getnames()
    assert names[:3] == ["pairs_0000000000.cond.npy", "pairs_0000000000.noise.npy", "pairs_0000000000.sample.npy"]


def test_reader_names_the_broken_part(tmp_path):
    recs = [CouplingRecord(0, np.zeros((4, 2), np.float32), np.zeros((4, 2), np.float32))]
    write_shard(tmp_path / shard_name(0), recs)
    write_shard(tmp_path / shard_name(1), recs)  # indices restart at 0: a repeated shard
    write_manifest(tmp_path, {"count": 8, "noise_shape": [2], "sample_shape": [2], "conditional": False,
                              "shards": [{"name": shard_name(0), "count": 4}, {"name": shard_name(1), "count": 4}]})
    with pytest.raises(CouplingFormatError, match="couplings-000001.tar.*pair 4 was expected"):
        read_couplings(tmp_path)
    (tmp_path / shard_name(1)).write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(CouplingFormatError, match="couplings-000001.tar"):
        read_couplings(tmp_path)
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(CouplingFormatError, match="missing"):
        read_couplings(tmp_path)
    with pytest.raises(CouplingFormatError, match="no coupling manifest"):
        read_manifest(tmp_path / "nowhere")


def test_generated_couplings_are_the_models_own_samples(tmp_path):
    model = _model()
    sampler = SamplerConfig("euler", 4)
    m = generate_couplings(model, tmp_path / "c", 700, sampler, seed=3, batch_size=128, shard_size=300, record_size=50, progress=False)
    assert m["count"] == 700 and [s["count"] for s in m["shards"]] == [300, 300, 100]
    assert m["nfe"] == 4 and m["sampler"]["name"] == "euler4" and not m["conditional"] and m["seed"] == 3
    assert not (tmp_path / "c.partial").exists()
    pairs = read_couplings(tmp_path / "c")
    assert pairs["cond"] is None
    # every pair is (eps, the model's own Euler-4 sample from eps); the noise is standard normal
    x, _ = model.generate(700, sampler, noise=torch.from_numpy(pairs["noise"]))
    assert torch.allclose(x, torch.from_numpy(pairs["sample"]), atol=1e-6)
    assert abs(pairs["noise"].mean()) < 0.1 and abs(pairs["noise"].std() - 1) < 0.1
    # the batch size does not change what a fixed-step solver writes: byte-identical shards
    generate_couplings(model, tmp_path / "d", 700, sampler, seed=3, batch_size=77, shard_size=300, record_size=50, progress=False)
    for k in range(3):
        assert (tmp_path / "c" / shard_name(k)).read_bytes() == (tmp_path / "d" / shard_name(k)).read_bytes()


class _Interrupt:
    """The model, but ``generate`` raises KeyboardInterrupt after ``calls`` calls (a run killed part-way)."""

    def __init__(self, model, calls):
        self.model, self.calls = model, calls

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, *args, **kwargs):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.model.generate(*args, **kwargs)


def test_interrupted_run_resumes_to_the_same_shards(tmp_path):
    model, sampler = _model(), SamplerConfig("euler", 3)
    kw = dict(seed=1, batch_size=100, shard_size=200, record_size=64, progress=False)
    generate_couplings(model, tmp_path / "ref", 1000, sampler, **kw)
    with pytest.raises(KeyboardInterrupt):
        generate_couplings(_Interrupt(model, 5), tmp_path / "out", 1000, sampler, **kw)  # dies in the third shard
    assert not (tmp_path / "out").exists()
    partial = tmp_path / "out.partial"
    assert sorted(p.name for p in partial.glob("*.tar")) == [shard_name(0), shard_name(1)]
    with pytest.raises(CouplingRunError, match="other settings"):
        generate_couplings(model, tmp_path / "out", 1000, sampler, **{**kw, "seed": 2})
    counting = _Interrupt(model, 10**9)
    generate_couplings(counting, tmp_path / "out", 1000, sampler, **kw)
    assert 10**9 - counting.calls == 6  # only shards 2, 3, 4 were generated (2 batches each)
    assert not partial.exists()
    for k in range(5):
        assert (tmp_path / "out" / shard_name(k)).read_bytes() == (tmp_path / "ref" / shard_name(k)).read_bytes()
    with pytest.raises(CouplingRunError, match="already exists"):
        generate_couplings(model, tmp_path / "out", 1000, sampler, **kw)
    m = generate_couplings(model, tmp_path / "out", 300, sampler, **kw, overwrite=True)
    assert read_manifest(tmp_path / "out")["count"] == 300 == m["count"]
    assert not (tmp_path / "out" / shard_name(2)).exists()


def test_conditional_couplings_record_labels_and_guidance(tmp_path):
    model = _model(num_classes=4)
    m = generate_couplings(model, tmp_path / "u", 2000, SamplerConfig("euler", 2, guidance=2.0), labels="auto", progress=False)
    assert m["conditional"] and m["labels"] == "uniform" and m["num_classes"] == 4 and m["guidance"] == 2.0
    pairs = read_couplings(tmp_path / "u")
    counts = np.bincount(pairs["cond"], minlength=4)
    assert counts.sum() == 2000 and counts.min() > 400
    noise, cond = torch.from_numpy(pairs["noise"][:50]), torch.from_numpy(pairs["cond"][:50])
    x, _ = model.generate(50, SamplerConfig("euler", 2, guidance=2.0), cond=cond, noise=noise)  # guided, with the stored labels
    assert torch.allclose(x, torch.from_numpy(pairs["sample"][:50]), atol=1e-6)
    generate_couplings(model, tmp_path / "l", 10, SamplerConfig("euler", 2), labels=[1, 3], progress=False)
    assert read_couplings(tmp_path / "l")["cond"].tolist() == [1, 3] * 5
    generate_couplings(model, tmp_path / "a", 6, SamplerConfig("euler", 2), labels=np.array([0, 0, 2, 2, 1, 3]), progress=False)
    assert read_couplings(tmp_path / "a")["cond"].tolist() == [0, 0, 2, 2, 1, 3]
    with pytest.raises(ValueError, match="out of range"):
        generate_couplings(model, tmp_path / "bad", 10, labels=[4], progress=False)
    with pytest.raises(ValueError, match="not class-conditional|no classes"):
        generate_couplings(_model(), tmp_path / "bad", 10, labels="uniform", progress=False)
    dm = CouplingDataModule(str(tmp_path / "u"), batch_size=64, num_val=500)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert dm.conditional and dm.num_classes == 4 and batch["cond"].dtype == torch.int64 and batch["cond"].shape == (64,)


def test_label_options_of_the_command(tmp_path):
    assert _labels("uniform", None, 5) == "uniform" and _labels("[0, 3]", None, 5) == [0, 3]
    with pytest.raises(ValueError, match="expected auto"):
        _labels("sometimes", None, 5)
    config = tmp_path / "data.yaml"
    config.write_text("class_path: flowmatch.data.toy2d.Toy2DDataModule\ninit_args: {target: moons, num_train: 300, batch_size: 128, conditional: true}\n")
    labels = _labels_from_data(str(config), 500)  # more than the data holds: cycled
    assert labels.shape == (500,) and set(labels.tolist()) == {0, 1}
    assert np.array_equal(labels[300:], labels[:200])
    config.write_text("class_path: flowmatch.data.toy2d.Toy2DDataModule\ninit_args: {num_train: 300}\n")
    with pytest.raises(ValueError, match="no 'cond' labels"):
        _labels_from_data(str(config), 10)


def test_data_module_splits_batches_and_references(tmp_path):
    model = _model()
    generate_couplings(model, tmp_path / "c", 3000, SamplerConfig("euler", 2), shard_size=1000, record_size=100, progress=False)
    pairs = read_couplings(tmp_path / "c")
    dm = CouplingDataModule(str(tmp_path / "c"), batch_size=250, num_val=500, num_test=300, reference_target="8gaussians", reference_seed=0)
    assert dm.sample_shape == (2,) and not dm.conditional and dm.num_train == 2200 and dm.in_memory
    dm.setup("fit")
    seen = torch.cat([b["eps"] for b in dm.train_dataloader()])
    assert seen.shape == (2200, 2)
    order = np.lexsort(seen.numpy().T)
    assert np.array_equal(seen.numpy()[order], pairs["noise"][:2200][np.lexsort(pairs["noise"][:2200].T)])  # each train pair once per epoch
    batch = next(iter(dm.train_dataloader()))
    idx = [int(np.where((pairs["noise"] == e.numpy()).all(1))[0][0]) for e in batch["eps"][:20]]
    assert np.array_equal(batch["x0"][:20].numpy(), pairs["sample"][idx])  # x0 is eps's own sample
    val = torch.cat([b["x0"] for b in dm.val_dataloader()])
    assert np.array_equal(val.numpy(), pairs["sample"][2500:])
    test = torch.cat([b["eps"] for b in dm.test_dataloader()])
    assert np.array_equal(test.numpy(), pairs["noise"][2200:2500])
    # metrics compare with the real data of the toy data module's split, not with the teacher
    ref, labels = dm.reference_samples(400, split="val", return_labels=True)
    assert torch.equal(ref, Toy2DDataModule(seed=0).reference_samples(400, split="val"))
    held = CouplingDataModule(str(tmp_path / "c"), batch_size=250, num_val=500)
    assert torch.equal(held.reference_samples(100), torch.from_numpy(pairs["sample"][2500:2600]))
    with pytest.raises(ValueError, match="hold 500"):
        held.reference_samples(600)
    with pytest.raises(ValueError, match="none left for training"):
        CouplingDataModule(str(tmp_path / "c"), num_val=3000)


def test_streaming_matches_the_in_memory_pairs_and_splits_ranks(tmp_path):
    generate_couplings(_model(), tmp_path / "c", 3000, SamplerConfig("euler", 2), shard_size=700, record_size=50, progress=False)
    pairs = read_couplings(tmp_path / "c")
    train = {tuple(e) for e in pairs["noise"][:2500].tolist()}
    got = []
    for rank in (0, 1):
        dm = CouplingDataModule(str(tmp_path / "c"), batch_size=100, num_val=500, in_memory=False, shuffle_buffer=400)

        class _T:  # what the data module reads of a 2-process trainer
            world_size, global_rank = 2, rank

        dm.trainer = _T()
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader) == 12  # 2500 // (100 * 2)
        eps = torch.cat([b["eps"] for b in batches])
        x0 = torch.cat([b["x0"] for b in batches])
        rows = [tuple(e) for e in eps.tolist()]
        assert set(rows) <= train and len(set(rows)) == len(rows)
        got.append(set(rows))
        lookup = {tuple(e): i for i, e in enumerate(pairs["noise"].tolist())}
        assert np.array_equal(x0.numpy(), pairs["sample"][[lookup[r] for r in rows]])
    assert not got[0] & got[1]  # the ranks read disjoint records


def test_data_module_resumes_mid_epoch_and_remembers_its_couplings(tmp_path):
    m = generate_couplings(_model(), tmp_path / "c", 1200, SamplerConfig("euler", 2), progress=False)
    full = CouplingDataModule(str(tmp_path / "c"), batch_size=100, num_val=200, seed=5)
    full.setup("fit")
    epoch0 = [b["eps"] for b in full.train_dataloader()]
    resumed = CouplingDataModule(str(tmp_path / "c"), batch_size=100, num_val=200, seed=5)
    resumed.load_state_dict({"epoch": 0, "batches": 4, "couplings": str(tmp_path / "c"), "rectified": None})
    rest = [b["eps"] for b in resumed.train_dataloader()]
    assert len(rest) == 6 and all(torch.equal(a, b) for a, b in zip(rest, epoch0[4:]))
    state = full.state_dict()
    assert state["couplings"] == str((tmp_path / "c").resolve()) and state["rectified"] == m.get("rectified")


def test_guidance_needs_labels(tmp_path):
    with pytest.raises(ValueError, match="needs class labels"):
        generate_couplings(_model(), tmp_path / "g", 10, SamplerConfig("euler", 2, guidance=3.0), progress=False)
    with pytest.raises(ValueError, match="needs class labels"):
        generate_couplings(_model(num_classes=3), tmp_path / "g", 10, SamplerConfig("euler", 2, guidance=3.0), labels="none", progress=False)
    assert not (tmp_path / "g").exists() and not (tmp_path / "g.partial").exists()
