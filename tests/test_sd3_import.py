"""Importing diffusers SD3Transformer2DModel directories into our MMDiT.

The parity tests need diffusers (a test-only dependency: ``pip install diffusers``) and are skipped
without it; the round-trip and error tests run everywhere.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowmatch.networks.layers import count_parameters
from flowmatch.networks.mmdit import MMDiT
from flowmatch.networks.sd3_import import load_sd3_diffusers, save_sd3_diffusers, sd3_unused_query_params

WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY = dict(depth=2, hidden_size=16, num_heads=2, in_channels=4, pooled_dim=16, context_dim=32,
            pos_embed_max_size=16, pos_embed_base_size=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def randomize(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Random values for every parameter, the zero-initialised modulation and output layers included."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return model


def inputs(b=2, height=8, width=6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, height, width, generator=g), torch.rand(b, generator=g),
            torch.randn(b, 5, 32, generator=g), torch.randn(b, 16, generator=g))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- parity with diffusers -------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_parity_with_diffusers(tmp_path, qk_norm):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, qk_norm=qk_norm,
    )
    randomize(ref).eval()
    ref.save_pretrained(tmp_path)
    ours = load_sd3_diffusers(tmp_path)
    assert not ours.training and ours.qk_norm == (qk_norm == "rms_norm")
    assert ours.num_params() + sd3_unused_query_params(16, 2, ours.qk_norm) == sum(p.numel() for p in ref.parameters())
    for height, width in [(8, 8), (8, 6), (4, 10)]:  # non-square grids are centre-cropped from the 16 x 16 table
        z, t, tokens, pooled = inputs(height=height, width=width)
        with torch.no_grad():
            expected = ref(hidden_states=z, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t * 1000).sample
            got = ours(z, t, {"pooled": pooled, "tokens": tokens})
        assert rel_err(got, expected) < 1e-5


def test_export_loads_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ours = randomize(MMDiT(**TINY, qk_norm=True)).eval()
    save_sd3_diffusers(ours, tmp_path)
    ref = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path).eval()
    z, t, tokens, pooled = inputs()
    with torch.no_grad():
        expected = ref(hidden_states=z, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t * 1000).sample
        got = ours(z, t, {"pooled": pooled, "tokens": tokens})
    assert rel_err(got, expected) < 1e-5


def test_sd3_medium_size_matches_diffusers():
    """diffusers' SD3 Medium transformer (depth 24) built on the meta device: 2,028,328,000 parameters."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=192,
        )
    n_ref = sum(p.numel() for p in ref.parameters())
    assert n_ref == 2_028_328_000
    assert count_parameters(MMDiT, 24) + sd3_unused_query_params(1536, 24) == n_ref


# ---- round trip and errors (no diffusers needed) ------------------------------------------------


@pytest.mark.parametrize("qk_norm", [False, True])
def test_round_trip(tmp_path, qk_norm):
    ours = randomize(MMDiT(**TINY, qk_norm=qk_norm)).eval()
    save_sd3_diffusers(ours, tmp_path)
    back = load_sd3_diffusers(tmp_path)
    for (name, a), (name_b, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    z, t, tokens, pooled = inputs()
    cond = {"pooled": pooled, "tokens": tokens}
    assert torch.equal(ours(z, t, cond), back(z, t, cond))


def test_sharded_checkpoint_with_index(tmp_path):
    ours = randomize(MMDiT(**TINY)).eval()
    save_sd3_diffusers(ours, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    (tmp_path / WEIGHTS).unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / fname)
        weight_map.update({k: fname for k in keys})
    (tmp_path / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    back = load_sd3_diffusers(tmp_path)
    z, t, tokens, pooled = inputs()
    assert torch.equal(ours(z, t, {"pooled": pooled, "tokens": tokens}), back(z, t, {"pooled": pooled, "tokens": tokens}))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    save_sd3_diffusers(randomize(MMDiT(**TINY)), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)

    missing = dict(tensors)
    del missing["transformer_blocks.0.attn.to_k.weight"]
    save_file(missing, tmp_path / WEIGHTS)
    with pytest.raises(KeyError, match=r"transformer_blocks\.0\.attn\.to_k\.weight"):
        load_sd3_diffusers(tmp_path)

    extra = dict(tensors, **{"transformer_blocks.1.attn2.to_q.weight": torch.zeros(16, 16)})
    save_file(extra, tmp_path / WEIGHTS)
    with pytest.raises(KeyError, match=r"unexpected.*transformer_blocks\.1\.attn2\.to_q\.weight"):
        load_sd3_diffusers(tmp_path)

    wrong = dict(tensors, **{"proj_out.weight": torch.zeros(16, 15)})
    save_file(wrong, tmp_path / WEIGHTS)
    with pytest.raises(ValueError, match="proj_out.weight"):
        load_sd3_diffusers(tmp_path)


def test_config_errors(tmp_path):
    save_sd3_diffusers(MMDiT(**TINY), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps(dict(config, dual_attention_layers=[0, 1])))
    with pytest.raises(NotImplementedError, match="dual_attention_layers"):
        load_sd3_diffusers(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(dict(config, use_rope=True)))
    with pytest.raises(ValueError, match="use_rope"):
        load_sd3_diffusers(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(dict(config, sample_size=16)))  # other position scale
    with pytest.raises(ValueError, match="pos_embed.pos_embed"):
        load_sd3_diffusers(tmp_path)

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_sd3_diffusers(tmp_path / "nowhere")
