"""Classifier-free guidance (docs/spec.md §4): v = v_uncond + w (v_cond - v_uncond).

The conditional and unconditional velocities are computed in ONE network call on a doubled
batch, so one evaluation of the guided field costs one (doubled-batch) network call: solver NFE
counts stay comparable between guided and unguided sampling (the cost per call doubles).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

# velocity_fn(z, t, cond) -> velocity of the same shape as z
ConditionalVelocity = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _concat_conditions(cond: Any, uncond: Any, batch: int) -> Any:
    """Concatenate two conditions of the same structure leaf by leaf along dim 0.

    Conditions may be tensors or nested dicts/lists/tuples of tensors. A tensor leaf with leading
    dimension 1 is broadcast to the batch (so a single null-text embedding can serve as uncond).
    Non-tensor leaves (None, ints, strings) must be equal in both and are passed through.
    """
    c_leaves, c_spec = tree_flatten(cond)
    u_leaves, u_spec = tree_flatten(uncond)
    if c_spec != u_spec:
        raise ValueError(f"cond and uncond must have the same structure, got {c_spec} and {u_spec}")

    def fit(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0:
            raise ValueError("condition tensors need a batch dimension")
        if x.shape[0] == 1 and batch != 1:
            x = x.expand(batch, *x.shape[1:])
        if x.shape[0] != batch:
            raise ValueError(f"condition has batch size {x.shape[0]}, expected {batch} (or 1)")
        return x

    joined = []
    for c, u in zip(c_leaves, u_leaves):
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            joined.append(torch.cat([fit(c), fit(u)], dim=0))
        elif isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor) or c != u:
            raise ValueError(f"cannot pair condition leaves {type(c).__name__} and {type(u).__name__}")
        else:
            joined.append(c)
    return tree_unflatten(joined, c_spec)


def guided_velocity(
    velocity_fn: ConditionalVelocity, cond: Any, uncond: Any, scale: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return v(z, t) with classifier-free guidance at ``scale`` folded in.

    With scale == 1, or without an unconditional (or conditional) input, guidance is a no-op and
    v(z, t) = velocity_fn(z, t, cond): one ordinary call. Otherwise each evaluation makes one
    call on the doubled batch [z; z], [t; t], [cond; uncond] and combines the two halves.
    """
    if scale == 1 or cond is None or uncond is None:
        return lambda z, t: velocity_fn(z, t, cond)

    def v(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = z.shape[0]
        both = velocity_fn(
            torch.cat([z, z], dim=0), torch.cat([t, t], dim=0), _concat_conditions(cond, uncond, batch)
        )
        v_cond, v_uncond = both[:batch], both[batch:]
        return v_uncond + scale * (v_cond - v_uncond)

    return v
