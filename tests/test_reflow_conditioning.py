"""Reflow checks a network against its couplings with the shared ConditioningSpec check: what a coupling
manifest says its pairs are conditioned on, what a model takes, and the refusals when they do not fit."""

import numpy as np
import pytest
import torch

from flowmatch.networks.conditioning import ConditioningMismatchError, ConditioningSpec
from flowmatch.networks.dit import DiT
from flowmatch.networks.mlp import MLPVelocity
from flowmatch.objectives import RectifiedFlow
from flowmatch.reflow import CouplingDataModule, CouplingFormatError, generate_couplings, read_manifest
from flowmatch.reflow.couplings import model_is_text_conditioned
from flowmatch.reflow.format import manifest_conditioning
from flowmatch.sampling import SamplerConfig

torch.set_num_threads(1)


def _model(num_classes: int = 0) -> RectifiedFlow:
    torch.manual_seed(0)
    return RectifiedFlow(MLPVelocity(2, 16, 2, 8, num_classes=num_classes), sample_shape=[2]).eval()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    out = tmp_path_factory.mktemp("couplings") / "labels"
    generate_couplings(_model(num_classes=4), out, 300, SamplerConfig("euler", 1), progress=False)
    return out


def test_a_manifest_says_what_its_pairs_are_conditioned_on(labelled, tmp_path):
    assert manifest_conditioning(read_manifest(labelled)) == ConditioningSpec(num_classes=4)
    generate_couplings(_model(), tmp_path / "plain", 10, SamplerConfig("euler", 1), progress=False)
    assert manifest_conditioning(read_manifest(tmp_path / "plain")) == ConditioningSpec()
    text = {"conditional": True, "condition": "text", "text": {"pooled_dim": 12, "context_dim": 6, "context_length": 5}}
    spec = manifest_conditioning(text)
    assert spec.is_text and spec.pooled_dim == 12 and spec.stream("tokens").width == 6 and spec.stream("tokens").max_length == 5
    with pytest.raises(CouplingFormatError, match="context_length"):
        manifest_conditioning({**text, "text": {"pooled_dim": 12, "context_dim": 6}})
    with pytest.raises(CouplingFormatError, match="num_classes"):
        manifest_conditioning({"conditional": True, "condition": "label"})


def test_the_data_module_describes_its_conditioning_and_refuses_networks_that_do_not_fit(labelled):
    dm = CouplingDataModule(str(labelled), batch_size=50, num_val=100)
    assert dm.conditioning == ConditioningSpec(num_classes=4) and dm.conditional and not dm.text_conditional and dm.num_classes == 4
    dm.check_model(_model(num_classes=4))  # fits
    dm.check_model(_model(num_classes=6))  # more classes than the pairs use: fits too
    with pytest.raises(ConditioningMismatchError, match="has 4 classes, the network only 3"):
        dm.check_model(_model(num_classes=3))
    with pytest.raises(ConditioningMismatchError, match="class labels but the network is unconditional"):
        dm.check_model(_model())
    wide = RectifiedFlow(MLPVelocity(3, 16, 2, 8, num_classes=4), sample_shape=[3])
    with pytest.raises(ConditioningMismatchError, match=r"samples of shape \(3,\)"):
        dm.check_model(wide)


def test_what_a_model_takes_is_what_its_network_declares():
    assert not model_is_text_conditioned(_model(num_classes=4)) and not model_is_text_conditioned(_model())
    pooled = RectifiedFlow(DiT(size=None, depth=1, hidden_size=32, num_heads=2, in_channels=4, input_size=8, pooled_dim=12),
                           sample_shape=[4, 8, 8])
    assert model_is_text_conditioned(pooled)
    plain = _model()
    plain.data_info = {"text_encoders": [{"name": "minilm"}]}  # trained on latent/caption shards, without reading the captions
    assert model_is_text_conditioned(plain)
    with pytest.raises(ValueError, match="need captions"):
        generate_couplings(pooled, "unused", 4, SamplerConfig("euler", 1), progress=False)


def test_guidance_needs_a_condition_with_a_null(tmp_path):
    with pytest.raises(ValueError, match="needs class labels"):
        generate_couplings(_model(), tmp_path / "g", 10, SamplerConfig("euler", 1, guidance=2.0), progress=False)
    m = generate_couplings(_model(num_classes=2), tmp_path / "g", 10, SamplerConfig("euler", 1, guidance=2.0), labels=np.array([0, 1] * 5),
                           progress=False)
    assert m["labels"] == "array" and m["guidance"] == 2.0
