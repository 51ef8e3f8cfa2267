"""The contract every transformer backbone (DiT, MM-DiT with 2 and 3 weight sets, CrossDiT) honours.

- Batch equivariance (eval mode): permuting the samples of a batch permutes the outputs.
- Padding invariance: a prompt padded with extra tokens that the mask hides gives the same output
  (float32 rounding) as the prompt alone, also when the samples of one batch have different lengths;
  the padded text query rows of MM-DiT's joint attention stay finite.
- Bad input is refused with an error that says what was expected and what came: latent channels,
  patch divisibility, latent larger than the position table, too many text tokens, pooled / context
  dims, missing cond keys, time shape, class labels, and a state dict of another architecture.
"""

import re

import pytest
import torch

from helpers_models import randomize
from flowmatch.networks.crossdit import CrossDiT
from flowmatch.networks.dit import DiT
from flowmatch.networks.layers import NetworkStateError, load_network_state
from flowmatch.networks.mmdit import MMDiT

DIT = dict(size=None, depth=2, hidden_size=32, num_heads=2, in_channels=4, input_size=8, patch_size=2)
MMDIT = dict(depth=3, hidden_size=32, num_heads=2, in_channels=4, pooled_dim=12, context_dim=20, pos_embed_max_size=8)
CROSS = dict(DIT, pooled_dim=12, context_dim=20)
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def build(kind: str) -> torch.nn.Module:
    return randomize({
        "dit_labels": lambda: DiT(**DIT, num_classes=10),
        "dit_pooled": lambda: DiT(**DIT, pooled_dim=12),
        "mmdit": lambda: MMDiT(**MMDIT, qk_norm=True),
        "mmdit3": lambda: MMDiT(**MMDIT, context_dim_2=6),
        "crossdit": lambda: CrossDiT(**CROSS, qk_norm=True),
    }[kind]()).eval()


def make_inputs(kind: str, b: int = 4, seed: int = 0):
    """z, t, cond for a batch of b; text conditions carry masks with a different length per sample."""
    g = torch.Generator().manual_seed(seed)
    z, t = torch.randn(b, 4, 8, 6, generator=g), torch.rand(b, generator=g)
    if kind == "dit_labels":
        return z, t, torch.randint(0, 10, (b,), generator=g)
    if kind == "dit_pooled":
        return z, t, torch.randn(b, 12, generator=g)
    lengths = torch.arange(b) % 5 + 2  # 2..6 real tokens out of 7
    cond = {"pooled": torch.randn(b, 12, generator=g), "tokens": torch.randn(b, 7, 20, generator=g),
            "mask": torch.arange(7)[None] < lengths[:, None]}
    if kind == "mmdit3":
        cond["tokens_2"] = torch.randn(b, 5, 6, generator=g)
        cond["mask_2"] = torch.arange(5)[None] < (torch.arange(b) % 3 + 3)[:, None]
    return z, t, cond


def take(cond, idx):
    """The samples idx of a condition (tensor or dict of tensors)."""
    if isinstance(cond, dict):
        return {k: v[idx] for k, v in cond.items()}
    return cond[idx]


# ---- batch equivariance ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dit_labels", "dit_pooled", "mmdit", "mmdit3", "crossdit"])
def test_permuting_the_batch_permutes_the_outputs(kind):
    net = build(kind)
    z, t, cond = make_inputs(kind)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = net(z, t, cond)
        out_perm = net(z[perm], t[perm], take(cond, perm))
    assert torch.isfinite(out).all()
    assert torch.allclose(out_perm, out[perm], atol=ATOL), (out_perm - out[perm]).abs().max()
    # each sample's output depends on that sample only: a batch of one gives the same numbers
    with torch.no_grad():
        single = net(z[1:2], t[1:2], take(cond, slice(1, 2)))
    assert torch.allclose(single, out[1:2], atol=ATOL)


# ---- padding invariance ------------------------------------------------------------------------


