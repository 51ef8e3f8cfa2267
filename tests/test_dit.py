"""DiT (adaLN-Zero) and CrossDiT: shapes, identity at init, parameter counts, conditioning dropout, bf16."""

import numpy as np
import pytest
import torch

from helpers_models import randomize
from flowmatch.networks.crossdit import CrossDiT
from flowmatch.networks.dit import DIT_SIZES, DiT
from flowmatch.networks.layers import count_parameters, sincos_pos_embed_2d

TINY = dict(size=None, depth=2, hidden_size=32, num_heads=2, in_channels=4, input_size=8, patch_size=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_shape_zero_output_and_identity_blocks_at_init():
    torch.manual_seed(0)
    net = DiT(**TINY, num_classes=10)
    z, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.randint(0, 10, (3,))
    seen = []
    hooks = [b.register_forward_hook(lambda m, inp, out: seen.append(torch.equal(inp[0], out))) for b in net.blocks]
    out = net(z, t, y)
    assert out.shape == z.shape and out.dtype == z.dtype
    assert torch.count_nonzero(out) == 0  # zero final layer: output exactly 0
    assert seen == [True, True]  # adaLN-Zero: every block is the identity
    for h in hooks:
        h.remove()


def test_nonsquare_smaller_latent_uses_centre_crop():
    net = randomize(DiT(**TINY))
    assert net(torch.randn(2, 4, 4, 6), torch.rand(2)).shape == (2, 4, 4, 6)
    with pytest.raises(ValueError, match="exceeds the position table"):
        net(torch.randn(1, 4, 10, 8), torch.rand(1))


def test_pos_table_matches_mae_numpy_reference():
    def ref_1d(dim, pos):  # MAE / DiT numpy code
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, n = 16, 5
    grid = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32))  # w goes first
    ref = np.concatenate([ref_1d(dim // 2, grid[0]), ref_1d(dim // 2, grid[1])], axis=1)
    assert np.allclose(sincos_pos_embed_2d(dim, n).numpy(), ref, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_classes=10), dict(pooled_dim=12, learned_null=True), dict(qk_norm=True, out_channels=8), dict()],
)
def test_meta_device_count_equals_the_built_network(kwargs):
    net = DiT(**TINY, **kwargs)
    assert count_parameters(DiT, **TINY, **kwargs) == net.num_params() == sum(p.numel() for p in net.parameters())


def test_named_sizes():
    assert DIT_SIZES["XL"] == (28, 1152, 16)
    net = DiT.from_name("DiT-S/4", depth=1)  # explicit depth overrides the named size
    assert (net.depth, net.hidden_size, net.num_heads, net.patch_size) == (1, 384, 6, 4)
    assert net.num_params() == count_parameters(DiT, size=None, depth=1, hidden_size=384, num_heads=6, patch_size=4)
    with pytest.raises(ValueError, match="unknown DiT size"):
        DiT(size="M")


def test_label_dropout_rate_and_null():
    net = DiT(**TINY, num_classes=10, cond_drop_prob=0.1)
    y = torch.randint(0, 10, (20000,))
    net.train()
    dropped = (net.drop_condition(y) == 10).float().mean().item()
    assert abs(dropped - 0.1) < 0.015
    net.eval()
    assert torch.equal(net.drop_condition(y), y)
    assert torch.equal(net.null_condition(y[:4]), torch.full((4,), 10))


@pytest.mark.parametrize("learned_null", [False, True])
def test_pooled_dropout_and_null(learned_null):
    net = randomize(DiT(**TINY, pooled_dim=12, cond_drop_prob=0.3, learned_null=learned_null))
    pooled = torch.randn(10000, 12)
    null = net.null_condition(pooled)
    assert null.shape == pooled.shape
    if not learned_null:
        assert torch.count_nonzero(null) == 0
    net.train()
    is_null = (net.drop_condition(pooled) == null).all(dim=1).float().mean().item()
    assert abs(is_null - 0.3) < 0.02
    net.eval()
    assert torch.equal(net.drop_condition(pooled), pooled)


def test_training_dropout_all_equals_null_condition():
    net = randomize(DiT(**TINY, pooled_dim=12, cond_drop_prob=1.0, learned_null=True))
    z, t, pooled = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 12)
    net.train()
    dropped = net(z, t, pooled)
    net.eval()
    assert torch.allclose(dropped, net(z, t, net.null_condition(pooled)), atol=1e-6)
    assert not torch.allclose(dropped, net(z, t, pooled), atol=1e-3)


