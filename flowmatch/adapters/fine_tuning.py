"""What a fine-tuning run does to its network, and what its checkpoints record of it.

``FineTuning`` holds a run's settings (a LoRA adapter, ``trainable`` name patterns, ``frozen_dtype``) and applies
them to the network after ``init_weights`` loaded the base: adds the adapter (fresh, or read from a diffusers
LoRA file), freezes everything else but the matched parameters, and casts the frozen ones. Its checkpoints
record the adapter's layout and, when the frozen base comes from ``init_weights``, that file and the base's
fingerprint, so loading the checkpoint later refuses a different base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flowmatch.adapters.freezing import (
    base_name,
    cast_frozen,
    freeze_all_but,
    frozen_dtype,
    is_adapter_param,
    match_trainable,
)
from flowmatch.adapters.lora import AdapterError, LoraAdapter, LoraLayout, add_lora, plan_lora


class FineTuning:
    """A run's fine-tuning settings (see this module's docstring); inactive when neither adapter nor trainable is set."""

    def __init__(self, adapter: LoraAdapter | None, trainable: list[str], frozen_dtype_name: str | None):
        self.adapter, self.trainable = adapter, list(trainable)
        self.dtype = frozen_dtype(frozen_dtype_name)
        if self.dtype is not None and not self.active:
            raise AdapterError("frozen_dtype applies to fine-tuning runs: set adapter and/or trainable too")
        self.frozen_names: set[str] = set()  # parameter names in the network (no "net." prefix)
        self.base_fingerprint: str | None = None
        self.layout: LoraLayout | None = None

    @property
    def active(self) -> bool:
        return self.adapter is not None or bool(self.trainable)

    def apply(self, net: nn.Module, base_fingerprint: str | None, layout: LoraLayout | None = None) -> None:
        """Add the adapter, freeze the rest, cast the frozen parameters. ``layout``: the adapter's layout as a
        checkpoint recorded it (else a fresh one from the settings, or the one of ``adapter.init``)."""
        if not self.active:
            return
        from flowmatch.strategies.zero3 import is_partitioned

        if any(is_partitioned(p) for p in net.parameters()):
            raise AdapterError(
                "fine-tuning (adapter / trainable / frozen_dtype) under DeepSpeed ZeRO-3 is not supported: peft would wrap "
                "sharded layers. Use ZeRO-2 (configs/trainer/deepspeed_stage_2.yaml), which shards gradients and optimizer "
                "state; a LoRA run's optimizer state is small anyway")
        self.base_fingerprint = base_fingerprint
        chosen = match_trainable(net, self.trainable)
        if self.adapter is not None:
            self.layout = self._add_adapter(net, layout)
        chosen = {base_name(c) for c in chosen}  # (the names a LoRA wrapper gives the layers it wraps, made plain)
        freeze_all_but(net, {n for n, _ in net.named_parameters() if base_name(n) in chosen})
        if self.dtype is not None:
            cast_frozen(net, self.dtype)
        self.frozen_names = {n for n, p in net.named_parameters() if not p.requires_grad}
        if all(not p.requires_grad for p in net.parameters()):
            raise AdapterError("the fine-tuning settings leave no parameter to train")

    def _add_adapter(self, net: nn.Module, layout: LoraLayout | None) -> LoraLayout:
        if layout is None and self.adapter.init:  # continue training a diffusers LoRA
            from flowmatch.adapters.diffusers_lora import attach_lora

            layout, _ = attach_lora(net, self.adapter.init, dropout=self.adapter.dropout)
            return layout
        if layout is None:
            layout = plan_lora(net, self.adapter)
        layout.dropout = self.adapter.dropout
        add_lora(net, layout)
        return layout

    def check_precision(self, net: nn.Module, precision: str) -> None:
        """Frozen low-precision layers feeding trained float32 ones (not adapters, which cast their input) need autocast."""
        if self.dtype is None or self.dtype == torch.float32 or "mixed" in str(precision):
            return
        plain = [n for n, p in net.named_parameters() if p.requires_grad and not is_adapter_param(n)]
        if plain:
            raise AdapterError(f"frozen_dtype {str(self.dtype).removeprefix('torch.')} with float32 parameters training outside "
                             f"the adapter ({plain[:3]}) needs autocast: set trainer.precision to bf16-mixed")

    def record(self, checkpoint: dict, base_path: str | None) -> None:
        """What a checkpoint must remember to be loaded again: the adapter layout and where the frozen base is."""
        if not self.active:
            return
        checkpoint["fine_tuning"] = {
            "lora_layout": None if self.layout is None else self.layout.to_dict(),
            "trainable": self.trainable,
            "frozen_dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
        }
        if base_path:  # absolute: the checkpoint is read again from other working directories
            checkpoint["frozen_base"] = {"init_weights": str(Path(base_path).resolve()), "fingerprint": self.base_fingerprint,
                                         "frozen_parameters": len(self.frozen_names)}

    def check_checkpoint(self, checkpoint: dict, source: str = "the checkpoint") -> None:
        """Refuse a checkpoint whose frozen base was another one than this run's ``init_weights``."""
        from flowmatch.checkpoints import CheckpointError

        recorded = (checkpoint.get("frozen_base") or {}).get("fingerprint")
        if recorded and self.base_fingerprint and recorded != self.base_fingerprint:
            raise CheckpointError(
                f"{source} was fine-tuned on a base with fingerprint {recorded}, but init_weights "
                f"{checkpoint['frozen_base'].get('init_weights')} now holds another (fingerprint {self.base_fingerprint}): "
                "its adapter would be applied to the wrong weights")


def stored_layout(checkpoint: dict) -> LoraLayout | None:
    """The adapter layout a fine-tuning checkpoint recorded, if any."""
    layout = (checkpoint.get("fine_tuning") or {}).get("lora_layout")
    if not layout:
        return None
    return LoraLayout(ranks=layout["ranks"], alphas=layout["alphas"], dropout=layout.get("dropout", 0.0))


def base_path_of(checkpoint: dict) -> Path | None:
    base = (checkpoint.get("frozen_base") or {}).get("init_weights")
    return Path(base) if base else None
