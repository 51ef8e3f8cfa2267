"""FLUX.1 weights in diffusers' FluxTransformer2DModel layout: import, export, the CLI, the parameter count.

Tiny diffusers models with every tensor random (the zero-initialised ones included) are saved with
save_pretrained, imported, and compared with diffusers' own forward on packed latents; exports are
reloaded by diffusers' from_pretrained. diffusers is a test-only dependency: without it these tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowmatch.cli.main import main as flowmatch_main
from flowmatch.networks.flux import FLUX
from flowmatch.networks.flux_import import (
    flux_diffusers_state_dict,
    flux_kwargs_from_diffusers_config,
    load_flux_diffusers,
    save_flux_diffusers,
)
from flowmatch.networks.layers import count_parameters
from flowmatch.networks.mmdit import MMDiT
from flowmatch.networks.sd3_import import load_sd3_diffusers, save_sd3_diffusers

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

WEIGHTS = "diffusion_pytorch_model.safetensors"
C, CONTEXT, POOLED = 4, 24, 12  # latent channels (diffusers in_channels 16), T5 / CLIP widths of the tiny model
TINY = dict(patch_size=1, in_channels=4 * C, num_layers=2, num_single_layers=3, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=CONTEXT, pooled_projection_dim=POOLED, axes_dims_rope=(4, 14, 14))
OURS_TINY = dict(num_double_blocks=2, num_single_blocks=3, hidden_size=64, num_heads=2, in_channels=C, pooled_dim=POOLED,
                 context_dim=CONTEXT, axes_dim=(4, 14, 14))


def random_flux(guidance: bool, seed: int = 0):
    """A tiny diffusers FLUX with N(0, 0.1) in every parameter (modulations and output layer included)."""
    torch.manual_seed(seed)
    ref = diffusers.FluxTransformer2DModel(**TINY, guidance_embeds=guidance)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    return ref.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["dev-like", "schnell-like"])
def flux_dir(request, tmp_path_factory):
    ref = random_flux(request.param)
    path = tmp_path_factory.mktemp("flux") / "transformer"
    ref.save_pretrained(path)
    return path, ref


def pack(z: torch.Tensor) -> torch.Tensor:
    """The FLUX pipelines' _pack_latents: (B, C, 2h, 2w) -> (B, h w, 4C), a token's values (channel, row, column)."""
    b, c, hh, ww = z.shape
    return z.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, hh // 2 * ww // 2, 4 * c)


def unpack(x: torch.Tensor, hh: int, ww: int) -> torch.Tensor:
    b, _, d = x.shape
    c = d // 4
    return x.view(b, hh // 2, ww // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)


def img_ids(h: int, w: int) -> torch.Tensor:
    """The FLUX pipelines' _prepare_latent_image_ids: (0, row, column) of the packed grid, row-major."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    return ids.reshape(h * w, 3)


def inputs(height: int = 6, width: int = 10, pad: int = 0, b: int = 2):
    """Latents (non-square by default), times, guidance scales, the same prompt's tokens with ``pad`` zero tokens after it."""
    g = torch.Generator().manual_seed(1)
    z, t, guidance = torch.randn(b, C, height, width, generator=g), torch.rand(b, generator=g), 1 + 4 * torch.rand(b, generator=g)
    tokens = torch.randn(b, 5, CONTEXT, generator=g)
    tokens = torch.cat([tokens, torch.zeros(b, pad, CONTEXT)], dim=1)
    return z, t, guidance, tokens, torch.randn(b, POOLED, generator=g)


