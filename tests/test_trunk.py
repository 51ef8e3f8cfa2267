"""The patch-transformer trunk: a new backbone is a file of blocks plus a short class, and the three
backbones built on it keep the parameter names, order and initial weights of their checkpoints."""

import pytest
import torch
from torch import nn

from helpers_models import randomize
from flowmatch.networks.conditioning import ConditioningSpec
from flowmatch.networks.crossdit import CrossDiT
from flowmatch.networks.dit import DiT
from flowmatch.networks.layers import Mlp, VectorEmbedder, modulate
from flowmatch.networks.mmdit import MMDiT
from flowmatch.networks.trunk import PatchTransformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class MlpBlock(nn.Module):
    """A fourth backbone's block: an adaLN-modulated MLP on each token, no attention."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, 2 * hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))

    def forward(self, x, c):
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        return x + gate.unsqueeze(1) * self.mlp(modulate(self.norm(x), shift, scale))


class PooledMlpNet(PatchTransformer):
    """The whole backbone: its sizes, its condition embedder, its blocks."""

    def __init__(self, depth=2, hidden_size=32, in_channels=4, patch_size=2, pooled_dim=6, gradient_checkpointing=False):
        super().__init__(in_channels=in_channels, out_channels=None, patch_size=patch_size, depth=depth, hidden_size=hidden_size,
                         num_heads=1, pos_embed_max_size=8, table_arg="pos_embed_max_size=8",
                         gradient_checkpointing=gradient_checkpointing)
        self.pooled_dim = pooled_dim
        self.y_embedder = VectorEmbedder(pooled_dim, hidden_size)
        self.add_blocks(MlpBlock(hidden_size) for _ in range(depth))

    @property
    def conditioning(self):
        return ConditioningSpec(pooled_dim=self.pooled_dim)

    def embed_condition(self, cond, x, grid):
        return self.y_embedder(cond), None


def test_a_new_backbone_is_blocks_plus_a_short_class():
    torch.manual_seed(0)
    net = PooledMlpNet()
    z, t, pooled = torch.randn(3, 4, 8, 6), torch.rand(3), torch.randn(3, 6)
    out = net(z, t, pooled)
    assert out.shape == z.shape and torch.count_nonzero(out) == 0  # zero final layer, identity blocks (adaLN-Zero)
    assert all(torch.count_nonzero(b.adaLN_modulation[-1].weight) == 0 for b in net.blocks)
    tops = list(dict.fromkeys(n.split(".")[0] for n, _ in net.named_parameters()))
    assert tops == ["x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer"]
    randomize(net)
    assert not torch.allclose(net(z, t, pooled), net(z, t, pooled + 1))
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        net(torch.randn(1, 4, 18, 8), torch.rand(1), torch.randn(1, 6))


def test_the_trunk_checkpoints_any_backbones_blocks():
    a = randomize(PooledMlpNet()).train()
    b = randomize(PooledMlpNet(gradient_checkpointing=True)).train()
    z, t, pooled = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 6)
    a(z, t, pooled).square().sum().backward()
    b(z, t, pooled).square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


DIT = dict(size=None, depth=2, hidden_size=32, num_heads=2, in_channels=4, input_size=8, patch_size=2)
MMDIT = dict(depth=3, hidden_size=32, num_heads=2, in_channels=4, pooled_dim=12, context_dim=20, pos_embed_max_size=8)
BUILD = {
    "dit_labels": lambda: DiT(**DIT, num_classes=10, qk_norm=True),
    "mmdit": lambda: MMDiT(**MMDIT, qk_norm=True),
    "crossdit": lambda: CrossDiT(**DIT, pooled_dim=12, context_dim=20, qk_norm=True),
}
# The modules holding parameters, in creation order (the order of checkpoints' tensors and of the optimizer's
# state), outside the blocks and in the first block: as the backbones had them before the trunk.
OUTER = {
    "dit_labels": ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.embedding_table",
                   "final_layer.adaLN_modulation.1", "final_layer.linear"],
    "mmdit": ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
              "context_embedders.0", "final_layer.adaLN_modulation.1", "final_layer.linear"],
    "crossdit": ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
                 "context_embedder", "final_layer.adaLN_modulation.1", "final_layer.linear"],
}
FIRST_BLOCK = {
    "dit_labels": ["attn.qkv", "attn.q_norm", "attn.k_norm", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"],
    "mmdit": ["text.0.adaLN_modulation.1", "text.0.k_norm", "text.0.qkv", "text.0.q_norm", "text.0.proj", "text.0.mlp.fc1",
              "text.0.mlp.fc2", "image.adaLN_modulation.1", "image.k_norm", "image.qkv", "image.q_norm", "image.proj",
              "image.mlp.fc1", "image.mlp.fc2"],
    "crossdit": ["attn.qkv", "attn.q_norm", "attn.k_norm", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.q_norm",
                 "cross_attn.k_norm", "cross_attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"],
}
# sum_i w_i cos(i) over every initial tensor at torch.manual_seed(0), measured with the backbones as they were
# before the trunk: the same modules are created and initialised in the same order (a torch release that
# changed its CPU random numbers would move these, and nothing else would).
INIT_SIGNATURE = {"dit_labels": 28.252679144874975, "mmdit": 46.0020328901848, "crossdit": -0.07323641260957992}


def _modules_of(names: list[str]) -> list[str]:
    """The distinct modules of parameter names, in order of first appearance."""
    return list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_parameter_names_and_order_are_the_checkpoints(kind):
    names = [n for n, _ in BUILD[kind]().named_parameters()]
    assert _modules_of([n for n in names if not n.startswith("blocks.")]) == OUTER[kind]
    assert _modules_of([n[len("blocks.0."):] for n in names if n.startswith("blocks.0.")]) == FIRST_BLOCK[kind]


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_initial_weights_for_a_seed_are_unchanged(kind):
    torch.manual_seed(0)
    state = BUILD[kind]().state_dict()
    signature = sum(float((v.double().flatten() * torch.cos(torch.arange(v.numel(), dtype=torch.float64))).sum()) for v in state.values())
    assert signature == pytest.approx(INIT_SIGNATURE[kind], rel=1e-12, abs=1e-12)
