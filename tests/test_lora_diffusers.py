"""LoRA adapters round-trip with diffusers + peft, on small random SD3 and FLUX transformers (issue 14's criteria):

(a) an adapter made here -> diffusers' LoRA file -> a diffusers model loaded from the same base + load_lora_adapter:
    the same output as ours; (b) an adapter made in diffusers/peft (with scales alpha / rank != 1, and on layers
    our network fuses or reorders) -> read here: the same output as diffusers'; (c) merged here -> full weights in
    diffusers' layout -> from_pretrained: the same output as the adapted model. Relative error <= 1e-4 in float32.
Plus: the adapter starts at the base exactly, scales like diffusers' lora_scale, and bad input is refused by name.
"""

import copy

import pytest
import torch
from safetensors.torch import save_file
from helpers_sd3 import TINY_SD3, diffusers_sd3_out, our_sd3_out, random_sd3, rel_err
from test_flux_import import diffusers_out, inputs, our_out, random_flux

from flowmatch.adapters.diffusers_lora import LORA_FILE, attach_lora, to_diffusers, write_lora
from flowmatch.adapters.lora import (
    LoraAdapter,
    add_lora,
    has_lora,
    lora_layout,
    lora_state_dict,
    merge_lora,
    plan_lora,
    set_lora_scale,
)
from flowmatch.networks.flux_import import load_flux_diffusers, save_flux_diffusers
from flowmatch.networks.sd3_import import load_sd3_diffusers, save_sd3_diffusers

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TOL = 1e-4
# every kind of layer mapping: fused q/k/v (cat), the pre-only last text stream (kv), (scale, shift) rows swapped
# (the last block's text modulation, the final modulation), FLUX's output patch order, MLPs and single blocks
OUR_TARGETS = [r"blocks\.\d+\.(image|text\.\d+)\.(qkv|kv|proj)", r".*adaLN_modulation\.1", r"final_layer\.linear",
               r"blocks\.\d+\.(image|text\.\d+)\.mlp\.fc[12]"]
OUR_FLUX_TARGETS = OUR_TARGETS + [r"blocks\.\d+\.linear[12]"]
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "norm1_context.linear", "norm_out.linear", "proj_out", "ff.net.2"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_v_proj", "to_add_out", "proj_mlp", "norm.linear",
                "norm_out.linear", "proj_out", "ff_context.net.0.proj"]


def randomise_adapter(net, seed: int = 3, std: float = 0.2) -> None:
    """Give every LoRA weight a random value (B starts at zero: an untrained adapter would check nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# --- SD3 --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "transformer"
    random_sd3(path)
    return path


def test_sd3_ours_to_diffusers_and_merge(sd3_base, tmp_path):
    base = load_sd3_diffusers(sd3_base)
    net = copy.deepcopy(base)
    add_lora(net, plan_lora(net, LoraAdapter(rank=3, alpha=6.0, target_modules=OUR_TARGETS)))
    assert our_sd3_out(net).equal(our_sd3_out(base))  # B = 0: the adapter starts at the base exactly
    randomise_adapter(net)
    ours = our_sd3_out(net)
    assert rel_err(ours, our_sd3_out(base)) > 0.05

    # (a) our adapter in diffusers' file format, loaded by diffusers on the same base
    write_lora(tmp_path / "lora", to_diffusers(net, lora_state_dict(net), lora_layout(net)))
    ref = diffusers.SD3Transformer2DModel.from_pretrained(sd3_base)
    ref.load_lora_adapter(str(tmp_path / "lora"), prefix="transformer", weight_name=LORA_FILE)
    assert rel_err(diffusers_sd3_out(ref), ours) <= TOL
    # diffusers' lora_scale and ours agree too
    ref.set_adapters(["default_0"], weights=[0.5])
    set_lora_scale(net, 0.5)
    assert rel_err(diffusers_sd3_out(ref), our_sd3_out(net)) <= TOL
    set_lora_scale(net, 1.0)

    # (c) merged here, written in diffusers' layout, read by from_pretrained
    merge_lora(net)
    assert not has_lora(net) and rel_err(our_sd3_out(net), ours) <= TOL
    save_sd3_diffusers(net, tmp_path / "merged")
    merged = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "merged")
    assert rel_err(diffusers_sd3_out(merged), ours) <= TOL


@pytest.mark.parametrize("flavour", ["model", "pipeline"])
def test_sd3_diffusers_adapter_loads_here(sd3_base, tmp_path, flavour):
    """(b) an adapter made in diffusers: scale alpha / rank = 2 (recorded in the file's metadata) or 1 (a pipeline
    file without metadata), on separate q/k/v (fused here), the unused last text query and swapped modulations."""
    ref = diffusers.SD3Transformer2DModel.from_pretrained(sd3_base)
    alpha = 8 if flavour == "model" else 4
    ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False, target_modules=SD3_TARGETS))
    if flavour == "model":
        ref.save_lora_adapter(str(tmp_path / "lora"), weight_name=LORA_FILE)  # unprefixed keys + metadata
    else:
        state = peft.utils.get_peft_model_state_dict(ref)
        diffusers.StableDiffusion3Pipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=state)
    expected = diffusers_sd3_out(ref)
    assert rel_err(expected, diffusers_sd3_out(diffusers.SD3Transformer2DModel.from_pretrained(sd3_base))) > 0.05

    net = load_sd3_diffusers(sd3_base)
    layout, file = attach_lora(net, tmp_path / "lora")
    assert file.name == LORA_FILE
    assert layout.ranks["blocks.0.image.qkv"] == 12  # to_q, to_k, to_v of rank 4 each: one adapter of rank 12
    assert layout.ranks["blocks.1.text.0.kv"] == 8  # the last block's text keys and values (its query is unused)
    assert rel_err(our_sd3_out(net), expected) <= TOL


# --- FLUX -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    ref = random_flux(guidance=True)
    path = tmp_path_factory.mktemp("flux") / "transformer"
    ref.save_pretrained(path)
    return path


def test_flux_ours_to_diffusers_and_merge(flux_base, tmp_path):
    base = load_flux_diffusers(flux_base)
    net = copy.deepcopy(base)
    add_lora(net, plan_lora(net, LoraAdapter(rank=4, alpha=2.0, target_modules=OUR_FLUX_TARGETS)))
    randomise_adapter(net)
    x = inputs()
    ours = our_out(net, *x)
    assert rel_err(ours, our_out(base, *x)) > 0.05

    write_lora(tmp_path / "lora", to_diffusers(net, lora_state_dict(net), lora_layout(net)))
    ref = diffusers.FluxTransformer2DModel.from_pretrained(flux_base)
    ref.load_lora_adapter(str(tmp_path / "lora"), prefix="transformer", weight_name=LORA_FILE)  # (a)
    assert rel_err(diffusers_out(ref, *x), ours) <= TOL

    merge_lora(net)  # (c)
    save_flux_diffusers(net, tmp_path / "merged")
    merged = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "merged")
    assert rel_err(diffusers_out(merged, *x), ours) <= TOL


def test_flux_diffusers_adapter_loads_here(flux_base, tmp_path):
    """(b) for FLUX: single blocks' separate to_q/k/v/proj_mlp (one fused linear here), partial q/k/v targets
    (add_v_proj alone), the output patch order, with alpha / rank = 1.5 from the file's metadata."""
    ref = diffusers.FluxTransformer2DModel.from_pretrained(flux_base)
    ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=FLUX_TARGETS))
    ref.save_lora_adapter(str(tmp_path / "lora"), weight_name=LORA_FILE)
    x = inputs()
    expected = diffusers_out(ref, *x)

    net = load_flux_diffusers(flux_base)
    layout, _ = attach_lora(net, tmp_path / "lora")
    assert layout.ranks["blocks.2.linear1"] == 16  # to_q, to_k, to_v, proj_mlp
    assert layout.ranks["blocks.0.text.0.qkv"] == 4  # add_v_proj only: the q and k rows of B stay zero
    assert rel_err(our_out(net, *x), expected) <= TOL


