"""FLUX backbone: rotary positions, any latent size, double/single blocks, guidance embedding, configs, bad input.

Parity with diffusers' FluxTransformer2DModel (random weights imported) is in test_flux_import.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flowmatch.networks.flux import FLUX, FluxSingleBlock
from flowmatch.networks.layers import count_parameters
from flowmatch.networks.mmdit import MMDiTBlock
from flowmatch.networks.rope import apply_rope, check_axes_dim, default_axes_dim, image_position_ids, rope_angles

MODEL_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def tiny(**kw) -> FLUX:
    args = dict(num_double_blocks=1, num_single_blocks=2, hidden_size=32, num_heads=2, in_channels=4,
                pooled_dim=6, context_dim=10)
    return FLUX(**{**args, **kw})


def randomise(net: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random (the zero-initialised adaLN would hide most of the network)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net.eval()


def cond_of(b: int, length: int = 5, **extra) -> dict:
    return {"pooled": torch.randn(b, 6), "tokens": torch.randn(b, length, 10), **extra}


# ---- rotary embedding -------------------------------------------------------------------------------

def test_rope_angles_closed_form_and_rotation_of_pairs():
    ids = torch.tensor([[0, 3, 5]])
    cos, sin = rope_angles(ids, (2, 4, 4), theta=10000.0)
    # axis 0: dim 2 -> one frequency 1 at position 0; axis 1 (row 3): frequencies 1, 10000^-1/2; axis 2 (col 5) likewise
    angles = torch.tensor([0.0, 3.0, 3.0 / 100.0, 5.0, 5.0 / 100.0])
    assert torch.allclose(cos[0], angles.cos()) and torch.allclose(sin[0], angles.sin())
    x = torch.randn(1, 1, 1, 10)
    out = apply_rope(x, (cos, sin))
    # each interleaved pair is the complex number x0 + i x1 multiplied by e^{i angle}
    z = torch.view_as_complex(x.reshape(5, 2)) * torch.polar(torch.ones(5), angles)
    assert torch.allclose(out.reshape(5, 2), torch.view_as_real(z), atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    axes = (4, 6, 6)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(p, r):
        rope_p = rope_angles(torch.tensor([p]), axes)
        rope_r = rope_angles(torch.tensor([r]), axes)
        return (apply_rope(q, rope_p) * apply_rope(k, rope_r)).sum()

    assert torch.allclose(score([0, 2, 3], [0, 5, 1]), score([0, 10, 7], [0, 13, 5]), atol=1e-5)
    assert not torch.allclose(score([0, 2, 3], [0, 5, 1]), score([0, 2, 3], [0, 6, 1]), atol=1e-3)


def test_image_ids_are_row_major_zero_first_axis():
    ids = image_position_ids(2, 3)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_axes_split_defaults_and_errors():
    assert default_axes_dim(128) == (16, 56, 56)  # FLUX.1
    assert default_axes_dim(64) == (8, 28, 28)
    assert sum(default_axes_dim(16)) == 16
    with pytest.raises(ValueError, match=r"sums to 120.*head dim .* is 128"):
        check_axes_dim((16, 56, 48), 128)
    with pytest.raises(ValueError, match="even"):
        check_axes_dim((15, 57, 56), 128)
    with pytest.raises(ValueError, match=r"axes_dim \[8, 8, 8\] sums to 24.*head dim.*is 16"):
        tiny(axes_dim=[8, 8, 8])


# ---- the network --------------------------------------------------------------------------------------

def test_zero_output_at_init_and_block_layout():
    net = tiny(num_double_blocks=2, num_single_blocks=3)
    z, t = torch.randn(2, 4, 6, 8), torch.rand(2)
    out = net(z, t, cond_of(2))
    assert out.shape == z.shape and torch.count_nonzero(out) == 0  # adaLN-Zero and a zero final layer
    assert [type(b) for b in net.double_blocks] == [MMDiTBlock] * 2
    assert [type(b) for b in net.single_blocks] == [FluxSingleBlock] * 3
    assert net.pos_embed is None  # positions come from RoPE only
    single = net.single_blocks[0]
    assert (single.linear1.in_features, single.linear1.out_features) == (32, 3 * 32 + 4 * 32)
    assert (single.linear2.in_features, single.linear2.out_features) == (32 + 4 * 32, 32)
    assert single.adaLN_modulation[-1].out_features == 3 * 32


@pytest.mark.parametrize("shape", [(2, 8), (16, 6), (40, 64)])
def test_any_latent_size_without_a_table(shape):
    net = randomise(tiny())
    z = torch.randn(1, 4, *shape)
    with torch.no_grad():
        out = net(z, torch.rand(1), cond_of(1))
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_positions_matter_and_transposing_the_grid_is_not_a_symmetry():
    net = randomise(tiny())
    z, t, c = torch.randn(1, 4, 6, 6), torch.rand(1), cond_of(1)
    with torch.no_grad():
        out = net(z, t, c)
        transposed = net(z.transpose(-1, -2), t, c).transpose(-1, -2)
    assert not torch.allclose(out, transposed, atol=1e-4)  # rows and columns are different rotary axes


def test_text_padding_under_a_mask_changes_nothing():
    net = randomise(tiny())
    z, t, c = torch.randn(2, 4, 4, 6), torch.rand(2), cond_of(2, length=4)
    padded = dict(c, tokens=torch.cat([c["tokens"], torch.randn(2, 3, 10)], dim=1),
                  mask=torch.tensor([[True] * 4 + [False] * 3] * 2))
    with torch.no_grad():
        assert torch.allclose(net(z, t, c), net(z, t, padded), atol=1e-5)


def test_guidance_embedding_changes_the_output_and_is_kept_by_the_null_condition():
    net = randomise(tiny(guidance_embed=True))
    z, t, c = torch.randn(2, 4, 4, 4), torch.rand(2), cond_of(2)
    with torch.no_grad():
        a = net(z, t, dict(c, guidance=torch.full((2,), 1.5)))
        b = net(z, t, dict(c, guidance=torch.full((2,), 3.5)))
        scalar = net(z, t, dict(c, guidance=torch.tensor(3.5)))
    assert not torch.allclose(a, b, atol=1e-4) and torch.allclose(b, scalar)
    null = net.null_condition(dict(c, guidance=torch.full((2,), 3.5)))
    assert torch.equal(null["guidance"], torch.full((2,), 3.5)) and torch.count_nonzero(null["tokens"]) == 0


def test_guidance_errors_say_what_was_expected():
    z, t = torch.randn(2, 4, 4, 4), torch.rand(2)
    with pytest.raises(ValueError, match=r"guidance_embed=True.*cond\['guidance'\] must hold"):
        tiny(guidance_embed=True)(z, t, cond_of(2))
    with pytest.raises(ValueError, match=r"without a guidance embedding.*cond\['guidance'\] was given"):
        tiny()(z, t, cond_of(2, guidance=torch.full((2,), 3.0)))
    with pytest.raises(ValueError, match=r"cond\['guidance'\] must have shape \(2,\)"):
        tiny(guidance_embed=True)(z, t, cond_of(2, guidance=torch.ones(3)))


def test_bad_input_errors():
    net = tiny(max_text_tokens=6)
    t = torch.rand(1)
    with pytest.raises(ValueError, match="divisible by patch_size 2"):
        net(torch.randn(1, 4, 5, 4), t, cond_of(1))  # an odd side cannot be packed 2x2
    with pytest.raises(ValueError, match="7 tokens, more than max_text_tokens=6"):
        net(torch.randn(1, 4, 4, 4), t, cond_of(1, length=7))
    with pytest.raises(ValueError, match="4 channels"):
        net(torch.randn(1, 16, 4, 4), t, cond_of(1))
    with pytest.raises(KeyError, match="tokens"):
        net(torch.randn(1, 4, 4, 4), t, {"pooled": torch.randn(1, 6)})
    with pytest.raises(ValueError, match="at least one block"):
        tiny(num_double_blocks=0, num_single_blocks=0)


def test_only_double_or_only_single_blocks():
    for kw in ({"num_double_blocks": 0, "num_single_blocks": 2}, {"num_double_blocks": 2, "num_single_blocks": 0}):
        net = randomise(tiny(**kw))
        with torch.no_grad():
            assert torch.isfinite(net(torch.randn(1, 4, 4, 4), torch.rand(1), cond_of(1))).all()


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    z, t, c = torch.randn(2, 4, 4, 4), torch.rand(2), cond_of(2)
    grads = []
    for ckpt in (False, True):
        net = randomise(tiny(gradient_checkpointing=ckpt))
        net(z, t, c).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_text_dropout_in_training_only():
    net = tiny(cond_drop_prob=1.0)
    c = cond_of(3)
    dropped = net.drop_condition(c)
    assert net.training and torch.count_nonzero(dropped["tokens"]) == 0 and torch.count_nonzero(dropped["pooled"]) == 0
    net.eval()
    assert net.drop_condition(c)["tokens"] is c["tokens"]


def test_trains_inside_a_rectified_flow_objective():
    from flowmatch.objectives import RectifiedFlow

    torch.manual_seed(0)
    model = RectifiedFlow(network=tiny(cond_drop_prob=0.0))
    z, c = torch.randn(4, 4, 4, 4), cond_of(4)
    opt = torch.optim.Adam(model.net.parameters(), lr=3e-3)
    t, eps = torch.full((4,), 0.5), torch.randn_like(z)
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss = model.loss_per_sample(z, t, eps, c).mean()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first  # overfits one batch


# ---- configs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, count", [
    ("flux_demo", 9_237_568),
    ("flux1_schnell", 11_891_178_560),  # = diffusers' FluxTransformer2DModel() (test_flux_import.py)
    ("flux1_dev", 11_901_408_320),      # = FluxTransformer2DModel(guidance_embeds=True)
])
def test_config_parameter_counts(name, count):
    import yaml

    cfg = yaml.safe_load((MODEL_DIR / f"{name}.yaml").read_text())
    assert cfg["class_path"] == "flowmatch.networks.flux.FLUX"
    assert count_parameters(FLUX, **cfg["init_args"]) == count


def test_flux_demo_is_about_the_main_jobs_size():
    from flowmatch.networks.mmdit import MMDiT

    flux = count_parameters(FLUX, num_double_blocks=2, num_single_blocks=4, hidden_size=256, num_heads=4,
                            pooled_dim=384, context_dim=384)
    mmdit = count_parameters(MMDiT, depth=4, pooled_dim=384, context_dim=384, qk_norm=True)
    assert math.isclose(flux, mmdit, rel_tol=0.02)
