"""Load a diffusers ``SD3Transformer2DModel`` directory (config.json + safetensors) into our ``MMDiT``.

The mapping of every tensor (diffusers name -> ours):

    pos_embed.proj                                  -> x_embedder.proj
    time_text_embed.timestep_embedder.linear_{1,2}  -> t_embedder.mlp.{0,2}
    time_text_embed.text_embedder.linear_{1,2}      -> y_embedder.mlp.{0,2}
    context_embedder                                -> context_embedders.0
    transformer_blocks.i.norm1.linear               -> blocks.i.image.adaLN_modulation.1       (same 6-chunk order)
    transformer_blocks.i.attn.to_{q,k,v}            -> blocks.i.image.qkv                      (concatenated rows)
    transformer_blocks.i.attn.norm_{q,k}            -> blocks.i.image.{q,k}_norm
    transformer_blocks.i.attn.to_out.0              -> blocks.i.image.proj
    transformer_blocks.i.ff.net.{0.proj,2}          -> blocks.i.image.mlp.fc{1,2}
    transformer_blocks.i.norm1_context.linear       -> blocks.i.text.0.adaLN_modulation.1
    transformer_blocks.i.attn.add_{q,k,v}_proj      -> blocks.i.text.0.qkv
    transformer_blocks.i.attn.norm_added_{q,k}      -> blocks.i.text.0.{q,k}_norm
    transformer_blocks.i.attn.to_add_out            -> blocks.i.text.0.proj
    transformer_blocks.i.ff_context.net.{0.proj,2}  -> blocks.i.text.0.mlp.fc{1,2}
    norm_out.linear                                 -> final_layer.adaLN_modulation.1          (rows permuted)
    proj_out                                        -> final_layer.linear

Last block (text stream pre-only): norm1_context is diffusers' AdaLayerNormContinuous, which chunks
as (scale, shift) like norm_out; ours is (shift, scale), so those rows are swapped. Its
add_{k,v}_proj become ``kv``. Its add_q_proj and norm_added_q exist in the checkpoint but never
affect diffusers' output (the text queries of the last block are discarded), so they are read
and dropped. ``pos_embed.pos_embed`` (the fixed position table diffusers stores) is compared with
ours and dropped. Any other missing or unexpected tensor is an error naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowmatch.networks.diffusers_files import (
    check_class_name,
    read_config,
    read_safetensors,
    resolve_model_dir,
    swap_halves,
    write_model_dir,
)
from flowmatch.networks.mmdit import MMDiT

#: diffusers config keys we understand; anything else is refused (it might change the architecture).
_CONFIG_KEYS = {
    "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
    "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
    "pos_embed_max_size", "dual_attention_layers", "qk_norm",
}

_COPY, _CAT, _SWAP = "copy", "cat", "swap"


def _resolve_dir(directory: str | Path) -> Path:
    """The SD3 transformer directory: ``directory`` or its ``transformer/`` (a pipeline directory)."""
    return resolve_model_dir(directory, "SD3Transformer2DModel")


def mmdit_kwargs_from_sd3_config(config: dict, source: str = "config.json") -> dict:
    """MMDiT constructor arguments for a diffusers SD3Transformer2DModel config dict."""
    check_class_name(config, "SD3Transformer2DModel", source)  # a FLUX directory is told to use the FLUX import
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown SD3Transformer2DModel config key(s) {unknown}; refusing to guess their meaning")
    if config.get("dual_attention_layers"):
        raise NotImplementedError(
            f"{source}: dual_attention_layers={config['dual_attention_layers']} (SD3.5 MMDiT-X, e.g. SD3.5 Medium) is not "
            "implemented by flowmatch's MMDiT; SD3 Medium and SD3.5 Large/Turbo (no dual attention) are supported"
        )
    qk_norm = config.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise NotImplementedError(f"{source}: qk_norm={qk_norm!r} is not supported (only None and 'rms_norm')")
    g = lambda key, default=None: config.get(key, default)  # noqa: E731  (diffusers' defaults)
    heads, head_dim = g("num_attention_heads", 18), g("attention_head_dim", 64)
    hidden = heads * head_dim
    caption = g("caption_projection_dim", 1152)
    if caption != hidden:
        raise ValueError(f"{source}: caption_projection_dim {caption} differs from num_attention_heads * attention_head_dim = {hidden}")
    patch = g("patch_size", 2)
    return dict(
        depth=g("num_layers", 18),
        hidden_size=hidden,
        num_heads=heads,
        in_channels=g("in_channels", 16),
        out_channels=g("out_channels", 16) or g("in_channels", 16),
        patch_size=patch,
        pooled_dim=g("pooled_projection_dim", 2048),
        context_dim=g("joint_attention_dim", 4096),
        qk_norm=qk_norm == "rms_norm",
        pos_embed_max_size=g("pos_embed_max_size", 96),
        pos_embed_base_size=g("sample_size", 128) // patch,
    )


def _key_map(model: MMDiT) -> list[tuple[str, list[str], str]]:
    """(our parameter name, diffusers tensor names, how to combine them) for every parameter of ``model``."""
    rows: list[tuple[str, list[str], str]] = []

    def lin(ours: str, theirs: str | list[str], kind: str = _COPY) -> None:
        theirs = [theirs] if isinstance(theirs, str) else theirs
        for suffix in ("weight", "bias"):
            rows.append((f"{ours}.{suffix}", [f"{t}.{suffix}" for t in theirs], kind))

    lin("x_embedder.proj", "pos_embed.proj")
    lin("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    lin("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    lin("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    lin("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    lin("context_embedders.0", "context_embedder")
    for i, block in enumerate(model.blocks):
        src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
        img, txt = f"{dst}.image", f"{dst}.text.0"
        lin(f"{img}.adaLN_modulation.1", f"{src}.norm1.linear")
        lin(f"{img}.qkv", [f"{src}.attn.to_q", f"{src}.attn.to_k", f"{src}.attn.to_v"], _CAT)
        lin(f"{img}.proj", f"{src}.attn.to_out.0")
        lin(f"{img}.mlp.fc1", f"{src}.ff.net.0.proj")
        lin(f"{img}.mlp.fc2", f"{src}.ff.net.2")
        if model.qk_norm:
            rows.append((f"{img}.q_norm.weight", [f"{src}.attn.norm_q.weight"], _COPY))
            rows.append((f"{img}.k_norm.weight", [f"{src}.attn.norm_k.weight"], _COPY))
            rows.append((f"{txt}.k_norm.weight", [f"{src}.attn.norm_added_k.weight"], _COPY))
        if block.text_pre_only:
            lin(f"{txt}.adaLN_modulation.1", f"{src}.norm1_context.linear", _SWAP)
            lin(f"{txt}.kv", [f"{src}.attn.add_k_proj", f"{src}.attn.add_v_proj"], _CAT)
        else:
            lin(f"{txt}.adaLN_modulation.1", f"{src}.norm1_context.linear")
            lin(f"{txt}.qkv", [f"{src}.attn.add_q_proj", f"{src}.attn.add_k_proj", f"{src}.attn.add_v_proj"], _CAT)
            lin(f"{txt}.proj", f"{src}.attn.to_add_out")
            lin(f"{txt}.mlp.fc1", f"{src}.ff_context.net.0.proj")
            lin(f"{txt}.mlp.fc2", f"{src}.ff_context.net.2")
            if model.qk_norm:
                rows.append((f"{txt}.q_norm.weight", [f"{src}.attn.norm_added_q.weight"], _COPY))
    lin("final_layer.adaLN_modulation.1", "norm_out.linear", _SWAP)
    lin("final_layer.linear", "proj_out")
    return rows


def diffusers_key_map(model: MMDiT) -> list[tuple[str, list[str], str]]:
    """Every parameter of ``model`` with the diffusers tensors it maps to and how ("copy", "cat": rows stacked,
    "swap": halves swapped); flowmatch.adapters.diffusers_lora maps LoRA updates with it."""
    return _key_map(model)


def diffusers_unused_keys(model: MMDiT) -> list[str]:
    """diffusers tensors that exist but never influence its output (the last block's text query)."""
    return _unused_keys(model)


def sd3_unused_query_params(hidden_size: int, num_heads: int, qk_norm: bool = False) -> int:
    """Parameters a diffusers SD3 checkpoint stores for the last block's (discarded) text query, per text stream:
    add_q_proj (weight and bias) and, with QK-norm, norm_added_q. Our MMDiT has no such tensors."""
    return hidden_size * hidden_size + hidden_size + (hidden_size // num_heads if qk_norm else 0)


def _unused_keys(model: MMDiT) -> list[str]:
    """diffusers tensors that exist but never influence its output (the last block's text query)."""
    src = f"transformer_blocks.{model.depth - 1}.attn"
    keys = [f"{src}.add_q_proj.weight", f"{src}.add_q_proj.bias"]
    if model.qk_norm:
        keys.append(f"{src}.norm_added_q.weight")
    return keys


def load_sd3_diffusers(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    cond_drop_prob: float = 0.463,
    gradient_checkpointing: bool = False,
) -> MMDiT:
    """Build an ``MMDiT`` from a diffusers ``SD3Transformer2DModel`` directory and load all its weights.

    Args:
        directory: the transformer directory (config.json + *.safetensors, possibly sharded with an
            index json), or a pipeline directory holding it under ``transformer/``.
        dtype: parameter dtype of the returned model.
        cond_drop_prob: training-time conditioning dropout of the returned model (SD3: 0.463).
        gradient_checkpointing: passed to the MMDiT constructor.

    The model is returned in eval mode. Its output equals diffusers' ``transformer(hidden_states=z,
    encoder_hidden_states=tokens, pooled_projections=pooled, timestep=1000 * t).sample`` for
    ``model(z, t, {"pooled": pooled, "tokens": tokens})``.
    """
    path = _resolve_dir(directory)
    config = read_config(path)
    kwargs = mmdit_kwargs_from_sd3_config(config, source=str(path / "config.json"))
    with torch.device("meta"):
        model = MMDiT(**kwargs, cond_drop_prob=cond_drop_prob, gradient_checkpointing=gradient_checkpointing)

    tensors = read_safetensors(path)
    expected = dict(model.state_dict())
    rows = _key_map(model)
    needed = {name for _, names, _ in rows for name in names}
    missing = sorted(needed - set(tensors))
    if missing:
        raise KeyError(f"{path}: checkpoint lacks tensor(s) {missing}")
    unused = _unused_keys(model)
    unexpected = sorted(set(tensors) - needed - set(unused) - {"pos_embed.pos_embed"})
    if unexpected:
        raise KeyError(f"{path}: unexpected tensor(s) in checkpoint {unexpected}")
    absent_unused = sorted(set(unused) - set(tensors))
    if absent_unused:
        raise KeyError(f"{path}: checkpoint lacks tensor(s) {absent_unused}")

    state: dict[str, torch.Tensor] = {}
    for ours, theirs, kind in rows:
        parts = [tensors[name] for name in theirs]
        value = torch.cat(parts, dim=0) if kind == _CAT else parts[0]
        if kind == _SWAP:
            value = swap_halves(value)
        if value.shape != expected[ours].shape:
            raise ValueError(f"{path}: tensor(s) {theirs} have shape {tuple(value.shape)}, expected {tuple(expected[ours].shape)} for {ours}")
        state[ours] = value.to(dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    model.pos_embed.table = model.pos_embed.build_table().to(dtype)

    stored = tensors.get("pos_embed.pos_embed")
    if stored is not None:
        ours = model.pos_embed.table
        if stored.numel() != ours.numel():
            raise ValueError(f"{path}: pos_embed.pos_embed has shape {tuple(stored.shape)}, expected (1, {ours.shape[0]}, {ours.shape[1]})")
        tol = max(1e-5, 2 * torch.finfo(stored.dtype).eps)
        err = (stored.reshape(ours.shape).float() - ours.float()).abs().max().item()
        if err > tol:
            raise ValueError(
                f"{path}: the stored position table pos_embed.pos_embed differs from the sin-cos table built from "
                f"pos_embed_max_size={kwargs['pos_embed_max_size']}, base size sample_size/patch_size="
                f"{kwargs['pos_embed_base_size']} (max abs difference {err:.3g})"
            )
    return model.eval()


def sd3_diffusers_state_dict(model: MMDiT) -> dict[str, torch.Tensor]:
    """Our MMDiT's weights under diffusers' SD3Transformer2DModel names (the inverse of the import).

    The last block's unused text query (add_q_proj, norm_added_q) is written as zeros / ones.
    Only the standard 2-set model with a zero null has a diffusers layout.
    """
    if model.context_dim_2 is not None:
        raise ValueError("the 3-sets MMDiT (context_dim_2) has no diffusers SD3Transformer2DModel layout")
    sd = model.state_dict()
    extra = sorted(k for k in sd if "dropout" in k)
    if extra:
        raise ValueError(f"parameters {extra} (learned null inputs) have no diffusers SD3Transformer2DModel counterpart")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, kind in _key_map(model):
        value = sd[ours]
        if kind == _SWAP:
            value = swap_halves(value)
        parts = value.chunk(len(theirs), dim=0) if kind == _CAT else [value]
        for name, part in zip(theirs, parts):
            out[name] = part.contiguous().clone()
    d = model.hidden_size
    src = f"transformer_blocks.{model.depth - 1}.attn"
    ref = sd["final_layer.linear.weight"]
    out[f"{src}.add_q_proj.weight"] = torch.zeros(d, d, dtype=ref.dtype)
    out[f"{src}.add_q_proj.bias"] = torch.zeros(d, dtype=ref.dtype)
    if model.qk_norm:
        out[f"{src}.norm_added_q.weight"] = torch.ones(d // model.num_heads, dtype=ref.dtype)
    out["pos_embed.pos_embed"] = model.pos_embed.table.unsqueeze(0).to(ref.dtype).contiguous().clone()
    return out


def save_sd3_diffusers(model: MMDiT, directory: str | Path) -> Path:
    """Write ``model`` as a diffusers SD3Transformer2DModel directory (config.json + one safetensors file)."""
    pe = model.pos_embed
    base = pe.base_size if pe.base_size is not None else pe.max_size
    config = {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": base * model.patch_size,
        "patch_size": model.patch_size,
        "in_channels": model.in_channels,
        "num_layers": model.depth,
        "attention_head_dim": model.hidden_size // model.num_heads,
        "num_attention_heads": model.num_heads,
        "joint_attention_dim": model.context_dim,
        "caption_projection_dim": model.hidden_size,
        "pooled_projection_dim": model.pooled_dim,
        "out_channels": model.out_channels,
        "pos_embed_max_size": pe.max_size,
        "dual_attention_layers": [],
        "qk_norm": "rms_norm" if model.qk_norm else None,
    }
    return write_model_dir(directory, config, sd3_diffusers_state_dict(model))