def diffusers_out(ref, z, t, guidance, tokens, pooled) -> torch.Tensor:
    hh, ww = z.shape[-2:]
    extra = {"guidance": guidance} if ref.config.guidance_embeds else {}
    with torch.no_grad():
        out = ref(hidden_states=pack(z), encoder_hidden_states=tokens, pooled_projections=pooled, timestep=t,
                  img_ids=img_ids(hh // 2, ww // 2), txt_ids=torch.zeros(tokens.shape[1], 3), **extra).sample
    return unpack(out, hh, ww)


def our_out(net, z, t, guidance, tokens, pooled) -> torch.Tensor:
    cond = {"pooled": pooled, "tokens": tokens}
    if net.guidance_embed:
        cond["guidance"] = guidance
    with torch.no_grad():
        return net(z, t, cond)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_same_outputs(net, ref, **shape):
    x = inputs(**shape)
    expected = diffusers_out(ref, *x)
    assert expected.norm() > 0
    assert rel_err(our_out(net, *x), expected) <= 1e-5


# ---- import: parity with diffusers --------------------------------------------------------------


def test_parity_with_diffusers(flux_dir):
    path, ref = flux_dir
    net = load_flux_diffusers(path)
    assert not net.training and net.guidance_embed == ref.config.guidance_embeds
    assert (net.in_channels, net.out_channels, net.patch_size) == (C, C, 2)
    assert net.num_params() == sum(p.numel() for p in ref.parameters())
    for shape in [dict(height=6, width=10), dict(height=8, width=4), dict(height=4, width=4, pad=7)]:
        assert_same_outputs(net, ref, **shape)


def test_padded_prompt_without_mask_is_attended_like_diffusers(flux_dir):
    """diffusers passes no mask, so padding tokens change its output; ours given no mask must change the same way."""
    path, ref = flux_dir
    net = load_flux_diffusers(path)
    plain, padded = inputs(pad=0), inputs(pad=6)
    assert rel_err(diffusers_out(ref, *padded), diffusers_out(ref, *plain)) > 1e-3  # the padding matters to diffusers
    assert rel_err(our_out(net, *padded), diffusers_out(ref, *padded)) <= 1e-5


def test_sharded_directory(flux_dir, tmp_path):
    path, ref = flux_dir
    ref.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / f"{WEIGHTS}.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    sharded, single = load_flux_diffusers(tmp_path), load_flux_diffusers(path)
    for (name, a), (name_b, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    assert_same_outputs(sharded, ref)


def test_pipeline_directory(flux_dir, tmp_path):
    path, ref = flux_dir
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    ref.save_pretrained(tmp_path / "transformer")
    assert_same_outputs(load_flux_diffusers(tmp_path), ref)


# ---- export -------------------------------------------------------------------------------------


def test_export_reloads_in_diffusers(flux_dir, tmp_path):
    path, ref = flux_dir
    net = load_flux_diffusers(path)
    save_flux_diffusers(net, tmp_path / "out")
    back = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(ref.config) | {"out_channels": 4 * C, "axes_dims_rope": list(TINY["axes_dims_rope"])}
    theirs, original = back.state_dict(), ref.state_dict()
    assert set(theirs) == set(original)
    for name, value in original.items():  # the round trip through our layout is exact
        assert torch.equal(theirs[name], value), name
    assert_same_outputs(net, back)


@pytest.mark.parametrize("guidance", [True, False])
def test_our_random_flux_round_trips(tmp_path, guidance):
    """Ours -> diffusers layout -> ours is exact, and diffusers computes the same function."""
    net = FLUX(**OURS_TINY, guidance_embed=guidance).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_flux_diffusers(net, tmp_path)
    back = load_flux_diffusers(tmp_path)
    for (name, a), (name_b, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    assert_same_outputs(net, diffusers.FluxTransformer2DModel.from_pretrained(tmp_path).eval())


def test_export_refuses_what_diffusers_cannot_hold():
    with pytest.raises(ValueError, match="null"):
        flux_diffusers_state_dict(FLUX(**OURS_TINY, learned_null=True))
    with pytest.raises(ValueError, match="rope_theta"):
        flux_diffusers_state_dict(FLUX(**OURS_TINY, rope_theta=256.0))
    with pytest.raises(ValueError, match="MLP ratio"):
        flux_diffusers_state_dict(FLUX(**OURS_TINY, mlp_ratio=2.0))
    with pytest.raises(ValueError, match="patch_size=1"):
        flux_diffusers_state_dict(FLUX(**OURS_TINY | {"patch_size": 1}))


# ---- errors -------------------------------------------------------------------------------------


def test_missing_and_unexpected_tensors_are_named(flux_dir, tmp_path):
    path, _ = flux_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / WEIGHTS)

    missing = dict(tensors)
    del missing["single_transformer_blocks.2.proj_mlp.bias"]
    save_file(missing, tmp_path / WEIGHTS)
    with pytest.raises(KeyError, match=r"lacks.*single_transformer_blocks\.2\.proj_mlp\.bias"):
        load_flux_diffusers(tmp_path)

    extra = dict(tensors, **{"transformer_blocks.1.attn.to_added_gate.weight": torch.zeros(64)})
    save_file(extra, tmp_path / WEIGHTS)
    with pytest.raises(KeyError, match=r"unexpected.*transformer_blocks\.1\.attn\.to_added_gate\.weight"):
        load_flux_diffusers(tmp_path)

    wrong = dict(tensors, **{"proj_out.weight": torch.zeros(12, 64)})
    save_file(wrong, tmp_path / WEIGHTS)
    with pytest.raises(ValueError, match=r"proj_out\.weight"):
        load_flux_diffusers(tmp_path)


def test_config_errors(flux_dir):
    path, _ = flux_dir
    config = json.loads((path / "config.json").read_text())
    assert flux_kwargs_from_diffusers_config(config)["in_channels"] == C
    with pytest.raises(ValueError, match="use_rope"):
        flux_kwargs_from_diffusers_config(dict(config, use_rope=True))
    with pytest.raises(NotImplementedError, match="patch_size=2"):
        flux_kwargs_from_diffusers_config(dict(config, patch_size=2))
    with pytest.raises(ValueError, match="in_channels=18"):
        flux_kwargs_from_diffusers_config(dict(config, in_channels=18))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        flux_kwargs_from_diffusers_config(dict(config, axes_dims_rope=[4, 14, 12]))
    fill = flux_kwargs_from_diffusers_config(dict(config, in_channels=384, out_channels=64))  # FLUX.1 Fill's channels
    assert (fill["in_channels"], fill["out_channels"]) == (96, 16)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_flux_diffusers(path.parent / "nowhere")


def test_sd3_and_flux_directories_are_told_apart(flux_dir, tmp_path):
    path, _ = flux_dir
    save_sd3_diffusers(MMDiT(depth=2, hidden_size=16, num_heads=2, in_channels=4, pooled_dim=16, context_dim=32,
                             pos_embed_max_size=16, pos_embed_base_size=4), tmp_path / "sd3")
    with pytest.raises(ValueError, match=r"'SD3Transformer2DModel'.*SD3.*import-sd3"):
        load_flux_diffusers(tmp_path / "sd3")
    with pytest.raises(ValueError, match=r"'FluxTransformer2DModel'.*FLUX.*import-flux"):
        load_sd3_diffusers(path)


# ---- size -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance, expected", [(True, 11_901_408_320), (False, 11_891_178_560)], ids=["dev", "schnell"])
def test_flux1_size_matches_diffusers(guidance, expected):
    """FLUX.1-dev (guidance embedding) and schnell at full size, built on the meta device by both."""
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(guidance_embeds=guidance)
    assert sum(p.numel() for p in ref.parameters()) == expected
    ours = count_parameters(FLUX, num_double_blocks=19, num_single_blocks=38, hidden_size=3072, num_heads=24,
                            pooled_dim=768, context_dim=4096, guidance_embed=guidance)
    assert ours == expected


# ---- the CLI as a user runs it ------------------------------------------------------------------


def _flowmatch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JSONARGPARSE_DEPRECATION_WARNINGS="off")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "flowmatch", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_cli_import_load_and_export(flux_dir, tmp_path, capsys):
    from flowmatch.objectives.loading import load_objective

    path, ref = flux_dir
    out = tmp_path / "flux.ckpt"
    run = _flowmatch(["import-flux", str(path.parent), "--out", str(out), "--latent-size", "8"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert str(out) in run.stdout and "2 double + 3 single" in run.stdout
    assert f"guidance_embed {ref.config.guidance_embeds}" in run.stdout

    ckpt = torch.load(out, weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["_class_path"] == "flowmatch.objectives.RectifiedFlow" and hp["network"]["class_path"] == "flowmatch.networks.flux.FLUX"
    assert list(hp["sample_shape"]) == [C, 8, 8]
    model = load_objective(out)
    assert type(model.net) is FLUX and list(model.sample_shape) == [C, 8, 8]
    assert_same_outputs(model.net, ref)

    exported = tmp_path / "exported"
    assert flowmatch_main(["export-diffusers", "--ckpt", str(out), "--out", str(exported)]) == 0
    assert "FluxTransformer2DModel" in capsys.readouterr().out
    back = diffusers.FluxTransformer2DModel.from_pretrained(exported).eval()
    assert_same_outputs(model.net, back)

    # a second export into the same directory needs --force, and leaves no stale file
    assert flowmatch_main(["export-diffusers", "--ckpt", str(out), "--out", str(exported)]) == 1
    assert "--force" in capsys.readouterr().err
    (exported / "stale-00001-of-00002.safetensors").write_bytes(b"")
    assert flowmatch_main(["export-diffusers", "--ckpt", str(out), "--out", str(exported), "--force", "--dtype", "bfloat16"]) == 0
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", WEIGHTS]
    assert all(v.dtype == torch.bfloat16 for v in load_file(exported / WEIGHTS).values())


def test_cli_wrong_directory_kinds(flux_dir, tmp_path, capsys):
    path, _ = flux_dir
    sd3 = tmp_path / "sd3"
    save_sd3_diffusers(MMDiT(depth=2, hidden_size=16, num_heads=2, in_channels=4, pooled_dim=16, context_dim=32,
                             pos_embed_max_size=16, pos_embed_base_size=4), sd3)
    assert flowmatch_main(["import-flux", str(sd3), "--out", str(tmp_path / "m.ckpt")]) == 1
    err = capsys.readouterr().err
    assert "import-sd3" in err and str(sd3 / "config.json") in err and len(err.strip().splitlines()) == 1
    assert flowmatch_main(["import-sd3", str(path), "--out", str(tmp_path / "m.ckpt")]) == 1
    err = capsys.readouterr().err
    assert "FLUX" in err and "import-flux" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.ckpt").exists()


def test_cli_export_refuses_other_networks(tmp_path, capsys):
    """A checkpoint whose network has no diffusers layout (a DiT here) is refused by name; nothing is written."""
    from flowmatch.checkpoints import atomic_torch_save
    from flowmatch.networks.dit import DiT

    init_args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2)
    net = DiT(**init_args)
    atomic_torch_save({
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {"_class_path": "flowmatch.objectives.RectifiedFlow",
                             "network": {"class_path": "flowmatch.networks.dit.DiT", "init_args": init_args}},
    }, tmp_path / "dit.ckpt")
    assert flowmatch_main(["export-diffusers", "--ckpt", str(tmp_path / "dit.ckpt"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "DiT" in err and "MMDiT" in err and "FLUX" in err
    assert not (tmp_path / "x").exists()


def test_cli_export_writes_an_mmdit_as_sd3(tmp_path):
    """export-diffusers also covers SD3's MMDiT: the directory it writes imports back to the same weights."""
    from flowmatch.checkpoints import atomic_torch_save

    init_args = dict(depth=2, hidden_size=16, num_heads=2, in_channels=4, pooled_dim=16, context_dim=32,
                     pos_embed_max_size=16, pos_embed_base_size=4, qk_norm=True)
    net = MMDiT(**init_args)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    atomic_torch_save({
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {"_class_path": "flowmatch.objectives.RectifiedFlow",
                             "network": {"class_path": "flowmatch.networks.mmdit.MMDiT", "init_args": init_args}},
    }, tmp_path / "mmdit.ckpt")
    assert flowmatch_main(["export-diffusers", "--ckpt", str(tmp_path / "mmdit.ckpt"), "--out", str(tmp_path / "sd3")]) == 0
    assert json.loads((tmp_path / "sd3" / "config.json").read_text())["_class_name"] == "SD3Transformer2DModel"
    back = load_sd3_diffusers(tmp_path / "sd3")
    for name, value in net.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
