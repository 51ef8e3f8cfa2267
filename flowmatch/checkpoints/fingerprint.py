"""A short fingerprint of a set of weights, to tell whether two files hold the same base network.

It hashes every tensor's name, shape, dtype and two float64 sums (of the values and of their squares): cheap
(one pass over the weights, no copy) and different for any two bases met in practice, where an exact hash of
multi-GB weights would cost a second full read.
"""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """16 hex digits identifying ``state`` (names, shapes, dtypes, value sums)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        line = f"{name}:{tuple(t.shape)}:{t.dtype}"
        if t.is_floating_point() or t.is_complex():
            x = t.detach().double()
            line += f":{x.sum().item():.10e}:{x.pow(2).sum().item():.10e}"
        elif t.numel():
            line += f":{int(t.long().sum().item())}"
        h.update(line.encode())
    return h.hexdigest()[:16]
