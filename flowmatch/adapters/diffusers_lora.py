"""LoRA adapters in diffusers' format: ``pytorch_lora_weights.safetensors`` with diffusers' module names.

diffusers (with peft) stores an adapter as ``<module>.lora_A.weight`` (r x in) and ``<module>.lora_B.weight``
(out x r) per adapted linear layer, prefixed ``transformer.`` when a pipeline's ``save_lora_weights`` wrote it
and unprefixed when a model's ``save_lora_adapter`` did (docs/spec.md §11); both are read. Without metadata
diffusers takes alpha = rank for every layer (scale 1), so what we write has the scale alpha / rank folded
into B, and every loader gives the same update ``B A``.

Our networks fuse layers that diffusers keeps apart (the import maps of sd3_import.py / flux_import.py
say which); the update of a fused layer maps exactly:

* ours -> diffusers: a fused ``qkv`` (rows q; k; v) with update B A becomes to_q / to_k / to_v with the
  same A each and B's row blocks (FLUX's single-block ``linear1`` also gives proj_mlp its block); rows
  that diffusers orders otherwise (the last text stream's and the final layer's (shift, scale) halves,
  FLUX's output patch order) are permuted in B like the weight's rows;
* diffusers -> ours: separate adapters on to_q / to_k / to_v (ranks r_q, r_k, r_v) become one adapter of
  rank r_q + r_k + r_v on ``qkv``: A stacked, B block-diagonal; a part without adapter adds nothing.

Layers diffusers stores but never uses (SD3's last-block text query, whose output is discarded) are
dropped; an adapter key that names no layer of the base, or a shape that does not fit, is an error
naming the key: the adapter was made for another base.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from flowmatch.adapters.lora import AdapterError, LoraLayout, linear_layers
from flowmatch.networks.diffusers_files import swap_halves

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer."  # the pipeline flavour's prefix of the transformer's keys
_OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "unet.")


@dataclass
class _LayerMap:
    ours: str  # our linear layer
    theirs: list[str]  # diffusers' linear layer(s), in our row order
    kind: str  # copy | cat | swap | patch_out
    sizes: list[int]  # rows of each diffusers layer


def diffusers_class(net: nn.Module) -> str:
    """The diffusers model class whose LoRA names ``net``'s adapters take; an error for networks without one."""
    from flowmatch.networks.flux import FLUX
    from flowmatch.networks.mmdit import MMDiT

    if isinstance(net, FLUX):
        return "FluxTransformer2DModel"
    if isinstance(net, MMDiT):
        return "SD3Transformer2DModel"
    raise AdapterError(f"{type(net).__name__} has no diffusers layout: diffusers-format LoRA files exist for MMDiT "
                     "(SD3Transformer2DModel) and FLUX (FluxTransformer2DModel)")


