"""LoRA adapters on our networks, through peft (the library diffusers itself uses).

LoRA (Hu et al. 2021) adds ``(alpha / r) B A x`` to a linear layer ``W x``; A (r x in) starts random and B
(out x r) at zero, so training starts from the base model exactly (docs/spec.md §11). peft wraps every
targeted ``nn.Linear`` in place (``inject_adapter_in_model``): the base weight becomes
``<layer>.base_layer.weight`` and the adapter ``<layer>.lora_A.default.weight`` / ``lora_B``. This module

* resolves the target patterns to layers (each pattern a regular expression matched against the whole
  module name, as peft does with a string) and refuses a pattern that matches no linear layer, or a
  rank larger than a layer;
* adds the adapter (``add_lora``), reads and writes its weights under peft's names without the adapter
  name (``lora_state_dict`` / ``load_lora_state``: ``blocks.0.image.qkv.lora_A.weight``), scales it
  (``set_lora_scale``) and folds it into the base weights (``merge_lora``).

The defaults per backbone are the networks' own ``lora_target_modules``: SD3's MM-DiT the attention q/k/v
and output projections of both streams, FLUX the same plus the single-stream blocks' projections, DiT /
CrossDiT attention and MLP. Converting adapters to and from diffusers' names is diffusers_lora.py's job.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

ADAPTER_NAME = "default"  # peft's; the one adapter a flowmatch network carries


class AdapterError(ValueError):
    """Fine-tuning settings or an adapter file that do not fit the network (the message names the pattern, layer or file)."""


@dataclass
class LoraAdapter:
    """A LoRA adapter's settings, as a run's YAML gives them under ``model.init_args.adapter``.

    Args:
        rank: r, the rank of every adapted layer's update B A.
        alpha: the update is scaled by alpha / rank; None means alpha = rank (scale 1).
        target_modules: regular expressions, each matched against whole module names of the network
            (e.g. ``blocks\\.\\d+\\.image\\.qkv``); None means the network's defaults (``lora_target_modules``).
        dropout: dropout on the adapter's input during training (peft's lora_dropout).
        init: start from this adapter instead of a fresh one: a diffusers LoRA file or directory
            (``pytorch_lora_weights.safetensors``, e.g. from diffusers' training scripts or from
            ``python -m flowmatch export-lora``). Its layers and ranks replace rank / target_modules.
    """

    rank: int = 16
    alpha: float | None = None
    target_modules: list[str] | None = None
    dropout: float = 0.0
    init: str | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"adapter.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise AdapterError(f"adapter.alpha must be positive (or null for alpha = rank), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"adapter.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and not self.target_modules:
            raise AdapterError("adapter.target_modules is empty: give module-name patterns, or null for the network's defaults")


@dataclass
class LoraLayout:
    """What an adapter looks like once resolved on a network: its layers with their ranks and alphas."""

    ranks: dict[str, int]  # module name -> rank
    alphas: dict[str, float]  # module name -> alpha (the update is scaled by alpha / rank)
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def as_adapter(value) -> LoraAdapter | None:
    """A LoraAdapter from what a config or a checkpoint's hyper-parameters hold (dict, Namespace or the object)."""
    if value is None or isinstance(value, LoraAdapter):
        return value
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if not isinstance(value, dict):
        raise TypeError(f"adapter must be a mapping of LoRA settings, got {type(value).__name__}")
    unknown = sorted(set(value) - set(LoraAdapter.__dataclass_fields__))
    if unknown:
        raise AdapterError(f"unknown adapter setting(s) {unknown}; known: {sorted(LoraAdapter.__dataclass_fields__)}")
    return LoraAdapter(**value)


def linear_layers(net: nn.Module) -> dict[str, nn.Linear]:
    """The network's nn.Linear layers by module name (already adapted ones by their own name)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in net.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = module.get_base_layer()
        elif isinstance(module, nn.Linear) and not _inside_lora(name):
            out[name] = module
    return out


def _inside_lora(name: str) -> bool:
    return any(part in ("base_layer", "lora_A", "lora_B") for part in name.split("."))


def default_targets(net: nn.Module) -> list[str]:
    """The network's default LoRA targets (its ``lora_target_modules``), or an error saying to give them."""
    targets = getattr(net, "lora_target_modules", None)
    if not targets:
        raise AdapterError(f"{type(net).__name__} has no default LoRA targets: give adapter.target_modules "
                         "(regular expressions matched against its module names)")
    return list(targets)


def resolve_targets(net: nn.Module, patterns: Sequence[str]) -> dict[str, str]:
    """Module name -> the pattern that selects it, for every linear layer some pattern matches in full.

    A pattern that is not a valid regular expression, or matches no linear layer, is an error naming it
    (with a few of the layer names it could have matched)."""
    layers = linear_layers(net)
    chosen: dict[str, str] = {}
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise AdapterError(f"adapter target pattern {pattern!r} is not a valid regular expression ({err})") from None
        hits = [name for name in layers if regex.fullmatch(name)]
        if not hits:
            examples = ", ".join(list(layers)[:6])
            raise AdapterError(f"adapter target pattern {pattern!r} matches no linear layer of {type(net).__name__} "
                             f"(patterns match whole module names, e.g. {examples}, ...)")
        for name in hits:
            chosen.setdefault(name, pattern)
    return chosen


