"""Parameter counts come from building the network on the meta device (no memory, no formula to drift).

The published sizes pin them: SD3's MM-DiT at depth 24 and 38 (Esser et al. 2024, in this platform's
layout and in diffusers' layout, which keeps the last block's unused text query) and DiT-XL/2 (Peebles &
Xie 2023, the number its repository prints).
"""

import time

import pytest
import torch

from flowmatch.networks.crossdit import CrossDiT
from flowmatch.networks.dit import DiT
from flowmatch.networks.layers import count_parameters
from flowmatch.networks.mlp import MLPVelocity
from flowmatch.networks.mmdit import MMDiT
from flowmatch.networks.sd3_import import sd3_unused_query_params

SD3 = dict(in_channels=16, patch_size=2, pooled_dim=2048, context_dim=4096)  # hidden 64 * depth, heads = depth


def test_sd3_published_sizes():
    """Ours (the last block's text stream has no query): depth 24: 2,025,967,168; depth 38: 8,050,700,736.
    diffusers' layout: 2,028,328,000 (exactly SD3Transformer2DModel at SD3-Medium settings, see
    test_sd3_import) and 8,056,617,792. Paper: depth 24 ~ 2B, depth 38 ~ 8B."""
    start = time.perf_counter()
    depth24, depth38 = count_parameters(MMDiT, 24, **SD3), count_parameters(MMDiT, 38, **SD3)
    assert time.perf_counter() - start < 30  # nothing is allocated: seconds, not the minutes 40 GB of weights would take
    assert depth24 == 2_025_967_168
    assert depth38 == 8_050_700_736
    assert depth24 + sd3_unused_query_params(1536, 24) == 2_028_328_000
    assert depth38 + sd3_unused_query_params(2432, 38) == 8_056_617_792


def test_dit_xl2_published_size():
    """DiT-XL/2 as in the paper (4-channel SD-VAE latents, learned sigma -> 8 output channels, 1000 classes, 256
    tokens): its repository reports 675,129,632 parameters, which include the 256 x 1152 position table it
    stores as a (frozen) parameter; ours is a buffer, rebuilt rather than saved."""
    with torch.device("meta"):
        net = DiT.from_name("DiT-XL/2", in_channels=4, out_channels=8, num_classes=1000, input_size=32)
    assert net.pos_embed.table.shape == (256, 1152)
    assert net.num_params() + net.pos_embed.table.numel() == 675_129_632
    assert count_parameters(DiT.from_name, "DiT-XL/2", in_channels=4, out_channels=8, num_classes=1000) == net.num_params()


def test_meta_count_allocates_nothing():
    with torch.device("meta"):
        net = CrossDiT(size="XL", pooled_dim=2048, context_dim=4096)
    assert all(p.is_meta for p in net.parameters())
    n = count_parameters(CrossDiT, size="XL", pooled_dim=2048, context_dim=4096)
    assert n == net.num_params() and 0.5e9 < n < 1.5e9


@pytest.mark.parametrize("build", [
    lambda: DiT(size=None, depth=2, hidden_size=32, num_heads=2, num_classes=10, input_size=8),
    lambda: CrossDiT(size=None, depth=2, hidden_size=32, num_heads=2, pooled_dim=0, context_dim=8, input_size=8, learned_null=True),
    lambda: MMDiT(depth=2, hidden_size=32, num_heads=2, pooled_dim=6, context_dim=8, context_dim_2=4, qk_norm=True, pos_embed_max_size=8),
    lambda: MLPVelocity(dim=2, hidden=8, depth=2, time_dim=4, num_classes=3),
])
def test_meta_count_equals_the_real_network(build):
    assert count_parameters(build) == sum(p.numel() for p in build().parameters())