@pytest.mark.parametrize("cls", [DiT, CrossDiT])
def test_bf16_autocast_forward_backward_finite(cls):
    kwargs = dict(num_classes=10) if cls is DiT else dict(pooled_dim=12, context_dim=20)
    net = randomize(cls(**TINY, qk_norm=True, **kwargs)).train()
    z, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = torch.tensor([1, 2]) if cls is DiT else {"pooled": torch.randn(2, 12), "tokens": torch.randn(2, 7, 20)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(z, t, cond)
        loss = (out.float() - z).pow(2).mean()
    loss.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_crossdit_shape_identity_and_mask():
    torch.manual_seed(0)
    net = CrossDiT(**TINY, pooled_dim=12, context_dim=20)
    z, t = torch.randn(2, 4, 8, 6), torch.rand(2)
    cond = {"pooled": torch.randn(2, 12), "tokens": torch.randn(2, 7, 20), "mask": torch.ones(2, 7, dtype=torch.bool)}
    seen = []
    for b in net.blocks:
        b.register_forward_hook(lambda m, inp, out: seen.append(torch.equal(inp[0], out)))
    out = net(z, t, cond)
    assert out.shape == z.shape and torch.count_nonzero(out) == 0 and seen == [True, True]

    randomize(net).eval()
    cond["mask"][0, 4:] = False
    base = net(z, t, cond)
    changed = dict(cond, tokens=cond["tokens"].clone())
    changed["tokens"][0, 4:] += 5.0  # masked tokens of sample 0 must not matter
    assert torch.allclose(net(z, t, changed), base, atol=1e-6)
    changed["tokens"][0, 0] += 5.0
    assert not torch.allclose(net(z, t, changed)[0], base[0], atol=1e-4)


def test_crossdit_dropout_and_null():
    net = CrossDiT(**TINY, pooled_dim=12, context_dim=20, cond_drop_prob=0.463)
    n = 4000
    cond = {"pooled": torch.randn(n, 12), "tokens": torch.randn(n, 3, 20), "mask": torch.rand(n, 3) > 0.5}
    null = net.null_condition(cond)
    assert torch.count_nonzero(null["pooled"]) == 0 and torch.count_nonzero(null["tokens"]) == 0 and null["mask"].all()
    net.train()
    out = net.drop_condition(cond)
    p_drop = (out["pooled"] == 0).all(1).float().mean().item()
    t_drop = (out["tokens"] == 0).flatten(1).all(1)
    assert abs(p_drop - 0.463) < 0.04 and abs(t_drop.float().mean().item() - 0.463) < 0.04
    assert out["mask"][t_drop].all()  # a dropped stream's null tokens are all visible
    net.eval()
    assert net.drop_condition(cond)["tokens"] is cond["tokens"]
    with pytest.raises(KeyError, match="tokens"):
        net(torch.randn(1, 4, 8, 8), torch.rand(1), {"pooled": torch.randn(1, 12)})


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = randomize(DiT(**TINY, num_classes=10))
    b = randomize(DiT(**TINY, num_classes=10, gradient_checkpointing=True))
    a.eval(), b.eval()
    z, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    a(z, t, y).square().sum().backward()
    b(z, t, y).square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5)



def test_text_condition_dict_uses_the_pooled_vector():
    """On latent/caption shards a DiT gets the text dict {"pooled", "tokens", "mask"}: it conditions on the pooled vector only."""
    torch.manual_seed(0)
    net = DiT(size=None, depth=2, hidden_size=64, num_heads=2, in_channels=16, input_size=8, pooled_dim=384).eval()
    for p in net.parameters():  # leave adaLN-Zero's zero start so the condition matters
        torch.nn.init.normal_(p, std=0.05)
    z, t = torch.randn(3, 16, 8, 8), torch.rand(3)
    cond = {"pooled": torch.randn(3, 384), "tokens": torch.randn(3, 5, 384), "mask": torch.ones(3, 5, dtype=torch.bool)}
    assert torch.equal(net(z, t, cond), net(z, t, cond["pooled"]))
    null = net.null_condition(cond)
    assert sorted(null) == ["mask", "pooled", "tokens"] and torch.equal(null["pooled"], torch.zeros(3, 384))
    assert not torch.allclose(net(z, t, null), net(z, t, cond))
    labels = DiT(size=None, depth=1, hidden_size=64, num_heads=2, in_channels=16, input_size=8, num_classes=10)
    with pytest.raises(ValueError, match="must carry 'pooled'"):
        labels(z, t, cond)
