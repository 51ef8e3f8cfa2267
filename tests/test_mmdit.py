"""SD3 MM-DiT: shapes, identity at init, parameter counts, conditioning dropout, masks, bf16, overfitting."""

import pytest
import torch

from helpers_models import randomize
from flowmatch.networks.layers import count_parameters
from flowmatch.networks.mmdit import MMDiT, MMDiTBlock

TINY = dict(depth=2, hidden_size=32, num_heads=2, in_channels=4, pooled_dim=12, context_dim=20, pos_embed_max_size=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def make_cond(b=2, length=7, context_dim=20, pooled_dim=12, length_2=None, context_dim_2=None):
    cond = {"pooled": torch.randn(b, pooled_dim), "tokens": torch.randn(b, length, context_dim)}
    if context_dim_2 is not None:
        cond["tokens_2"] = torch.randn(b, length_2, context_dim_2)
    return cond


@pytest.mark.parametrize("three_sets", [False, True])
def test_shape_zero_output_and_identity_blocks_at_init(three_sets):
    torch.manual_seed(0)
    extra = dict(context_dim_2=6) if three_sets else {}
    net = MMDiT(**TINY, qk_norm=True, **extra)
    z, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    cond = make_cond(3, length_2=5, **extra)
    seen = []

    def hook(block, args, out):
        x, contexts = args[0], args[1]
        x_out, ctx_out = out
        same_ctx = ctx_out is None or all(torch.equal(a, b) for a, b in zip(contexts, ctx_out))
        seen.append(torch.equal(x, x_out) and same_ctx)

    for b in net.blocks:
        b.register_forward_hook(hook)
    out = net(z, t, cond)
    assert out.shape == z.shape and out.dtype == z.dtype
    assert torch.count_nonzero(out) == 0
    assert seen == [True, True]
    assert net.blocks[-1].text_pre_only and not net.blocks[0].text_pre_only
    assert len(net.blocks[0].text) == (2 if three_sets else 1)


def test_default_widths_follow_sd3():
    net = MMDiT(depth=2, in_channels=4, pooled_dim=8, context_dim=8, pos_embed_max_size=4)
    assert (net.hidden_size, net.num_heads) == (128, 2)  # hidden 64 * depth, head dim 64


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(depth=1),
        dict(depth=2, qk_norm=True),
        dict(depth=3, context_dim_2=6, learned_null=True, out_channels=8),
        dict(depth=2, mlp_ratio=2.0, patch_size=1),
    ],
)
def test_meta_device_count_equals_the_built_network(kwargs):
    cfg = dict(TINY, **kwargs)
    net = MMDiT(**cfg)
    assert count_parameters(MMDiT, **cfg) == net.num_params() == sum(p.numel() for p in net.parameters())


def test_nonsquare_latent_is_centre_cropped():
    net = randomize(MMDiT(**TINY)).eval()
    z, t, cond = torch.randn(2, 4, 6, 10), torch.rand(2), make_cond()
    assert net(z, t, cond).shape == z.shape
    pos = net.pos_embed(3, 5)  # 3 x 5 token grid out of the 8 x 8 table
    table = net.pos_embed.table.reshape(8, 8, -1)
    assert torch.equal(pos.reshape(3, 5, -1), table[2:5, 1:6])
    with pytest.raises(ValueError, match="exceeds the position table"):
        net(torch.randn(1, 4, 18, 8), torch.rand(1), make_cond(1))


def test_dropout_rates_independent_and_eval_identity():
    net = MMDiT(**TINY, context_dim_2=6, cond_drop_prob=0.463)
    n = 6000
    cond = make_cond(n, length=3, length_2=2, context_dim_2=6)
    cond["mask"] = torch.rand(n, 3) > 0.3
    net.train()
    out = net.drop_condition(cond)
    dp = (out["pooled"] == 0).all(1)
    dt = (out["tokens"] == 0).flatten(1).all(1)
    dt2 = (out["tokens_2"] == 0).flatten(1).all(1)
    for d in (dp, dt, dt2):
        assert abs(d.float().mean().item() - 0.463) < 0.03
    assert abs((dp & dt & dt2).float().mean().item() - 0.463**3) < 0.02  # independent: ~10% see no text at all
    assert abs((dt & dt2).float().mean().item() - 0.463**2) < 0.03
    assert out["mask"][dt].all() and torch.equal(out["mask"][~dt], cond["mask"][~dt])
    net.eval()
    out = net.drop_condition(cond)
    assert all(out[k] is cond[k] for k in ("pooled", "tokens", "tokens_2", "mask"))


@pytest.mark.parametrize("learned_null", [False, True])
def test_null_condition_and_full_dropout(learned_null):
    net = randomize(MMDiT(**TINY, cond_drop_prob=1.0, learned_null=learned_null))
    z, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), make_cond()
    cond["mask"] = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    null = net.null_condition(cond)
    assert set(null) == set(cond) and all(null[k].shape == cond[k].shape for k in cond)
    assert null["mask"].all()
    if not learned_null:
        assert torch.count_nonzero(null["pooled"]) == 0 and torch.count_nonzero(null["tokens"]) == 0
    net.train()
    dropped = net(z, t, cond)
    net.eval()
    assert torch.allclose(dropped, net(z, t, null), atol=1e-6)