# --- bad input ------------------------------------------------------------------------------------------------
def test_adapter_for_another_base_is_refused(sd3_base, flux_base, tmp_path):
    flux = diffusers.FluxTransformer2DModel.from_pretrained(flux_base)
    flux.add_adapter(peft.LoraConfig(r=2, target_modules=["proj_mlp"]))
    flux.save_lora_adapter(str(tmp_path / "flux_lora"), weight_name=LORA_FILE)
    net = load_sd3_diffusers(sd3_base)
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.0\.proj_mlp.*another"):
        attach_lora(net, tmp_path / "flux_lora")
    assert not has_lora(net)  # nothing was added

    wider = dict(TINY_SD3, joint_attention_dim=48)  # same names, other shapes
    other = diffusers.SD3Transformer2DModel(**wider)
    other.add_adapter(peft.LoraConfig(r=2, target_modules=["context_embedder"]))
    other.save_lora_adapter(str(tmp_path / "wide_lora"), weight_name=LORA_FILE)
    with pytest.raises(ValueError, match=r"context_embedder.*shapes"):
        attach_lora(net, tmp_path / "wide_lora")


def test_bad_files_are_named(sd3_base, tmp_path):
    net = load_sd3_diffusers(sd3_base)
    (tmp_path / "lora.bin").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"lora\.bin is not a \.safetensors file"):
        attach_lora(net, tmp_path / "lora.bin")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"broken\.safetensors is not a readable safetensors file"):
        attach_lora(net, tmp_path / "broken.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        attach_lora(net, tmp_path / "missing.safetensors")
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "kohya.safetensors"))
    with pytest.raises(ValueError, match="kohya"):
        attach_lora(net, tmp_path / "kohya.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=LORA_FILE):
        attach_lora(net, tmp_path / "empty")


def test_bad_settings_are_named(sd3_base):
    net = load_sd3_diffusers(sd3_base)
    with pytest.raises(ValueError, match=r"pattern 'blocks.\*attn' matches no linear layer of MMDiT"):
        plan_lora(net, LoraAdapter(target_modules=["blocks.*attn"]))
    with pytest.raises(ValueError, match=r"rank 64 is larger than layer blocks\.0\.image\.qkv allows \(16 in, 48 out: at most 16\)"):
        plan_lora(net, LoraAdapter(rank=64, target_modules=[r"blocks\.0\.image\.qkv"]))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        plan_lora(net, LoraAdapter(target_modules=["blocks.(["]))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoraAdapter(rank=0)
    layout = plan_lora(net, LoraAdapter(rank=2))  # the MM-DiT defaults: q/k/v and output projections of both streams
    assert sorted(layout.ranks) == ["blocks.0.image.proj", "blocks.0.image.qkv", "blocks.0.text.0.proj", "blocks.0.text.0.qkv",
                                    "blocks.1.image.proj", "blocks.1.image.qkv", "blocks.1.text.0.kv"]
