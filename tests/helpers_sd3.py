"""A tiny diffusers SD3Transformer2DModel with random weights everywhere, fixed inputs, and the outputs of it and of
flowmatch's MMDiT on them: shared by the SD3 import and LoRA tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                pos_embed_max_size=16, qk_norm="rms_norm")


def random_sd3(path: Path | None = None, seed: int = 0, **overrides):
    """The tiny SD3 transformer with N(0, 0.3) in every parameter (norm scales around 1), in eval mode; saved to
    ``path`` (save_pretrained) when given."""
    import diffusers

    torch.manual_seed(seed)
    ref = diffusers.SD3Transformer2DModel(**{**TINY_SD3, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "norm" in name else 0.0))
    ref.eval()
    if path is not None:
        ref.save_pretrained(path)
    return ref


def sd3_inputs(height: int = 8, width: int = 6):
    """Latents (2, 4, height, width), times, text tokens (2, 5, 32) and pooled vectors (2, 16), seeded."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, height, width, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g),
            torch.randn(2, 16, generator=g))


def diffusers_sd3_out(model) -> torch.Tensor:
    z, t, tokens, pooled = sd3_inputs()
    with torch.no_grad():
        return model(hidden_states=z, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=1000 * t).sample


def our_sd3_out(net) -> torch.Tensor:
    z, t, tokens, pooled = sd3_inputs()
    with torch.no_grad():
        return net(z, t, {"pooled": pooled, "tokens": tokens})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()
