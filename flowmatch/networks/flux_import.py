"""Load a diffusers ``FluxTransformer2DModel`` directory into our ``FLUX``, and write one back.

diffusers' transformer takes the latents already packed: 2x2 latent pixels of every channel make one
token of 4C values ordered (channel, row, column), so FLUX.1's ``in_channels=64, patch_size=1`` is our
``in_channels=16, patch_size=2`` (the trunk's patchify is the same packing). The mapping of every
tensor (diffusers name -> ours):

    x_embedder                                              -> x_embedder.proj           (weight (D, 4C) -> conv kernel (D, C, 2, 2))
    time_text_embed.timestep_embedder.linear_{1,2}          -> t_embedder.mlp.{0,2}
    time_text_embed.guidance_embedder.linear_{1,2}          -> guidance_embedder.mlp.{0,2}   (guidance_embeds only)
    time_text_embed.text_embedder.linear_{1,2}              -> y_embedder.mlp.{0,2}
    context_embedder                                        -> context_embedder
    transformer_blocks.i.norm1.linear                       -> blocks.i.image.adaLN_modulation.1     (same 6-chunk order)
    transformer_blocks.i.attn.to_{q,k,v}                    -> blocks.i.image.qkv                    (concatenated rows)
    transformer_blocks.i.attn.norm_{q,k}                    -> blocks.i.image.{q,k}_norm
    transformer_blocks.i.attn.to_out.0                      -> blocks.i.image.proj
    transformer_blocks.i.ff.net.{0.proj,2}                  -> blocks.i.image.mlp.fc{1,2}
    transformer_blocks.i.norm1_context.linear               -> blocks.i.text.0.adaLN_modulation.1
    transformer_blocks.i.attn.add_{q,k,v}_proj              -> blocks.i.text.0.qkv
    transformer_blocks.i.attn.norm_added_{q,k}              -> blocks.i.text.0.{q,k}_norm
    transformer_blocks.i.attn.to_add_out                    -> blocks.i.text.0.proj
    transformer_blocks.i.ff_context.net.{0.proj,2}          -> blocks.i.text.0.mlp.fc{1,2}
    single_transformer_blocks.j.norm.linear                 -> blocks.(N+j).adaLN_modulation.1      (same 3-chunk order)
    single_transformer_blocks.j.{attn.to_q,attn.to_k,attn.to_v,proj_mlp}
                                                            -> blocks.(N+j).linear1               (concatenated rows)
    single_transformer_blocks.j.attn.norm_{q,k}             -> blocks.(N+j).{q,k}_norm
    single_transformer_blocks.j.proj_out                    -> blocks.(N+j).linear2
    norm_out.linear                                         -> final_layer.adaLN_modulation.1     (halves swapped)
    proj_out                                                -> final_layer.linear                 (rows permuted)

N is the number of double-stream blocks. ``norm_out`` is diffusers' AdaLayerNormContinuous, which
chunks as (scale, shift); ours is (shift, scale). ``proj_out`` orders a token's outputs (channel, row,
column), ours (row, column, channel). Every tensor is used: a missing or unexpected one is an error
naming it. The config mapping refuses keys it does not know, ``patch_size`` other than 1 (the FLUX
pipelines pack 2x2 outside the transformer and always use 1), and ``in_channels`` / ``out_channels`` not
divisible by 4. FLUX.1 Fill / Depth / Canny (in_channels 384 / 128, out_channels 64) import as a FLUX
whose input has the extra conditioning channels concatenated to the latents (96 / 32 channels in, 16 out).

diffusers computes text position ids and rotary angles outside the stored weights; its pipelines put
every text token at id 0 and image tokens at (0, row, column) of the packed grid, as our FLUX does, with
theta 10000 and MLP ratio 4 (fixed in diffusers; a FLUX with other values has no diffusers layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from flowmatch.networks.diffusers_files import (
    check_class_name,
    read_config,
    read_safetensors,
    resolve_model_dir,
    swap_halves,
    write_model_dir,
)
from flowmatch.networks.flux import FLUX

CLASS_NAME = "FluxTransformer2DModel"
#: diffusers config keys we understand; anything else is refused (it might change the architecture).
_CONFIG_KEYS = {
    "patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
    "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope",
}
PACK = 2  # latent pixels per token side (FLUX.1's 2x2 packing)
ROPE_THETA = 10000.0  # fixed in diffusers' FluxPosEmbed
MLP_RATIO = 4.0  # fixed in diffusers' FLUX blocks

# how the diffusers tensors of a row combine into ours
_COPY, _CAT, _SWAP, _PATCH_IN, _PATCH_OUT = "copy", "cat", "swap", "patch_in", "patch_out"


class _Row(NamedTuple):
    ours: str
    theirs: list[str]
    kind: str
    sizes: list[int] | None = None  # _CAT: rows of each diffusers tensor


def flux_kwargs_from_diffusers_config(config: dict, source: str = "config.json") -> dict:
    """FLUX constructor arguments for a diffusers FluxTransformer2DModel config dict (diffusers' defaults
    for absent keys, which are FLUX.1's)."""
    check_class_name(config, CLASS_NAME, source)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown {CLASS_NAME} config key(s) {unknown}; refusing to guess their meaning")
    g = lambda key, default=None: config.get(key, default)  # noqa: E731  (diffusers' defaults)
    patch = g("patch_size", 1)
    if patch != 1:
        raise NotImplementedError(
            f"{source}: patch_size={patch} is not supported: the FLUX pipelines pack 2x2 latent pixels into a token "
            "outside the transformer and always use patch_size 1 (flowmatch's FLUX does that packing as patch_size 2)"
        )
    in_channels = g("in_channels", 64)
    out_channels = g("out_channels") or in_channels  # diffusers: out_channels or in_channels
    for key, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(value, int) or value <= 0 or value % (PACK * PACK):
            raise ValueError(f"{source}: {key}={value!r} is not a positive multiple of {PACK * PACK}: FLUX tokens pack "
                             f"{PACK}x{PACK} latent pixels of every channel (FLUX.1: 64 = 16 latent channels x 4)")
    heads, head_dim = g("num_attention_heads", 24), g("attention_head_dim", 128)
    axes = list(g("axes_dims_rope", [16, 56, 56]))
    if sum(axes) != head_dim or len(axes) != 3:
        raise ValueError(f"{source}: axes_dims_rope {axes} must be 3 parts summing to attention_head_dim {head_dim} "
                         "(the rotary embedding of (0, row, column) splits the head dim)")
    return dict(
        num_double_blocks=g("num_layers", 19),
        num_single_blocks=g("num_single_layers", 38),
        hidden_size=heads * head_dim,
        num_heads=heads,
        in_channels=in_channels // (PACK * PACK),
        out_channels=out_channels // (PACK * PACK),
        patch_size=PACK,
        pooled_dim=g("pooled_projection_dim", 768),
        context_dim=g("joint_attention_dim", 4096),
        axes_dim=axes,
        guidance_embed=bool(g("guidance_embeds", False)),
    )


def _key_map(model: FLUX) -> list[_Row]:
    """Every parameter of ``model`` with the diffusers tensors it comes from and how they combine."""
    rows: list[_Row] = []
    d = model.hidden_size

    def lin(ours: str, theirs: str | list[str], kind: str = _COPY, sizes: list[int] | None = None) -> None:
        theirs = [theirs] if isinstance(theirs, str) else theirs
        for suffix in ("weight", "bias"):
            rows.append(_Row(f"{ours}.{suffix}", [f"{t}.{suffix}" for t in theirs], kind, sizes))

    def norms(ours: str, src: str, q: str, k: str) -> None:
        rows.append(_Row(f"{ours}.q_norm.weight", [f"{src}.{q}.weight"], _COPY))
        rows.append(_Row(f"{ours}.k_norm.weight", [f"{src}.{k}.weight"], _COPY))

    rows.append(_Row("x_embedder.proj.weight", ["x_embedder.weight"], _PATCH_IN))
    rows.append(_Row("x_embedder.proj.bias", ["x_embedder.bias"], _COPY))
    embedders = [("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")]
    if model.guidance_embedder is not None:
        embedders.append(("guidance_embedder", "guidance_embedder"))
    for ours, theirs in embedders:
        lin(f"{ours}.mlp.0", f"time_text_embed.{theirs}.linear_1")
        lin(f"{ours}.mlp.2", f"time_text_embed.{theirs}.linear_2")
    lin("context_embedder", "context_embedder")
    for i in range(model.num_double_blocks):
        src, img, txt = f"transformer_blocks.{i}", f"blocks.{i}.image", f"blocks.{i}.text.0"
        lin(f"{img}.adaLN_modulation.1", f"{src}.norm1.linear")
        lin(f"{img}.qkv", [f"{src}.attn.to_q", f"{src}.attn.to_k", f"{src}.attn.to_v"], _CAT, [d, d, d])
        norms(img, f"{src}.attn", "norm_q", "norm_k")
        lin(f"{img}.proj", f"{src}.attn.to_out.0")
        lin(f"{img}.mlp.fc1", f"{src}.ff.net.0.proj")
        lin(f"{img}.mlp.fc2", f"{src}.ff.net.2")
        lin(f"{txt}.adaLN_modulation.1", f"{src}.norm1_context.linear")
        lin(f"{txt}.qkv", [f"{src}.attn.add_q_proj", f"{src}.attn.add_k_proj", f"{src}.attn.add_v_proj"], _CAT, [d, d, d])
        norms(txt, f"{src}.attn", "norm_added_q", "norm_added_k")
        lin(f"{txt}.proj", f"{src}.attn.to_add_out")
        lin(f"{txt}.mlp.fc1", f"{src}.ff_context.net.0.proj")
        lin(f"{txt}.mlp.fc2", f"{src}.ff_context.net.2")
    for j, block in enumerate(model.single_blocks):
        src, dst = f"single_transformer_blocks.{j}", f"blocks.{model.num_double_blocks + j}"
        lin(f"{dst}.adaLN_modulation.1", f"{src}.norm.linear")
        lin(f"{dst}.linear1", [f"{src}.attn.to_q", f"{src}.attn.to_k", f"{src}.attn.to_v", f"{src}.proj_mlp"], _CAT,
            [d, d, d, block.mlp_hidden])
        norms(dst, f"{src}.attn", "norm_q", "norm_k")
        lin(f"{dst}.linear2", f"{src}.proj_out")
    lin("final_layer.adaLN_modulation.1", "norm_out.linear", _SWAP)
    lin("final_layer.linear", "proj_out", _PATCH_OUT)
    return rows


def diffusers_key_map(model: FLUX) -> list[_Row]:
    """Every parameter of ``model`` with the diffusers tensors it maps to and how ("copy", "cat" with the rows of
    each part, "swap", "patch_in", "patch_out"); flowmatch.adapters.diffusers_lora maps LoRA updates with it."""
    return _key_map(model)


def _token_order(x: torch.Tensor, channels: int, to_ours: bool) -> torch.Tensor:
    """Permute the rows of the final projection: diffusers' (channel, row, column) <-> our (row, column, channel)."""
    rest = x.shape[1:]
    if to_ours:
        return x.reshape(channels, PACK, PACK, *rest).permute(1, 2, 0, *range(3, x.dim() + 2)).reshape(x.shape)
    return x.reshape(PACK, PACK, channels, *rest).permute(2, 0, 1, *range(3, x.dim() + 2)).reshape(x.shape)


def _to_ours(row: _Row, parts: list[torch.Tensor], model: FLUX, shape: torch.Size) -> torch.Tensor:
    if row.kind == _CAT:
        return torch.cat(parts, dim=0)
    value = parts[0]
    if row.kind == _SWAP:
        return swap_halves(value)
    if row.kind == _PATCH_IN:  # (D, C*2*2) in (channel, row, column) order is a conv kernel (D, C, 2, 2)
        return value.reshape(shape) if value.numel() == shape.numel() and value.dim() == 2 else value
    if row.kind == _PATCH_OUT:
        if value.shape[0] != shape[0]:
            return value  # the shape check names it
        return _token_order(value, model.out_channels, to_ours=True)
    return value


def _to_theirs(row: _Row, value: torch.Tensor, model: FLUX) -> list[torch.Tensor]:
    if row.kind == _CAT:
        return list(value.split(row.sizes, dim=0))
    if row.kind == _SWAP:
        return [swap_halves(value)]
    if row.kind == _PATCH_IN:
        return [value.reshape(value.shape[0], -1)]
    if row.kind == _PATCH_OUT:
        return [_token_order(value, model.out_channels, to_ours=False)]
    return [value]


def load_flux_diffusers(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    cond_drop_prob: float = 0.1,
    gradient_checkpointing: bool = False,
) -> FLUX:
    """Build a ``FLUX`` from a diffusers ``FluxTransformer2DModel`` directory and load all its weights.

    Args:
        directory: the transformer directory (config.json + *.safetensors, possibly sharded with an
            index json), or a pipeline directory holding it under ``transformer/``.
        dtype: parameter dtype of the returned model.
        cond_drop_prob: training-time conditioning dropout of the returned model (FLUX's default, 0.1;
            FLUX.1's training recipe is unpublished).
        gradient_checkpointing: passed to the FLUX constructor.

    The model is returned in eval mode. For latents z (B, C, 2h, 2w) its output
    ``model(z, t, {"pooled": pooled, "tokens": tokens, "guidance": g})`` equals diffusers'
    ``transformer(hidden_states=pack(z), encoder_hidden_states=tokens, pooled_projections=pooled,
    timestep=t, guidance=g, img_ids=img_ids, txt_ids=zeros).sample`` unpacked, where pack is the FLUX
    pipelines' ``_pack_latents`` and img_ids their (0, row, column) grid (no "guidance" for schnell).
    """
    path = resolve_model_dir(directory, CLASS_NAME)
    config = read_config(path)
    kwargs = flux_kwargs_from_diffusers_config(config, source=str(path / "config.json"))
    with torch.device("meta"):
        model = FLUX(**kwargs, cond_drop_prob=cond_drop_prob, gradient_checkpointing=gradient_checkpointing)

    tensors = read_safetensors(path)
    expected = dict(model.state_dict())
    rows = _key_map(model)
    needed = {name for row in rows for name in row.theirs}
    missing = sorted(needed - set(tensors))
    if missing:
        raise KeyError(f"{path}: checkpoint lacks tensor(s) {missing}")
    unexpected = sorted(set(tensors) - needed)
    if unexpected:
        raise KeyError(f"{path}: unexpected tensor(s) in checkpoint {unexpected}")
    unmapped = sorted(set(expected) - {row.ours for row in rows})
    if unmapped:  # e.g. learned null inputs: a FLUX option diffusers has no tensor for
        raise RuntimeError(f"internal error: no diffusers tensor maps to {unmapped}")

    state: dict[str, torch.Tensor] = {}
    for row in rows:
        shape = expected[row.ours].shape
        value = _to_ours(row, [tensors[name] for name in row.theirs], model, shape)
        if value.shape != shape:
            raise ValueError(f"{path}: tensor(s) {row.theirs} have shape {tuple(value.shape)}, "
                             f"expected {tuple(shape)} for {row.ours}")
        state[row.ours] = value.to(dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def flux_diffusers_config(model: FLUX) -> dict:
    """The diffusers FluxTransformer2DModel config of ``model``; an error if diffusers cannot express it."""
    if model.patch_size != PACK:
        raise ValueError(f"FLUX with patch_size={model.patch_size} has no diffusers FluxTransformer2DModel layout "
                         f"(its pipelines pack {PACK}x{PACK} latent pixels per token)")
    if model.rope_theta != ROPE_THETA:
        raise ValueError(f"FLUX with rope_theta={model.rope_theta} has no diffusers FluxTransformer2DModel layout "
                         f"(diffusers fixes theta {ROPE_THETA:g})")
    if len(model.axes_dim) != 3:
        raise ValueError(f"FLUX with axes_dim {list(model.axes_dim)} has no diffusers layout (3 rotary axes expected)")
    config = {
        "_class_name": CLASS_NAME,
        "patch_size": 1,
        "in_channels": model.in_channels * PACK * PACK,
        "out_channels": model.out_channels * PACK * PACK,
        "num_layers": model.num_double_blocks,
        "num_single_layers": model.num_single_blocks,
        "attention_head_dim": model.hidden_size // model.num_heads,
        "num_attention_heads": model.num_heads,
        "joint_attention_dim": model.context_dim,
        "pooled_projection_dim": model.pooled_dim,
        "guidance_embeds": model.guidance_embedder is not None,
        "axes_dims_rope": list(model.axes_dim),
    }
    # every tensor must have the shape the config implies (the MLP ratio, fixed at 4 in diffusers, included)
    with torch.device("meta"):
        rebuilt = FLUX(**flux_kwargs_from_diffusers_config(config, source="the exported config"))
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = sorted(set(ours) - set(theirs))
    if extra:
        raise ValueError(f"parameters {extra} (e.g. learned null inputs) have no diffusers {CLASS_NAME} counterpart")
    differ = sorted(k for k in ours if ours[k] != theirs[k])
    if differ:
        raise ValueError(f"FLUX tensor(s) {differ[:3]} have shapes diffusers' {CLASS_NAME} cannot hold "
                         f"(e.g. an MLP ratio other than {MLP_RATIO:g}): {[ours[k] for k in differ[:3]]} vs "
                         f"{[theirs[k] for k in differ[:3]]}")
    return config


def flux_diffusers_state_dict(model: FLUX) -> dict[str, torch.Tensor]:
    """Our FLUX's weights under diffusers' FluxTransformer2DModel names (the inverse of the import)."""
    flux_diffusers_config(model)  # refuses what diffusers cannot express
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for row in _key_map(model):
        for name, part in zip(row.theirs, _to_theirs(row, sd[row.ours], model)):
            out[name] = part.contiguous().clone()
    return out


def save_flux_diffusers(model: FLUX, directory: str | Path) -> Path:
    """Write ``model`` as a diffusers FluxTransformer2DModel directory (config.json + one safetensors file),
    which ``FluxTransformer2DModel.from_pretrained(directory)`` loads."""
    return write_model_dir(directory, flux_diffusers_config(model), flux_diffusers_state_dict(model))
