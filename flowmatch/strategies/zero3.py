"""Small helpers for parameters that DeepSpeed ZeRO stage 3 has sharded across ranks.

Under ZeRO-3 a parameter's ``.data`` is an empty placeholder outside the forward pass; each rank
holds one flat slice of it in ``param.ds_tensor`` (the flattened parameter, padded to a multiple of
the world size, cut into equal parts: rank r holds elements ``[r * n, (r + 1) * n)``). These helpers
are no-ops for ordinary parameters, so callers need not know which strategy runs.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator

import torch
from torch import nn


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (it carries DeepSpeed's ``ds_tensor`` shard)."""
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_id")


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The part of ``param`` that this rank stores: the ZeRO-3 shard, or the whole tensor."""
    return param.ds_tensor if is_partitioned(param) else param.data


def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None):
    """Context in which ZeRO-3 parameters hold their full value on every rank (no-op otherwise).

    With ``modifier_rank`` set, what that rank writes into the parameters is kept and re-sharded
    on exit (DeepSpeed's ``GatheredParameters``)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def refresh_after_shard_write(params: Iterable[torch.Tensor]) -> None:
    """After writing into ZeRO-3 shards (``ds_tensor``) directly, drop any full copies that are now
    stale and re-gather the small "persistent" parameters that DeepSpeed keeps whole between steps
    (as DeepSpeed does after its own optimizer step). Collective: call it on every rank."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    available = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
    if available:
        available[0].partition(available, has_been_updated=False)  # frees the full copies, keeps the shards
    persistent = [p for p in available if getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].all_gather(persistent)


def _all_module_classes() -> list[type]:
    out, todo = [], [nn.Module]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


@contextmanager
def deferred_weight_init(enabled: bool = True) -> Iterator[list]:
    """Defer networks' ``initialize_weights()`` while ZeRO-3 builds them, then run it with the
    network's parameters gathered (rank 0's result is broadcast and re-sharded).

    ``deepspeed.zero.Init`` shards every submodule's parameters as soon as that submodule's
    ``__init__`` returns, so an ``initialize_weights()`` that a network runs at the end of its own
    ``__init__`` (DiT, MM-DiT: xavier linears, zeroed adaLN) would see empty placeholders. While
    this context is active, every ``nn.Module`` class's own ``initialize_weights`` only records the
    call; on exit the recorded calls run in construction order (inner networks first), each with
    its module's parameters gathered. The gathered copy exists only during that call.
    """
    if not enabled:
        yield []
        return
    pending: list[tuple[nn.Module, object, tuple, dict]] = []
    patched: list[tuple[type, object]] = []
    for cls in _all_module_classes():
        original = cls.__dict__.get("initialize_weights")
        if not callable(original):
            continue

        def record(self, *args, __original=original, **kwargs):
            pending.append((self, __original, args, kwargs))

        patched.append((cls, original))
        setattr(cls, "initialize_weights", record)
    try:
        yield pending
    finally:
        for cls, original in patched:
            setattr(cls, "initialize_weights", original)
    for module, original, args, kwargs in pending:
        with gathered(module.parameters(), modifier_rank=0):
            original(module, *args, **kwargs)