def _strip(cond: dict, i: int) -> dict:
    """Sample i of a masked batch condition as a batch of one holding only its real tokens, no masks."""
    out = {"pooled": cond["pooled"][i : i + 1]}
    for key, mask_key in (("tokens", "mask"), ("tokens_2", "mask_2")):
        if key in cond:
            n = int(cond[mask_key][i].sum())
            assert cond[mask_key][i, :n].all()  # real tokens first, padding after
            out[key] = cond[key][i : i + 1, :n]
    return out


@pytest.mark.parametrize("kind", ["mmdit", "mmdit3", "crossdit"])
def test_padded_batch_equals_each_prompt_alone(kind):
    """Variable-length prompts padded (with large random junk) to one length and masked == each prompt unpadded."""
    net = build(kind)
    z, t, cond = make_inputs(kind)
    g = torch.Generator().manual_seed(5)
    for key, mask_key in (("tokens", "mask"), ("tokens_2", "mask_2")):
        if key in cond:  # whatever sits in the padding must not matter
            junk = torch.randn(cond[key].shape, generator=g) * 10
            cond[key] = torch.where(cond[mask_key][..., None], cond[key], junk)
    with torch.no_grad():
        batched = net(z, t, cond)
        for i in range(z.shape[0]):
            alone = net(z[i : i + 1], t[i : i + 1], _strip(cond, i))
            assert torch.allclose(batched[i : i + 1], alone, atol=ATOL), (kind, i, (batched[i] - alone[0]).abs().max())


@pytest.mark.parametrize("kind", ["mmdit", "mmdit3", "crossdit"])
def test_appending_masked_padding_changes_nothing(kind):
    net = build(kind)
    z, t, cond = make_inputs(kind, b=2)
    plain = {k: v for k, v in cond.items() if not k.startswith("mask")}  # all 7 (and 5) tokens real
    padded = dict(plain)
    for key, mask_key, extra in (("tokens", "mask", 9), ("tokens_2", "mask_2", 4)):
        if key in plain:
            b, n, d = plain[key].shape
            padded[key] = torch.cat([plain[key], torch.randn(b, extra, d) * 3], dim=1)
            padded[mask_key] = torch.arange(n + extra)[None].expand(b, -1) < n
    with torch.no_grad():
        with_padding, without = net(z, t, padded), net(z, t, plain)
    assert torch.allclose(with_padding, without, atol=ATOL), (with_padding - without).abs().max()


@pytest.mark.parametrize("kind", ["mmdit", "mmdit3"])
def test_mmdit_padded_text_rows_stay_finite(kind):
    """Padded text queries (joint attention) still see the image keys: their hidden states stay finite."""
    net = build(kind)
    z, t, cond = make_inputs(kind)
    cond["mask"][0] = False  # one sample without any real CLIP token
    if "mask_2" in cond:
        cond["mask_2"][0] = False
    states = []
    for block in net.blocks:
        block.register_forward_hook(lambda m, args, out: states.append(out))
    with torch.no_grad():
        out = net(z, t, cond)
    assert torch.isfinite(out).all()
    for x, contexts in states:
        assert torch.isfinite(x).all()
        assert contexts is None or all(torch.isfinite(c).all() for c in contexts)


# ---- bad input -------------------------------------------------------------------------------------


def _call(kind, z=None, t=None, cond=None, **changes):
    net = build(kind)
    z0, t0, cond0 = make_inputs(kind, b=2)
    if isinstance(cond0, dict):
        cond0 = {k: v for k, v in cond0.items() if not k.startswith("mask")}
        cond0.update(changes)
    return net(z0 if z is None else z, t0 if t is None else t, cond0 if cond is None else cond)


ALL = ["dit_labels", "mmdit", "mmdit3", "crossdit"]


@pytest.mark.parametrize("kind", ALL)
def test_wrong_latent_channels(kind):
    with pytest.raises(ValueError, match=r"expects latents with 4 channels.*got 3 channels, shape \(2, 3, 8, 6\)"):
        _call(kind, z=torch.randn(2, 3, 8, 6))
    with pytest.raises(ValueError, match=r"expects latents of shape \(B, 4, H, W\).*got shape \(4, 8, 6\)"):
        _call(kind, z=torch.randn(4, 8, 6))