def _maps(net: nn.Module) -> tuple[dict[str, _LayerMap], set[str]]:
    """Our linear layer -> its diffusers layers, and the diffusers layers that exist but never act."""
    from flowmatch.networks import flux_import, sd3_import

    if diffusers_class(net) == "FluxTransformer2DModel":
        rows, unused = flux_import.diffusers_key_map(net), set()
    else:
        rows = sd3_import.diffusers_key_map(net)
        unused = {k.removesuffix(".weight") for k in sd3_import.diffusers_unused_keys(net) if k.endswith(".weight")}
    layers = linear_layers(net)
    maps = {}
    for row in rows:
        ours, theirs, kind = row[0], row[1], row[2]
        module = ours.removesuffix(".weight")
        if not ours.endswith(".weight") or module not in layers:
            continue  # biases, norms, the patch embedding (a convolution here)
        out = layers[module].out_features
        sizes = list(row[3]) if len(row) > 3 and row[3] else [out // len(theirs)] * len(theirs)
        maps[module] = _LayerMap(module, [t.removesuffix(".weight") for t in theirs], kind, sizes)
    return maps, unused


def _rows(kind: str, x: torch.Tensor, net: nn.Module, to_ours: bool) -> torch.Tensor:
    """Reorder B's rows the way the import reorders the weight's rows."""
    if kind == "swap":
        return swap_halves(x)
    if kind == "patch_out":
        from flowmatch.networks.flux_import import _token_order

        return _token_order(x, net.out_channels, to_ours=to_ours)
    return x


def to_diffusers(net: nn.Module, state: dict[str, torch.Tensor], layout: LoraLayout) -> dict[str, torch.Tensor]:
    """Our adapter (``lora_state_dict`` names, the layout's alphas) as diffusers' unprefixed keys, scale folded into B."""
    maps, _ = _maps(net)
    out: dict[str, torch.Tensor] = {}
    for module in sorted(layout.ranks):
        if module not in maps:
            raise AdapterError(f"adapted layer {module} has no counterpart in diffusers' {diffusers_class(net)}")
        m = maps[module]
        a = state[f"{module}.lora_A.weight"].float()
        b = state[f"{module}.lora_B.weight"].float() * (layout.alphas[module] / layout.ranks[module])
        b = _rows(m.kind, b, net, to_ours=False)
        for theirs, part in zip(m.theirs, b.split(m.sizes, dim=0)):
            out[f"{theirs}.lora_A.weight"] = a.contiguous().clone()
            out[f"{theirs}.lora_B.weight"] = part.contiguous().clone()
    return out


def from_diffusers(net: nn.Module, tensors: dict[str, torch.Tensor], alphas: dict[str, float], source: str
                   ) -> tuple[LoraLayout, dict[str, torch.Tensor]]:
    """A diffusers adapter (unprefixed keys; alpha per diffusers layer, rank when absent) as our layout and
    ``lora_state_dict``-named weights, each layer's scale folded into B (alpha = rank)."""
    maps, unused = _maps(net)
    by_theirs = {t: m for m in maps.values() for t in m.theirs}
    layers = linear_layers(net)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    unknown = [k for k in modules if k not in by_theirs and k not in unused]
    if unknown:
        raise AdapterError(f"{source}: adapter layer(s) {unknown[:4]} are not linear layers of a diffusers "
                         f"{diffusers_class(net)} like this base: is it an adapter for another model?")
    for module in modules:
        for part in ("lora_A", "lora_B"):
            if f"{module}.{part}.weight" not in tensors:
                raise AdapterError(f"{source}: {module} has no {part}.weight")
    layout, state = LoraLayout(ranks={}, alphas={}), {}
    for ours in sorted({by_theirs[k].ours for k in modules if k in by_theirs}):
        m, layer = maps[ours], layers[ours]
        a_parts, blocks, offset = [], [], 0
        for theirs, rows in zip(m.theirs, m.sizes):
            if f"{theirs}.lora_A.weight" in tensors:
                a, b = tensors[f"{theirs}.lora_A.weight"].float(), tensors[f"{theirs}.lora_B.weight"].float()
                if a.shape[1] != layer.in_features or b.shape[0] != rows or a.shape[0] != b.shape[1]:
                    raise AdapterError(f"{source}: {theirs}.lora_A/B have shapes {tuple(a.shape)} / {tuple(b.shape)}; this "
                                     f"base's {theirs} needs ({a.shape[0]}, {layer.in_features}) / ({rows}, {a.shape[0]}): "
                                     "an adapter for another base?")
                scale = alphas.get(theirs, float(a.shape[0])) / a.shape[0]
                a_parts.append(a)
                blocks.append((offset, rows, b * scale))
            offset += rows
        rank = sum(a.shape[0] for a in a_parts)
        b_full = torch.zeros(layer.out_features, rank)
        col = 0
        for (row0, rows, b) in blocks:
            b_full[row0:row0 + rows, col:col + b.shape[1]] = b
            col += b.shape[1]
        state[f"{ours}.lora_A.weight"] = torch.cat(a_parts, dim=0)
        state[f"{ours}.lora_B.weight"] = _rows(m.kind, b_full, net, to_ours=True).contiguous()
        layout.ranks[ours], layout.alphas[ours] = rank, float(rank)
    if not layout.ranks:
        raise AdapterError(f"{source}: the adapter adapts no layer that affects the output")
    return layout, state


def attach_lora(net: nn.Module, path: str | Path, dropout: float = 0.0) -> tuple[LoraLayout, Path]:
    """Add the adapter of a diffusers LoRA file (or directory) to ``net``, with its weights; returns its layout and file."""
    from flowmatch.adapters.lora import add_lora, load_lora_state

    tensors, alphas, file = read_lora(path)
    layout, state = from_diffusers(net, tensors, alphas, str(file))
    layout.dropout = dropout
    add_lora(net, layout)
    load_lora_state(net, state, str(file))
    return layout, file


# --- files ---------------------------------------------------------------------------------------
def lora_file(path: str | Path) -> Path:
    """The safetensors file of a LoRA given as a file or a directory (``pytorch_lora_weights.safetensors`` or its only one)."""
    path = Path(path)
    if path.is_dir():
        if (path / LORA_FILE).is_file():
            return path / LORA_FILE
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path}: expected {LORA_FILE} (or a single *.safetensors file), found "
                                    f"{[f.name for f in found] or 'none'}")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter {path} does not exist")
    if path.suffix != ".safetensors":
        raise AdapterError(f"LoRA adapter {path} is not a .safetensors file (diffusers writes {LORA_FILE}); "
                         "pickled .bin/.pt adapters are not read")
    return path


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, float], Path]:
    """A diffusers LoRA file's transformer tensors (keys without the ``transformer.`` prefix), the alpha of
    each layer that its metadata gives (none: alpha = rank), and the file read."""
    file = lora_file(path)
    try:
        raw = load_file(str(file))
        with safe_open(str(file), framework="pt") as fh:  # the header's metadata (diffusers' lora_adapter_metadata, if any)
            metadata = fh.metadata() or {}
    except (SafetensorError, ValueError, OSError) as err:
        raise AdapterError(f"{file} is not a readable safetensors file ({err})") from None
    others = sorted({k.split(".", 1)[0] for k in raw if k.startswith(_OTHER_COMPONENTS)})
    if others:
        print(f"note: {file} also adapts {others}; flowmatch reads precomputed text features, so only the "
              "transformer's adapter is used")
    tensors = {k.removeprefix(PREFIX): v for k, v in raw.items() if not k.startswith(_OTHER_COMPONENTS)}
    if not tensors:
        raise AdapterError(f"{file} holds no transformer adapter")
    odd = [k for k in tensors if not re.search(r"\.lora_[AB]\.weight$", k)]
    if odd:
        hint = (" (a kohya/A1111-style file: load it into a diffusers pipeline with load_lora_weights and write it "
                "back with save_lora_weights)" if any("lora_down" in k or "lora_up" in k for k in odd) else "")
        raise AdapterError(f"{file}: keys {odd[:3]} are not peft/diffusers LoRA weights (<layer>.lora_A.weight / "
                         f".lora_B.weight); DoRA magnitudes and LoRA biases are not supported{hint}")
    return tensors, _alphas_from_metadata(metadata, tensors), file


def _alphas_from_metadata(metadata: dict, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-layer alpha from diffusers' ``lora_adapter_metadata`` (peft LoraConfig fields, prefixed or not)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    config = {k.removeprefix(PREFIX): v for k, v in json.loads(raw).items()}
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    out = {}
    for key in tensors:
        module = key.rsplit(".lora_", 1)[0]
        value = alpha
        for pattern, a in patterns.items():  # peft: a pattern matches the end of the module name
            if re.match(rf"(.*\.)?({pattern})$", module):
                value = a
                break
        if value is not None:
            out[module] = float(value)
    return out


def write_lora(directory: str | Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Path:
    """Write diffusers-named adapter tensors as ``DIR/pytorch_lora_weights.safetensors``, ``transformer.``-prefixed
    as a pipeline's ``save_lora_weights`` writes them (``load_lora_weights`` / ``load_lora_adapter`` read it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / LORA_FILE
    save_file({PREFIX + k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    return file
