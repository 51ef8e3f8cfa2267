"""FLUX's rotary position embedding over several position axes (Su et al. 2021; black-forest-labs/flux math.py).

Every token has a position id per axis; FLUX.1 uses 3 axes (0, row, column of the packed latent grid),
with text tokens at id 0 on every axis. The head dim is split into one chunk per axis (``axes_dim``, FLUX.1:
16 + 56 + 56 = 128); in chunk i, the pair (x[2j], x[2j+1]) of a query or key is rotated by the angle
pos_i * theta^(-2j / axes_dim[i]) (interleaved pairs, theta 10000). Because positions are computed from
the grid, any latent height and width work: there is no table to outgrow.

Angles are computed in float64 (as the reference code does), the rotation in float32.
"""

from __future__ import annotations

from typing import Sequence

import torch


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX.1's split scaled to another head dim: 1/8 for axis 0, the rest shared by row and column
    (128 -> (16, 56, 56), 64 -> (8, 28, 28)); every part even."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"no default RoPE axes split for head dim {head_dim}: give axes_dim explicitly "
                         "(even parts summing to the head dim)")
    first = 2 * max(1, head_dim // 16)
    if (head_dim - first) % 4:  # row and column get equal even parts
        first += 2
    rest = head_dim - first
    return first, rest // 2, rest // 2


def check_axes_dim(axes_dim: Sequence[int], head_dim: int) -> tuple[int, ...]:
    """The axes split as a tuple, or a clear error if its parts are not even or do not sum to the head dim."""
    axes = tuple(int(a) for a in axes_dim)
    if sum(axes) != head_dim:
        raise ValueError(f"RoPE axes_dim {list(axes)} sums to {sum(axes)}, but the head dim (hidden_size / num_heads) "
                         f"is {head_dim}: the parts must sum to it (FLUX.1: [16, 56, 56] for head dim 128)")
    if any(a <= 0 or a % 2 for a in axes):
        raise ValueError(f"RoPE axes_dim {list(axes)}: every part must be a positive even number (pairs are rotated)")
    return axes


def image_position_ids(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Position ids (height * width, 3) of a row-major token grid: (0, row, column), as FLUX's ``img_ids``."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)


def rope_angles(ids: torch.Tensor, axes_dim: Sequence[int], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (L, head_dim / 2) in float32, for position ids (L, n_axes)."""
    if ids.dim() != 2 or ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids must have shape (L, {len(axes_dim)}) for axes_dim {list(axes_dim)}, got {tuple(ids.shape)}")
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, axis].to(torch.float64)[:, None] * omega[None])
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the interleaved pairs of x (B, H, L, head_dim) by (cos, sin) (L, head_dim / 2); x's dtype is kept."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
