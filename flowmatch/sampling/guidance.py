"""Guidance at sampling time (docs/spec.md §4): classifier-free, or embedded in a guidance-distilled network.

Classifier-free guidance: v = v_uncond + w (v_cond - v_uncond). The conditional and unconditional
velocities are computed in one network call on a doubled batch [z; z], [cond; uncond], so each evaluation
of the guided field costs every sample TWO network evaluations: the NFE the platform reports (``sample``,
the ``nfe_<sampler>`` metrics, ``python -m flowmatch sample``) counts network evaluations per sample, so
"euler25_cfg1p5" costs 50 where "euler25" costs 25, and a plot of quality against NFE shows the real cost.

Embedded guidance: a guidance-distilled network (FLUX with ``guidance_embed=True``, like FLUX.1-dev;
flowmatch.objectives.guidance_distillation) takes the scale as an input, ``cond["guidance"]`` = w for
every sample, and has no unconditional branch: each evaluation is one call on the plain batch, with
no null condition, so one network evaluation per sample and step. The scale w means the same (the teacher's CFG scale the network imitates), so a
sampler spec "euler25:cfg=3" samples such a network at embedded guidance 3, at half the network work
of real CFG. Whether a network embeds guidance is read from it (``embeds_guidance``): ``sample`` and
``guided_velocity`` look at the network behind the velocity function (a network, or a FlowGenerator's
bound ``velocity`` method), unless told with ``embedded``.
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


def cfg_velocity(velocity_fn: ConditionalVelocity, z: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any,
                 scale: float | torch.Tensor) -> torch.Tensor:
    """v_uncond + scale (v_cond - v_uncond) at (z, t), from one call on the doubled batch [z; z], [cond; uncond].

    ``scale`` is one number or one per sample, shape (B,) (guidance distillation's teacher targets)."""
    batch = z.shape[0]
    both = velocity_fn(torch.cat([z, z], dim=0), torch.cat([t, t], dim=0), _concat_conditions(cond, uncond, batch))
    v_cond, v_uncond = both[:batch], both[batch:]
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        if scale.shape != (batch,):
            raise ValueError(f"a per-sample guidance scale must have shape ({batch},), got {tuple(scale.shape)}")
        scale = scale.to(device=v_cond.device, dtype=v_cond.dtype).view(batch, *([1] * (v_cond.dim() - 1)))
    return v_uncond + scale * (v_cond - v_uncond)


def embeds_guidance(model: Any) -> bool:
    """Whether a network takes the guidance scale as an input (``guidance_embed`` True, e.g. FLUX.1-dev).

    ``model`` is a network, an objective holding one as ``.net`` (a FlowGenerator), or a bound method of
    either (a FlowGenerator's ``velocity``, what ``generate`` passes to ``sample``)."""
    owner = getattr(model, "__self__", model)
    return any(getattr(obj, "guidance_embed", False) is True for obj in (owner, getattr(owner, "net", None)))


def with_guidance(cond: Any, scale: float, batch: int, device: torch.device | str | None = None) -> dict:
    """``cond`` with ``"guidance"`` = ``scale`` for each of the ``batch`` samples: the input of a guidance-embedded network."""
    if not isinstance(cond, dict):
        raise ValueError("a guidance-embedded network takes its guidance scale as cond['guidance'] beside its text condition: "
                         f"the condition must be a dict, got {type(cond).__name__}")
    return {**cond, "guidance": torch.full((batch,), float(scale), device=device, dtype=torch.float32)}


def network_passes(velocity_fn: ConditionalVelocity, cond: Any, uncond: Any, scale: float, embedded: bool | None = None) -> int:
    """Network evaluations per sample in one evaluation of the field ``guided_velocity`` returns for the
    same arguments: 2 with classifier-free guidance (conditional and unconditional pass), else 1."""
    if embedded is None:
        embedded = embeds_guidance(velocity_fn)
    return 1 if embedded or scale == 1 or cond is None or uncond is None else 2


def guided_velocity(
    velocity_fn: ConditionalVelocity, cond: Any, uncond: Any, scale: float, embedded: bool | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return v(z, t) with guidance at ``scale`` folded in.

    ``embedded`` (None: ``embeds_guidance(velocity_fn)``): the network takes the scale as
    ``cond["guidance"]`` and each evaluation is ONE call on the plain batch, whatever the scale (1
    included: such a network always needs it); it has no unconditional branch, so ``uncond`` must be None.
    Otherwise classifier-free guidance: with scale == 1, or without an unconditional (or conditional)
    input, it is a no-op and v(z, t) = velocity_fn(z, t, cond), one ordinary call; else each evaluation
    makes one call on the doubled batch [z; z], [t; t], [cond; uncond] and combines the two halves.
    """
    if embedded is None:
        embedded = embeds_guidance(velocity_fn)
    if embedded:
        if uncond is not None:
            raise ValueError("a guidance-embedded network (guidance_embed=True) takes the guidance scale as an input and has no "
                             "unconditional branch: it cannot be given an unconditional or negative condition")
        return lambda z, t: velocity_fn(z, t, with_guidance(cond, scale, z.shape[0], z.device))
    if scale == 1 or cond is None or uncond is None:
        return lambda z, t: velocity_fn(z, t, cond)
    return lambda z, t: cfg_velocity(velocity_fn, z, t, cond, uncond, scale)
