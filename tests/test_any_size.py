"""Several resolutions and aspect ratios in one run (issue 15), network side: MM-DiT, DiT (pooled text or class
labels) and FLUX each take a training step (forward + backward, RectifiedFlow with FLUX's shift read per batch) on a
non-square latent batch and on a square one with the same weights; a latent beyond the position table is refused
naming the argument that sets it (pos_embed_max_size / input_size); FLUX (RoPE, no table) takes any even size."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.networks.dit import DiT
from flowmatch.networks.flux import FLUX
from flowmatch.networks.mmdit import MMDiT
from flowmatch.objectives import RectifiedFlow
from flowmatch.time_samplers import LogitNormalTime
from flowmatch.time_shift import FluxShift, sampling_shift

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),  # tests/conftest.py
              pytest.mark.filterwarnings("ignore:You are trying to")]  # training_step without a Trainer

C = 16  # latent channels, as SD3's and FLUX's VAEs
TEXT = dict(pooled_dim=12, context_dim=20)


def text_cond(b: int) -> dict:
    return {"pooled": torch.randn(b, 12), "tokens": torch.randn(b, 5, 20)}


NETS = {  # name: (network factory, condition of a batch of b); tables cover latents up to 16x16
    "mmdit": (lambda: MMDiT(depth=1, hidden_size=32, num_heads=2, in_channels=C, pos_embed_max_size=8, **TEXT), text_cond),
    "dit_pooled": (lambda: DiT(size=None, depth=1, hidden_size=32, num_heads=2, in_channels=C, input_size=16, pooled_dim=12),
                   lambda b: {"pooled": torch.randn(b, 12)}),
    "dit_class": (lambda: DiT(size=None, depth=1, hidden_size=32, num_heads=2, in_channels=C, input_size=16, num_classes=10),
                  lambda b: torch.randint(0, 10, (b,))),
    "flux": (lambda: FLUX(num_double_blocks=1, num_single_blocks=1, hidden_size=32, num_heads=2, in_channels=C, **TEXT), text_cond),
}


@pytest.mark.parametrize("name", NETS)
def test_a_training_step_on_a_non_square_and_a_square_batch_with_the_same_weights(name):
    make, cond = NETS[name]
    torch.manual_seed(0)
    net = make()
    shift = FluxShift(base_tokens=16, max_tokens=64)
    model = RectifiedFlow(net, time_sampler=LogitNormalTime(0.0, 1.0), time_shift=shift, lr=1e-3)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append((tuple(args[0].shape), args[1].detach().clone())))
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    for shape in [(3, C, 8, 16), (3, C, 12, 12)]:
        batch = {"x0": torch.randn(shape), "cond": cond(3)}
        optimizer.zero_grad()
        torch.manual_seed(5)
        loss = model.training_step(batch, 0)
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        optimizer.step()
        with torch.no_grad():  # the network's output has the batch's own shape
            assert net.eval()(batch["x0"], torch.rand(3), batch["cond"]).shape == shape
        net.train()
    # the time shift was read from each batch: 32 tokens, then 36
    assert [s for s, _ in seen[::2]] == [(3, C, 8, 16), (3, C, 12, 12)]
    for (shape, t), tokens in zip(seen[::2], (32, 36)):
        torch.manual_seed(5)
        base = LogitNormalTime(0.0, 1.0).sample(3)
        alpha = math.exp(0.5 + 0.65 * (tokens - 16) / 48)
        assert sampling_shift(shift, shape) == pytest.approx(alpha)
        torch.testing.assert_close(t, shift.apply(base, shape), rtol=0, atol=0)


@pytest.mark.parametrize("name, size, table", [("mmdit", (18, 16), "pos_embed_max_size=8"), ("dit_pooled", (8, 20), "input_size=16"),
                                               ("dit_class", (20, 20), "input_size=16")])
def test_a_latent_beyond_the_position_table_is_refused_naming_the_argument(name, size, table):
    make, cond = NETS[name]
    net = make()
    with pytest.raises(ValueError, match=rf"latent {size[0]}x{size[1]} .*exceeds the position table.*{table}.*latents up to 16x16"):
        net(torch.randn(2, C, *size), torch.rand(2), cond(2))
    assert net(torch.randn(2, C, 16, 2), torch.rand(2), cond(2)).shape == (2, C, 16, 2)  # the table's edge is fine


@pytest.mark.parametrize("size", [(2, 2), (6, 10), (2, 34), (40, 24)])
def test_flux_takes_any_even_size(size):
    make, cond = NETS["flux"]
    net = make().eval()
    with torch.no_grad():
        assert net(torch.randn(2, C, *size), torch.rand(2), cond(2)).shape == (2, C, *size)


def test_flux_refuses_an_odd_size_naming_the_patch_size():
    make, cond = NETS["flux"]
    with pytest.raises(ValueError, match=r"7x8 .*divisible by patch_size 2"):
        make()(torch.randn(2, C, 7, 8), torch.rand(2), cond(2))
