"""The text condition of CrossDiT and MM-DiT: a pooled vector and token streams, checked, dropped and nulled.

The condition is a dict {"pooled": (B, P), "tokens": (B, L, D), "mask": bool (B, L), ...}; each token
stream a network reads is a :class:`TextStream` (its cond keys, width, length limit and dropout). The
pooled vector and every stream are dropped independently for classifier-free guidance; a dropped
stream's mask becomes all True (all its null tokens are visible).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from flowmatch.networks.conditioning import ConditioningSpec, TokenStream
from flowmatch.networks.layers import ConditionDropout, check_pooled, check_tokens, drop_tokens, require_keys


@dataclass(frozen=True)
class TextStream:
    """One token stream a network reads: cond[key] (B, L, width) with optional mask cond[mask_key]."""

    key: str
    mask_key: str
    width: int
    max_length: int | None  # None: any length
    limit_arg: str  # the constructor argument that sets max_length, named in errors
    dropout: ConditionDropout


def text_spec(pooled_dim: int, streams: Sequence[TextStream]) -> ConditioningSpec:
    """The ConditioningSpec of a network reading a pooled vector of ``pooled_dim`` (0: none) and ``streams``."""
    return ConditioningSpec(pooled_dim=pooled_dim,
                            token_streams=tuple(TokenStream(s.key, s.width, s.max_length, s.mask_key) for s in streams))


def require_text(cond: object, pooled: ConditionDropout | None, streams: Sequence[TextStream], network: str) -> dict:
    """cond as a dict holding "pooled" (when the network reads one) and every stream's tokens."""
    keys = ("pooled",) if pooled is not None else ()
    return require_keys(cond, (*keys, *(s.key for s in streams)), network)


def check_text(cond: dict, batch: int, pooled_dim: int | None, streams: Sequence[TextStream], network: str) -> None:
    """Shapes: cond["pooled"] (batch, pooled_dim) when pooled_dim is not None, each stream (batch, L <= limit, width)."""
    if pooled_dim is not None:
        check_pooled(cond["pooled"], batch, pooled_dim, network)
    for s in streams:
        check_tokens(cond[s.key], batch, s.width, s.key, network, s.max_length, s.limit_arg)


def null_text(cond: dict, pooled: ConditionDropout | None, streams: Sequence[TextStream]) -> dict:
    """The unconditional counterpart of cond: null pooled vector and null tokens (same shapes), masks all True."""
    out = dict(cond)
    if pooled is not None:
        out["pooled"] = pooled.null_like(cond["pooled"])
    for s in streams:
        out[s.key] = s.dropout.null_like(cond[s.key])
        if cond.get(s.mask_key) is not None:
            out[s.mask_key] = torch.ones_like(cond[s.mask_key])
    return out


def drop_text(cond: dict, pooled: ConditionDropout | None, streams: Sequence[TextStream]) -> dict:
    """Training-mode dropout: the pooled vector and each stream independently replaced by their nulls (identity in eval)."""
    out = dict(cond)
    if pooled is not None:
        out["pooled"] = pooled(cond["pooled"])[0]
    for s in streams:
        out[s.key], mask = drop_tokens(s.dropout, cond[s.key], cond.get(s.mask_key))
        if mask is not None:
            out[s.mask_key] = mask
    return out