def plan_lora(net: nn.Module, adapter: LoraAdapter) -> LoraLayout:
    """The layout of a fresh adapter with ``adapter``'s settings on ``net``; refuses a rank larger than a layer."""
    patterns = adapter.target_modules or default_targets(net)
    chosen = resolve_targets(net, patterns)
    layers = linear_layers(net)
    alpha = float(adapter.alpha if adapter.alpha is not None else adapter.rank)
    for name in chosen:
        check_rank(name, layers[name], adapter.rank)
    return LoraLayout(ranks={n: adapter.rank for n in chosen}, alphas={n: alpha for n in chosen}, dropout=adapter.dropout)


def check_rank(name: str, layer: nn.Linear, rank: int) -> None:
    limit = min(layer.in_features, layer.out_features)
    if rank > limit:
        raise AdapterError(f"adapter rank {rank} is larger than layer {name} allows ({layer.in_features} in, "
                         f"{layer.out_features} out: at most {limit})")


def add_lora(net: nn.Module, layout: LoraLayout) -> nn.Module:
    """Wrap the layout's layers with peft LoRA layers (in place); only the adapters require gradients then."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(net):
        raise AdapterError(f"{type(net).__name__} already carries a LoRA adapter; merge it first (merge_lora)")
    names = sorted(layout.ranks)
    if not names:
        raise AdapterError("the adapter targets no layer")
    rank = max(layout.ranks.values(), key=list(layout.ranks.values()).count)  # the most common rank
    alpha = max(layout.alphas.values(), key=list(layout.alphas.values()).count)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=layout.dropout, target_modules=names,
        rank_pattern={_exact(n): r for n, r in layout.ranks.items() if r != rank},
        alpha_pattern={_exact(n): a for n, a in layout.alphas.items() if a != alpha},
    )
    inject_adapter_in_model(config, net, adapter_name=ADAPTER_NAME)
    adapted = lora_layers(net)
    if sorted(adapted) != names:  # peft matches target names as suffixes: make sure it took exactly ours
        raise RuntimeError(f"peft adapted {sorted(set(adapted) ^ set(names))[:5]} unlike the plan")
    for name, module in adapted.items():
        if module.r[ADAPTER_NAME] != layout.ranks[name] or module.lora_alpha[ADAPTER_NAME] != layout.alphas[name]:
            raise RuntimeError(f"peft gave {name} rank {module.r[ADAPTER_NAME]} / alpha {module.lora_alpha[ADAPTER_NAME]}, "
                               f"planned {layout.ranks[name]} / {layout.alphas[name]}")
    return net


def _exact(name: str) -> str:
    """peft's rank_pattern / alpha_pattern keys are regular expressions matched at the end of the name."""
    return "^" + re.escape(name) + "$"


def lora_layers(net: nn.Module) -> dict:
    """peft LoRA layers of ``net`` by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in net.named_modules() if isinstance(m, LoraLayer)}


def has_lora(net: nn.Module) -> bool:
    return bool(lora_layers(net))


def lora_layout(net: nn.Module) -> LoraLayout:
    """The layout of the adapter ``net`` carries."""
    layers = lora_layers(net)
    dropout = 0.0
    for module in layers.values():
        drop = module.lora_dropout[ADAPTER_NAME]
        dropout = max(dropout, getattr(drop, "p", 0.0))
    return LoraLayout(ranks={n: m.r[ADAPTER_NAME] for n, m in layers.items()},
                      alphas={n: float(m.lora_alpha[ADAPTER_NAME]) for n, m in layers.items()}, dropout=dropout)


def lora_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's names without the adapter name: ``<layer>.lora_A.weight``, ``.lora_B.weight``."""
    out = {}
    for name, module in lora_layers(net).items():
        out[f"{name}.lora_A.weight"] = module.lora_A[ADAPTER_NAME].weight.detach()
        out[f"{name}.lora_B.weight"] = module.lora_B[ADAPTER_NAME].weight.detach()
    return out


def load_lora_state(net: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter weights (``lora_state_dict``'s names) into ``net``'s adapter; every layer and shape must match."""
    layers = lora_layers(net)
    expected = {}
    for name, module in layers.items():
        expected[f"{name}.lora_A.weight"] = module.lora_A[ADAPTER_NAME].weight
        expected[f"{name}.lora_B.weight"] = module.lora_B[ADAPTER_NAME].weight
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{source} does not fit this network's adapter: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for key, param in expected.items():
            value = state[key]
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterError(f"{source}: {key} has shape {tuple(value.shape)}, this network's adapter {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def set_lora_scale(net: nn.Module, scale: float) -> None:
    """Scale every adapter's update by ``scale`` on top of alpha / rank (diffusers' ``lora_scale``; 0 = base model)."""
    for module in lora_layers(net).values():
        module.set_scale(ADAPTER_NAME, scale)


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + scale B A) and put the plain layers back, in place."""
    for name, module in list(lora_layers(net).items()):
        module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, module.get_base_layer())
    return net