@pytest.mark.parametrize("kind", ALL)
def test_latent_not_divisible_by_patch(kind):
    with pytest.raises(ValueError, match=r"latent height/width 7x6 \(shape \(2, 4, 7, 6\)\) must be divisible by patch_size 2"):
        _call(kind, z=torch.randn(2, 4, 7, 6))


@pytest.mark.parametrize("kind,arg", [("dit_labels", "input_size=8"), ("mmdit", "pos_embed_max_size=8"), ("crossdit", "input_size=8")])
def test_latent_larger_than_position_table(kind, arg):
    msg = rf"latent 10x6 gives a 5x3 token grid, which exceeds the position table \(4x4 tokens, {arg}: latents up to 8x8\)"
    if kind == "mmdit":
        msg = r"latent 18x6 gives a 9x3 token grid, which exceeds the position table \(8x8 tokens, pos_embed_max_size=8: latents up to 16x16\)"
    with pytest.raises(ValueError, match=msg):
        _call(kind, z=torch.randn(2, 4, 18 if kind == "mmdit" else 10, 6))


def test_text_longer_than_max_text_tokens():
    z, t = torch.randn(1, 4, 8, 8), torch.rand(1)
    cond = {"pooled": torch.randn(1, 12), "tokens": torch.randn(1, 6, 20), "tokens_2": torch.randn(1, 4, 6)}
    net = MMDiT(**MMDIT, max_text_tokens=5).eval()
    with pytest.raises(ValueError, match=r"cond\['tokens'\] has 6 tokens, more than max_text_tokens=5"):
        net(z, t, cond)
    assert net(z, t, dict(cond, tokens=cond["tokens"][:, :5])).shape == z.shape  # at the limit: fine
    net3 = MMDiT(**MMDIT, context_dim_2=6, max_text_tokens=6, max_text_tokens_2=3).eval()
    with pytest.raises(ValueError, match=r"cond\['tokens_2'\] has 4 tokens, more than max_text_tokens_2=3"):
        net3(z, t, cond)
    cross = CrossDiT(**CROSS, max_text_tokens=4).eval()
    with pytest.raises(ValueError, match=r"CrossDiT: cond\['tokens'\] has 6 tokens, more than max_text_tokens=4"):
        cross(z, t, cond)
    with pytest.raises(ValueError, match="max_text_tokens_2 limits cond\\['tokens_2'\\]"):
        MMDiT(**MMDIT, max_text_tokens_2=3)
    with pytest.raises(ValueError, match="max_text_tokens must be a positive number"):
        CrossDiT(**CROSS, max_text_tokens=0)


@pytest.mark.parametrize("kind", ["mmdit", "mmdit3", "crossdit"])
def test_wrong_pooled_and_context_dims(kind):
    name = "CrossDiT" if kind == "crossdit" else "MMDiT"
    with pytest.raises(ValueError, match=rf"{name}: cond\['pooled'\] must have shape \(2, 12\).*got shape \(2, 13\)"):
        _call(kind, pooled=torch.randn(2, 13))
    with pytest.raises(ValueError, match=rf"{name}: cond\['tokens'\] must have shape \(2, L, 20\).*got shape \(2, 7, 21\)"):
        _call(kind, tokens=torch.randn(2, 7, 21))
    with pytest.raises(ValueError, match=r"cond\['tokens'\] must have shape \(2, L, 20\).*got shape \(3, 7, 20\)"):
        _call(kind, tokens=torch.randn(3, 7, 20))
    if kind == "mmdit3":
        with pytest.raises(ValueError, match=r"cond\['tokens_2'\] must have shape \(2, L, 6\).*got shape \(2, 5, 20\)"):
            _call(kind, tokens_2=torch.randn(2, 5, 20))


