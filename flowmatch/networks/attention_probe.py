"""The largest attention logit, q·k / sqrt(head_dim), of every attention call made while a recorder is open.

SD3 (§5.3.2) and Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training
instabilities") trace loss divergence in mixed precision to attention logits that grow without bound;
QK-normalisation caps them (with RMSNorm of unit scale, |q·k| / sqrt(d) <= sqrt(d)). Every network
of the platform computes attention through ``flowmatch.networks.layers.attention``, which calls
``observe``; outside a recorder that is a single list check, so training pays nothing for it.

    with AttentionLogitRecorder() as rec:
        net(z, t, cond)
    rec.max_logit   # float: the largest |q·k| / sqrt(d) over every head, query and (unmasked) key

The logits are recomputed in float32 from the q and k that the attention kernel receives (in bf16
under bf16 autocast), so they are what the kernel's softmax sees, up to its own rounding.
"""

from __future__ import annotations

import math

import torch

_open: list["AttentionLogitRecorder"] = []


class AttentionLogitRecorder:
    """Context manager collecting the largest absolute attention logit of the calls made inside it."""

    def __init__(self):
        self.max_logit: float | None = None
        self.calls = 0

    def __enter__(self) -> "AttentionLogitRecorder":
        _open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _open.remove(self)

    def _update(self, value: float) -> None:
        self.calls += 1
        self.max_logit = value if self.max_logit is None else max(self.max_logit, value)


def observe(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None = None) -> None:
    """Record max |q·k| / sqrt(d) of (B, H, S, Dh) heads in every open recorder (a no-op when none is open)."""
    if not _open:
        return
    with torch.no_grad():
        logits = (q.float() @ k.float().transpose(-1, -2)).abs_() * (1.0 / math.sqrt(q.shape[-1]))
        if key_mask is not None:  # padding keys never reach the softmax
            visible = key_mask if key_mask.dtype == torch.bool else torch.isfinite(key_mask)
            logits = logits.masked_fill(~visible[:, None, None, :], 0.0)
        value = float(logits.amax())
    for rec in _open:
        rec._update(value)
