"""Every configs/model/*.yaml parses through jsonargparse into its class, the way experiments use it.

An experiment names a network config by path (``model.init_args.network: ../configs/model/X.yaml``);
the tests parse each file that way. Big models are built on the meta device (no memory) and their
parameter counts checked against the papers (DiT Table 1, SD3 §5). The tiny MM-DiT is built inside a
RectifiedFlow objective and run forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from flowmatch.networks.dit import DiT
from flowmatch.networks.layers import count_parameters
from flowmatch.networks.mmdit import MMDiT

MODEL_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
TRANSFORMERS = {
    "dit_s2": ("flowmatch.networks.dit.DiT", 33e6),
    "dit_b2": ("flowmatch.networks.dit.DiT", 130e6),
    "dit_l2": ("flowmatch.networks.dit.DiT", 458e6),
    "dit_xl2": ("flowmatch.networks.dit.DiT", 675e6),
    "mmdit_depth2": ("flowmatch.networks.mmdit.MMDiT", 1.2e6),
    "mmdit_depth16": ("flowmatch.networks.mmdit.MMDiT", 0.6e9),
    "mmdit_depth24": ("flowmatch.networks.mmdit.MMDiT", 2.0e9),
    "mmdit_depth38": ("flowmatch.networks.mmdit.MMDiT", 8.0e9),
    "mmdit3_depth16": ("flowmatch.networks.mmdit.MMDiT", 0.88e9),
    "crossdit_depth16": ("flowmatch.networks.crossdit.CrossDiT", None),
    "flux_demo": ("flowmatch.networks.flux.FLUX", 9.24e6),
    "flux_small": ("flowmatch.networks.flux.FLUX", None),
}


@pytest.fixture(scope="module")
def parse(tmp_path_factory):
    """parse(config path) -> the jsonargparse namespace of the network inside a RectifiedFlow model, plus the parser."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from flowmatch.objectives.base import FlowObjective

    parser = ArgumentParser(exit_on_error=False, parser_mode="omegaconf+")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(FlowObjective, "model", fail_untyped=False)
    tmp = tmp_path_factory.mktemp("experiments")

    def _parse(path: Path):
        exp = tmp / f"{path.stem}.yaml"
        exp.write_text(yaml.safe_dump({"model": {"class_path": "flowmatch.objectives.RectifiedFlow", "init_args": {"network": str(path)}}}))
        return parser, parser.parse_args(["--config", str(exp)])

    return _parse


def build_on_meta(net_cfg) -> torch.nn.Module:
    """The network of a parsed config, built on the meta device (sizes and parameter counts, no memory)."""
    from jsonargparse import ArgumentParser

    p = ArgumentParser(exit_on_error=False)
    p.add_subclass_arguments(torch.nn.Module, "network")
    with torch.device("meta"):
        return p.instantiate_classes(p.parse_object({"network": {"class_path": net_cfg.class_path, "init_args": vars(net_cfg.init_args)}})).network


def test_every_model_config_is_covered():
    names = {p.stem for p in MODEL_DIR.glob("*.yaml")}
    assert set(TRANSFORMERS) <= names, sorted(set(TRANSFORMERS) - names)


@pytest.mark.parametrize("path", sorted(MODEL_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_parses_into_its_class(parse, path):
    text = path.read_text()
    assert text.startswith("# "), f"{path.name} must start with a comment line saying what it is"
    _, cfg = parse(path)
    net = cfg.model.init_args.network
    if path.stem in TRANSFORMERS:
        assert net.class_path == TRANSFORMERS[path.stem][0]
        assert net.init_args.in_channels == 16 and net.init_args.patch_size == 2
        assert net.init_args.pooled_dim == 384
        if hasattr(net.init_args, "context_dim"):
            assert net.init_args.context_dim == 384


@pytest.mark.parametrize("name", [n for n in TRANSFORMERS if n.startswith("dit")])
def test_dit_sizes(parse, name):
    _, cfg = parse(MODEL_DIR / f"{name}.yaml")
    size = {"dit_s2": "S", "dit_b2": "B", "dit_l2": "L", "dit_xl2": "XL"}[name]
    assert cfg.model.init_args.network.init_args.size == size
    assert build_on_meta(cfg.model.init_args.network).num_params() == pytest.approx(TRANSFORMERS[name][1], rel=0.01)
    # the paper's own class-conditional ImageNet setting (4-channel latents, learned sigma) gives the paper's number
    paper = count_parameters(DiT, size=size, patch_size=2, in_channels=4, out_channels=8, num_classes=1000)
    assert paper == pytest.approx(TRANSFORMERS[name][1], rel=0.01)


@pytest.mark.parametrize("name", [n for n in TRANSFORMERS if n.startswith("mmdit")])
def test_mmdit_sizes(parse, name):
    _, cfg = parse(MODEL_DIR / f"{name}.yaml")
    args = cfg.model.init_args.network.init_args
    assert args.hidden_size is None and args.num_heads is None  # depth-parameterised: 64 * depth, depth heads
    net = build_on_meta(cfg.model.init_args.network)
    assert (net.hidden_size, net.num_heads) == (64 * args.depth, args.depth)
    assert net.num_params() == pytest.approx(TRANSFORMERS[name][1], rel=0.03)
    assert (args.context_dim_2 is not None) == name.startswith("mmdit3")


def test_crossdit_size_on_meta_device(parse):
    """CrossDiT depth 16 at MM-DiT depth 16's width: ~ the size of MM-DiT depth 16, with one weight set per block."""
    _, cfg = parse(MODEL_DIR / "crossdit_depth16.yaml")
    net = build_on_meta(cfg.model.init_args.network)
    assert (net.depth, net.hidden_size, net.num_heads) == (16, 1024, 16)
    n = net.num_params()
    assert 0.3e9 < n < count_parameters(MMDiT, 16, pooled_dim=384, context_dim=384)  # one weight set per block, not two


def test_tiny_mmdit_instantiates_and_runs(parse):
    torch.manual_seed(0)
    parser, cfg = parse(MODEL_DIR / "mmdit_depth2.yaml")
    model = parser.instantiate_classes(cfg).model
    net = model.net
    assert isinstance(net, MMDiT) and (net.depth, net.hidden_size, net.num_heads) == (2, 128, 2)
    assert net.num_params() == count_parameters(MMDiT, **vars(cfg.model.init_args.network.init_args))
    b = 2
    z, t = torch.randn(b, 16, 8, 6), torch.rand(b)
    cond = {"pooled": torch.randn(b, 384), "tokens": torch.randn(b, 7, 384)}
    model.train()
    loss = model.loss_per_sample(z, t, torch.randn_like(z), cond).mean()
    loss.backward()
    assert torch.isfinite(loss)
    net.eval()
    with torch.no_grad():
        out = net(z, t, cond)
    assert out.shape == z.shape and torch.isfinite(out).all()