def test_dit_pooled_dim_and_labels():
    net = build("dit_pooled")
    z, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match=r"DiT: cond\['pooled vector'\] must have shape \(2, 12\).*got shape \(2, 11\)"):
        net(z, t, torch.randn(2, 11))
    net = build("dit_labels")
    with pytest.raises(ValueError, match=r"class labels must lie in 0..9 \(or 10 = the null class\), got values 3..11"):
        net(z, t, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2,\), got torch.float32 \(2,\)"):
        net(z, t, torch.tensor([1.0, 2.0]))
    assert net(z, t, torch.tensor([0, 10])).shape == z.shape  # the null class is a valid label


@pytest.mark.parametrize("kind", ["mmdit", "mmdit3", "crossdit"])
def test_cond_missing_key(kind):
    z, t, cond = make_inputs(kind, b=2)
    missing = "tokens_2" if kind == "mmdit3" else "pooled"
    cond.pop(missing)
    with pytest.raises(KeyError, match=re.escape(f"cond is missing key(s) ['{missing}']")):
        build(kind)(z, t, cond)
    with pytest.raises(TypeError, match=r"expects cond as a dict with keys \['pooled', 'tokens'"):
        build(kind)(z, t, None)


@pytest.mark.parametrize("kind", ALL)
def test_time_shape(kind):
    with pytest.raises(ValueError, match=r"expects t of shape \(2,\) \(one time per latent\), got \(2, 1\)"):
        _call(kind, t=torch.rand(2, 1))
    assert _call(kind, t=torch.tensor(0.5)).shape == (2, 4, 8, 6)  # a 0-d time is broadcast


# ---- loading a state dict of another architecture --------------------------------------------------


def test_load_network_state_reports_what_does_not_fit():
    a = build("mmdit")
    b = MMDiT(**MMDIT, qk_norm=True)
    load_network_state(b, a.state_dict())  # same architecture: loads
    z, t, cond = make_inputs("mmdit", b=1)
    with torch.no_grad():
        assert torch.equal(b.eval()(z, t, cond), a(z, t, cond))

    # another architecture (a DiT): names missing / unexpected, with their shapes; nothing is loaded
    dit = DiT(**DIT, pooled_dim=12)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with pytest.raises(NetworkStateError) as err:
        load_network_state(dit, a.state_dict(), source="mmdit.ckpt")
    msg = str(err.value)
    assert "mmdit.ckpt does not fit DiT" in msg
    assert re.search(r"missing tensor\(s\):\n    blocks\.0\.attn\.qkv\.weight \(96, 32\)", msg), msg
    assert re.search(r"unexpected tensor\(s\):\n    context_embedders\.0\.weight \(32, 20\)", msg), msg
    assert re.search(r"\.\.\. and \d+ more", msg)
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())

    # same architecture, another size: the shape mismatches, checkpoint shape vs network shape
    wider = MMDiT(**dict(MMDIT, hidden_size=64), qk_norm=True)
    with pytest.raises(NetworkStateError, match=r"x_embedder\.proj\.weight: \(32, 4, 2, 2\) given, \(64, 4, 2, 2\) expected"):
        load_network_state(wider, a.state_dict())
    deeper = MMDiT(**dict(MMDIT, depth=4), qk_norm=True)
    with pytest.raises(NetworkStateError) as err:  # block 2 is the last (pre-only) block in the checkpoint
        load_network_state(deeper, a.state_dict())
    msg = str(err.value)
    assert "blocks.2.text.0.adaLN_modulation.1.weight: (64, 32) given, (192, 32) expected" in msg
    assert "blocks.3.text.0.adaLN_modulation.1.weight (64, 32)" in msg  # missing, with the expected shape
    assert "unexpected tensor(s):\n    blocks.2.text.0.kv.weight (64, 32)" in msg


def test_load_network_state_prefix_and_hint():
    a = build("crossdit")
    lightning = {f"net.{k}": v for k, v in a.state_dict().items()} | {"net_ema.step": torch.tensor(3)}
    with pytest.raises(NetworkStateError, match="hint: the keys carry the prefix 'net.'; pass prefix='net.'"):
        load_network_state(CrossDiT(**CROSS, qk_norm=True), lightning)
    b = CrossDiT(**CROSS, qk_norm=True)
    load_network_state(b, lightning, prefix="net.")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
