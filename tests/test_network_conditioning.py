"""Every network declares what it is conditioned on (``conditioning``), its ``in_channels`` and ``patch_size``;
``check_fits`` compares that with what the data provides and names both sides of every mismatch."""

import pytest
import torch

from flowmatch.networks.conditioning import (
    ConditioningMismatchError,
    ConditioningSpec,
    TokenStream,
    check_fits,
    fit_problems,
)
from flowmatch.networks.crossdit import CrossDiT
from flowmatch.networks.dit import DiT
from flowmatch.networks.mlp import MLPVelocity
from flowmatch.networks.mmdit import MMDiT

DIT = dict(size=None, depth=1, hidden_size=32, num_heads=2, in_channels=4, input_size=8, patch_size=2)
MMDIT = dict(depth=2, hidden_size=32, num_heads=2, in_channels=4, pooled_dim=12, context_dim=20, pos_embed_max_size=8)
TEXT = ConditioningSpec.text(pooled_dim=12, context_dim=20, context_length=7)  # what latent/caption shards provide


def test_specs_of_every_network():
    assert MLPVelocity(dim=2, num_classes=3).conditioning == ConditioningSpec(num_classes=3)
    assert MLPVelocity(dim=2).conditioning.kind == "none"
    assert (MLPVelocity(dim=5).in_channels, MLPVelocity(dim=5).patch_size) == (5, 1)
    assert DiT(**DIT, num_classes=10).conditioning == ConditioningSpec(num_classes=10)
    assert DiT(**DIT, pooled_dim=12).conditioning == ConditioningSpec(pooled_dim=12)  # of a text dict it reads "pooled" only
    assert DiT(**DIT).conditioning.kind == "none"
    assert CrossDiT(**DIT, pooled_dim=0, context_dim=20, max_text_tokens=9).conditioning == ConditioningSpec(
        token_streams=(TokenStream("tokens", 20, 9, "mask"),))
    assert MMDiT(**MMDIT).conditioning == ConditioningSpec(pooled_dim=12, token_streams=(TokenStream("tokens", 20, None),))
    three = MMDiT(**MMDIT, context_dim_2=6, max_text_tokens_2=5).conditioning
    assert three.token_streams == (TokenStream("tokens", 20, None, "mask"), TokenStream("tokens_2", 6, 5, "mask_2"))
    for net in (DiT(**DIT), MMDiT(**MMDIT), CrossDiT(**DIT, context_dim=20)):
        assert (net.in_channels, net.patch_size) == (4, 2)


def test_second_stream_from_tokens_reads_only_tokens():
    """With tokens_2_source the 3-sets model reads cond["tokens"] twice: its spec lists that one stream, with the stricter limit."""
    net = MMDiT(**MMDIT, context_dim_2=20, tokens_2_source="tokens", max_text_tokens=9, max_text_tokens_2=7)
    assert net.conditioning.token_streams == (TokenStream("tokens", 20, 7, "mask"),)
    assert fit_problems(net.conditioning, TEXT) == []  # one-encoder data fits
    long = ConditioningSpec.text(12, 20, context_length=8)
    assert fit_problems(net.conditioning, long) == ["the data's tokens are 8 tokens long, the network accepts at most 7"]
    with pytest.raises(ValueError, match="context_dim_2 must equal it"):
        MMDiT(**MMDIT, context_dim_2=6, tokens_2_source="tokens")


def test_fitting_networks_pass():
    check_fits(MMDiT(**MMDIT), TEXT, (4, 8, 8))
    check_fits(CrossDiT(**DIT, pooled_dim=12, context_dim=20), TEXT, (4, 6, 8))
    check_fits(DiT(**DIT, pooled_dim=12), TEXT, (4, 8, 8))  # text data: the DiT reads its pooled vector only
    check_fits(DiT(**DIT, num_classes=10), ConditioningSpec(num_classes=10), (4, 8, 8))
    check_fits(MLPVelocity(dim=2, num_classes=3), ConditioningSpec(num_classes=3), (2,))
    check_fits(MLPVelocity(dim=2), ConditioningSpec(), (2,))


def test_text_data_is_conditional():
    assert TEXT.is_conditional and TEXT.kind == "text"
    with pytest.raises(ConditioningMismatchError, match="provides text"):
        check_fits(MLPVelocity(dim=2, num_classes=3), TEXT)


@pytest.mark.parametrize("net, data, shape, expected", [
    (lambda: MMDiT(**MMDIT), ConditioningSpec.text(12, 384, 7), None,
     "the network's tokens width (context_dim) is 20 but shard set X's is 384"),
    (lambda: MMDiT(**MMDIT), ConditioningSpec.text(16, 20, 7), None,
     "the network's pooled_dim is 12 but shard set X's pooled vector has 16"),
    (lambda: MMDiT(**MMDIT, context_dim_2=6), TEXT, None,
     "the network reads cond['tokens_2'] but shard set X has no such token stream"),
    (lambda: CrossDiT(**DIT, context_dim=20, max_text_tokens=5), TEXT, None,
     "shard set X's tokens are 7 tokens long, the network accepts at most 5"),
    (lambda: DiT(**DIT, num_classes=10), TEXT, None,
     "the network is class-conditional (10 classes) but shard set X provides text (pooled 12, tokens 7 x 20)"),
    (lambda: DiT(**DIT, num_classes=10), ConditioningSpec(num_classes=12), None, "shard set X has 12 classes, the network only 10"),
    (lambda: DiT(**DIT), ConditioningSpec(num_classes=3), None, "shard set X provides class labels but the network is unconditional"),
    (lambda: MMDiT(**MMDIT), TEXT, (16, 8, 8), "the network's in_channels is 4 but shard set X's samples have shape (16, 8, 8)"),
    (lambda: DiT(**DIT, pooled_dim=12), TEXT, (4, 7, 8), "shard set X's latent size 7x8 is not divisible by the network's patch_size 2"),
    (lambda: MLPVelocity(dim=2), ConditioningSpec(), (3,), "the network's in_channels is 2 but shard set X's samples have shape (3,)"),
])
def test_a_mismatch_names_both_sides(net, data, shape, expected):
    network = net()
    with pytest.raises(ConditioningMismatchError) as err:
        check_fits(network, data, shape, data_name="shard set X")
    message = str(err.value)
    assert expected in message and type(network).__name__ in message, message


def test_spec_matches_what_forward_accepts():
    """The spec is not a second description that can drift: data built from it runs through the network."""
    torch.manual_seed(0)
    for net in (MMDiT(**MMDIT, context_dim_2=6), CrossDiT(**DIT, pooled_dim=12, context_dim=20), DiT(**DIT, pooled_dim=12)):
        spec = net.conditioning
        cond = {"pooled": torch.randn(2, spec.pooled_dim)} if spec.pooled_dim else {}
        for s in spec.token_streams:
            cond[s.key] = torch.randn(2, s.max_length or 3, s.width)
            cond[s.mask_key] = torch.ones(2, s.max_length or 3, dtype=torch.bool)
        assert net.eval()(torch.randn(2, 4, 8, 8), torch.rand(2), cond).shape == (2, 4, 8, 8)
