"""Sinusoidal timestep embedding shared by all networks (DiT / SD3 convention)."""

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0) -> torch.Tensor:
    """Embed times t (shape (B,), in [0, 1]) as [cos, sin] of (scale * t) at geometric frequencies.

    ``scale = 1000`` maps t to SD3's timestep range (diffusers feeds sigma * 1000), so imported SD3
    weights see the inputs they were trained on. Always computed in float32, even under autocast.
    """
    half = dim // 2
    with torch.autocast(device_type=t.device.type, enabled=False):
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (scale * t.float())[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
