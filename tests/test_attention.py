"""layers.attention: the explicit matmul-softmax-matmul form used on CPU for short half-precision sequences
computes what SDPA computes (values and gradients), and the dispatch picks it only where it is faster."""

import pytest
import torch
import torch.nn.functional as F

from flowmatch.networks.layers import EXPLICIT_ATTENTION_MAX_KEYS, attention, explicit_attention, use_explicit_attention


def _heads(b=3, h=2, s=11, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def _mask(b=3, s=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, s, generator=g) > 0.4
    mask[:, -1] = True  # every row keeps a key
    return mask


def _grads(out, tensors):
    g = torch.Generator().manual_seed(2)
    return torch.autograd.grad(out, tensors, torch.randn(out.shape, generator=g).to(out.dtype))


@pytest.mark.parametrize("masked", [False, True])
def test_explicit_form_equals_sdpa_in_float32(masked):
    q, k, v = _heads()
    mask = _mask()[:, None, None, :] if masked else None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = explicit_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_masked_keys_get_no_weight():
    q, k, v = _heads()
    mask = _mask()
    out = explicit_attention(q, k, v, mask[:, None, None, :])
    v_changed = torch.where(mask[:, None, :, None], v, v + 100.0)  # only masked keys' values change
    torch.testing.assert_close(explicit_attention(q, k, v_changed, mask[:, None, None, :]), out)


def test_bf16_on_cpu_uses_the_explicit_form_and_matches_float32_sdpa():
    q, k, v = _heads(s=48, dtype=torch.bfloat16)
    assert use_explicit_attention(q, k)
    mask = _mask(s=48)
    out = attention(q, k, v, mask)  # (B, S, H*Dh)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask[:, None, None, :])
    ref = ref.transpose(1, 2).reshape(out.shape)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.02, atol=0.02)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref.to(torch.bfloat16).float(), (q32, k32, v32))):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)


def test_float32_and_long_sequences_keep_sdpa():
    q, k, _ = _heads(s=48)
    assert not use_explicit_attention(q, k)  # float32: SDPA's fused kernel is faster
    q, k, _ = _heads(s=EXPLICIT_ATTENTION_MAX_KEYS + 1, dtype=torch.bfloat16)
    assert not use_explicit_attention(q, k)
    q, k, _ = _heads(s=EXPLICIT_ATTENTION_MAX_KEYS, dtype=torch.bfloat16)
    assert use_explicit_attention(q, k)


# ---- compact_tokens: the text tokens attention needs, same output --------------------------------------------------

from flowmatch.networks import crossdit, mmdit  # noqa: E402
from flowmatch.networks.layers import compact_tokens  # noqa: E402


def _text_batch(length=10, dim=12, seed=0):
    """Five captions: real tokens of lengths 2, 5, 3, 4 then padding, and one null caption (all zeros, all visible)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(5, length, dim, generator=g)
    mask = torch.zeros(5, length, dtype=torch.bool)
    for i, n in enumerate([2, 5, 3, length, 4]):
        mask[i, :n] = True
    tokens[3] = 0.0  # row 3: the null condition
    return tokens, mask


def test_compact_tokens_cuts_padding_and_folds_a_null_caption_into_one_token():
    tokens, mask = _text_batch()
    kept, bias = compact_tokens(tokens, mask)
    assert kept.shape == (5, 5, 12) and bias.dtype == torch.float32  # the longest caption has 5 tokens
    torch.testing.assert_close(kept, tokens[:, :5])
    assert torch.isfinite(bias[0, :2]).all() and torch.isinf(bias[0, 2:]).all()
    assert bias[3, 0].item() == pytest.approx(torch.log(torch.tensor(10.0)).item())  # one token standing for ten
    assert torch.isinf(bias[3, 1:]).all()


def test_compact_tokens_leaves_what_it_cannot_shorten_untouched():
    tokens = torch.randn(3, 6, 4)
    assert compact_tokens(tokens, None) == (tokens, None)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 2:] = False
    out_tokens, out_mask = compact_tokens(tokens, mask)
    assert out_tokens is tokens and out_mask is mask  # another row uses every column


def _networks():
    torch.manual_seed(0)
    nets = [mmdit.MMDiT(depth=2, in_channels=4, pooled_dim=8, context_dim=12, qk_norm=True, pos_embed_max_size=8, learned_null=True),
            crossdit.CrossDiT(depth=2, hidden_size=64, num_heads=2, in_channels=4, pooled_dim=8, context_dim=12, input_size=8,
                              learned_null=True)]
    for net in nets:
        for p in net.parameters():  # away from the zero init, so every block matters
            torch.nn.init.normal_(p, std=0.2)
    return nets


@pytest.mark.parametrize("index", [0, 1], ids=["mmdit", "crossdit"])
def test_networks_give_the_same_output_and_gradients_with_compacted_text(index, monkeypatch):
    net = _networks()[index]
    module = mmdit if index == 0 else crossdit
    tokens, mask = _text_batch()
    g = torch.Generator().manual_seed(3)
    z, t, pooled = torch.randn(5, 4, 8, 8, generator=g), torch.rand(5, generator=g), torch.randn(5, 8, generator=g)
    mask[3] = True
    net.eval()

    def run():
        net.zero_grad()
        null = net.null_condition({"pooled": pooled, "tokens": tokens, "mask": mask})["tokens"]  # the learned null vector
        row3 = (torch.arange(5) == 3)[:, None, None]
        out = net(z, t, {"pooled": pooled, "tokens": torch.where(row3, null, tokens), "mask": mask})
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    out, grads = run()
    monkeypatch.setattr(module, "compact_tokens", lambda tk, mk: (tk, mk))  # every token through every block
    ref, ref_grads = run()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        scale = ref_grads[name].abs().max().item()  # float32 rounding, relative to the tensor's scale
        assert (grads[name] - ref_grads[name]).abs().max().item() <= 5e-5 * max(scale, 1.0), name
