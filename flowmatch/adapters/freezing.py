"""Which parameters of a network train in a fine-tuning run, what dtype the frozen ones are held in, and the summary.

A fine-tuning run trains the adapter's parameters (lora.py), and/or the parameters whose names match
``trainable`` patterns (each a regular expression matched against the whole parameter name, e.g.
``final_layer\\..*`` or ``.*adaLN_modulation.*``); everything else is frozen. Frozen parameters may be held
in bfloat16 (half the memory of the base) while the trained ones, and so their optimizer state, stay float32.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

import torch
from torch import nn

from flowmatch.adapters.lora import AdapterError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))


def base_name(name: str) -> str:
    """A parameter's name in the plain network (peft's ``.base_layer`` removed)."""
    return name.replace(".base_layer.", ".")


def match_trainable(net: nn.Module, patterns: Sequence[str]) -> set[str]:
    """Names of the (non-adapter) parameters some pattern matches in full, as named in ``net`` now.

    Patterns are matched against the plain network's names (``blocks.0.image.qkv.weight``, also when a LoRA
    wraps that layer). A pattern that is invalid or matches nothing is an error naming it."""
    names = [n for n, _ in net.named_parameters() if not is_adapter_param(n)]
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise AdapterError(f"trainable pattern {pattern!r} is not a valid regular expression ({err})") from None
        hits = [n for n in names if regex.fullmatch(base_name(n))]
        if not hits:
            examples = ", ".join(base_name(n) for n in names[:5])
            raise AdapterError(f"trainable pattern {pattern!r} matches no parameter of {type(net).__name__} "
                             f"(patterns match whole parameter names, e.g. {examples}, ...)")
        chosen.update(hits)
    return chosen


def freeze_all_but(net: nn.Module, trainable: set[str]) -> None:
    """requires_grad on the adapter parameters and on ``trainable``; off on everything else."""
    for name, param in net.named_parameters():
        param.requires_grad_(is_adapter_param(name) or name in trainable)


def cast_frozen(net: nn.Module, dtype: torch.dtype) -> None:
    """Hold the frozen parameters (and floating buffers beside them) in ``dtype``; trained ones stay as they are."""
    with torch.no_grad():
        for param in net.parameters():
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(dtype)


def frozen_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise AdapterError(f"frozen_dtype {name!r}: choose one of {sorted(DTYPES)} (or null to keep the network's dtype)")
    return DTYPES[name]


def _group(name: str) -> str:
    """The row of the summary a parameter counts in: LoRA, or its top-level module (blocks by kind)."""
    if is_adapter_param(name):
        return "LoRA adapters"
    parts = base_name(name).split(".")
    if parts[0] == "blocks":
        return "blocks"
    return parts[0]


def trainable_summary(net: nn.Module) -> str:
    """A table of trainable vs frozen parameters per part of the network, with their dtypes, and the totals."""
    rows: dict[str, list] = defaultdict(lambda: [0, 0, set()])
    for name, p in net.named_parameters():
        row = rows[_group(name)]
        row[0 if p.requires_grad else 1] += p.numel()
        row[2].add(str(p.dtype).removeprefix("torch."))
    train = sum(r[0] for r in rows.values())
    frozen = sum(r[1] for r in rows.values())
    total = train + frozen
    width = max(len(k) for k in rows) if rows else 5
    lines = [f"{'part':<{width}}  {'trainable':>12}  {'frozen':>12}  dtype",]
    for key, (t, f, dtypes) in rows.items():
        lines.append(f"{key:<{width}}  {t:>12,}  {f:>12,}  {'/'.join(sorted(dtypes))}")
    share = 100.0 * train / total if total else 0.0
    lines.append(f"{'total':<{width}}  {train:>12,}  {frozen:>12,}  ({share:.2f}% of {total:,} parameters train)")
    return "\n".join(lines)