def test_mask_hides_padded_tokens():
    net = randomize(MMDiT(**TINY, qk_norm=True)).eval()
    z, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), make_cond()
    full = net(z, t, cond)
    assert torch.allclose(net(z, t, dict(cond, mask=torch.ones(2, 7, dtype=torch.bool))), full, atol=1e-6)
    cond["mask"] = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    base = net(z, t, cond)
    changed = dict(cond, tokens=cond["tokens"].clone())
    changed["tokens"][0, 4:] = torch.randn(3, 20) * 10
    assert torch.allclose(net(z, t, changed), base, atol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        net(z, t, dict(cond, mask=cond["mask"].float()))


@pytest.mark.parametrize("three_sets", [False, True])
def test_bf16_autocast_forward_backward_finite(three_sets):
    extra = dict(context_dim_2=6) if three_sets else {}
    net = randomize(MMDiT(**TINY, qk_norm=True, **extra)).train()
    z, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = make_cond(length_2=3, **extra)
    cond["mask"] = torch.tensor([[True] * 5 + [False] * 2, [True] * 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(z, t, cond)
        loss = (out.float() - z).pow(2).mean()
    loss.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bf16_weights_accept_fp32_inputs():
    net = randomize(MMDiT(**TINY)).to(torch.bfloat16).eval()
    out = net(torch.randn(2, 4, 8, 8), torch.rand(2), make_cond())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_gradient_checkpointing_same_gradients():
    a = randomize(MMDiT(**TINY)).eval()
    b = randomize(MMDiT(**TINY, gradient_checkpointing=True)).eval()
    z, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), make_cond()
    a(z, t, cond).square().sum().backward()
    b(z, t, cond).square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    net = MMDiT(**TINY, qk_norm=True, cond_drop_prob=0.0)
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.rand(4)
    zt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps  # rectified-flow path, t = 1 noise
    target, cond = eps - x0, make_cond(4)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = (net(zt, t, cond) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]  # typically ~0.014x after 50 steps


def test_bad_cond_errors():
    net = MMDiT(**TINY)
    z, t = torch.randn(1, 4, 8, 8), torch.rand(1)
    with pytest.raises(TypeError, match="dict"):
        net(z, t, None)
    with pytest.raises(KeyError, match="pooled"):
        net(z, t, {"tokens": torch.randn(1, 3, 20)})
    with pytest.raises(ValueError, match="tokens"):
        net(z, t, make_cond(1, context_dim=21))


def test_block_standalone():
    block = MMDiTBlock(32, 2, num_text_streams=2, text_pre_only=True)
    x, ctx = block(torch.randn(2, 6, 32), [torch.randn(2, 3, 32), torch.randn(2, 4, 32)], torch.randn(2, 32))
    assert x.shape == (2, 6, 32) and ctx is None


def test_all_masked_text_means_image_only_attention():
    net = randomize(MMDiT(**TINY)).eval()
    z, t, cond = torch.randn(2, 4, 8, 8), torch.rand(2), make_cond()
    cond["mask"] = torch.zeros(2, 7, dtype=torch.bool)
    out = net(z, t, cond)
    assert torch.isfinite(out).all()
    assert torch.allclose(net(z, t, dict(cond, tokens=cond["tokens"] * 3)), out, atol=1e-5)


def test_three_sets_second_stream_from_the_first_streams_tokens():
    """tokens_2_source='tokens' (data with one text encoder) is the 3-sets model given tokens_2 = tokens, mask_2 = mask."""
    torch.manual_seed(0)
    net = randomize(MMDiT(**TINY, context_dim_2=20, tokens_2_source="tokens")).eval()
    cond = make_cond(2)
    cond["mask"] = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    z, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        implicit = net(z, t, cond)
        explicit = net(z, t, {**cond, "tokens_2": cond["tokens"], "mask_2": cond["mask"]})
        other = net(z, t, {**cond, "tokens_2": torch.randn(2, 7, 20)})
    assert torch.equal(implicit, explicit) and not torch.allclose(implicit, other)
    null = net.null_condition(cond)
    assert set(null) == set(cond) and bool(null["mask"].all()) and not null["tokens"].any()  # same keys: guidance batches both
    with torch.no_grad():
        explicit_null = net.null_condition({**cond, "tokens_2": cond["tokens"], "mask_2": cond["mask"]})
        assert torch.equal(net(z, t, null), net(z, t, explicit_null))
    from flowmatch.objectives import RectifiedFlow
    from flowmatch.sampling.sampler import SamplerConfig

    model = RectifiedFlow(network=net)  # guided sampling batches cond and its null: they must have the same keys
    x, nfe = model.generate(2, SamplerConfig(steps=2, guidance=1.5), cond=cond, noise=torch.randn(2, 4, 8, 8))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all() and nfe == 4  # 2 steps x (conditional + unconditional pass)
    with pytest.raises(ValueError, match="learned_null is not supported"):
        MMDiT(**TINY, context_dim_2=20, tokens_2_source="tokens", learned_null=True)
    with pytest.raises(ValueError, match="only the 3-sets variant"):
        MMDiT(**TINY, tokens_2_source="tokens")
    with pytest.raises(ValueError, match="tokens_2_source must be None"):
        MMDiT(**TINY, context_dim_2=20, tokens_2_source="pooled")
