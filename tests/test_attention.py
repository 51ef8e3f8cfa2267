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
