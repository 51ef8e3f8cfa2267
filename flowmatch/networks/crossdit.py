"""CrossDiT: DiT blocks with a cross-attention sublayer from image tokens to text tokens.

    c   = MLP(sinusoid(1000 t)) + MLP(pooled text vector)          (modulation, as in DiT / MM-DiT)
    ctx = Linear(text tokens)                                        (fixed through the blocks)
    N x [ x += gate_msa * SelfAttn (modulate(LN(x), shift_msa, scale_msa))
          x += gate_ca  * CrossAttn(modulate(LN(x), shift_ca,  scale_ca), ctx)
          x += gate_mlp * MLP      (modulate(LN(x), shift_mlp, scale_mlp)) ]   nine vectors regressed from c
    LN -> modulate -> Linear -> unpatchify

adaLN-Zero covers all three sublayers, so every block starts as the identity and the output at 0.
The condition is the same dict as MM-DiT's:
    "pooled": float (B, pooled_dim)       (only when pooled_dim > 0)
    "tokens": float (B, L, context_dim)
    "mask":   bool (B, L), optional       True = real token; masked keys are ignored by the cross-attention
Appending masked padding to a prompt leaves the output unchanged (to float32 rounding). A sample
whose mask is all False attends to all its tokens instead (an empty softmax would give NaN).
``max_text_tokens`` (default: no limit) makes a longer token sequence an error.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flowmatch.networks.dit import resolve_size
from flowmatch.networks.layers import (
    ConditionDropout,
    CrossAttention,
    FinalLayer,
    Mlp,
    PatchEmbed,
    SelfAttention,
    SinCosPosEmbed2D,
    TimestepEmbedder,
    VectorEmbedder,
    check_latents,
    check_mask,
    check_pooled,
    check_timesteps,
    check_tokens,
    drop_tokens,
    init_linears_xavier,
    modulate,
    num_params,
    param_dtype,
    require_keys,
    unpatchify,
    zero_init,
)


class CrossDiTBlock(nn.Module):
    """DiT block with adaLN-Zero self-attention, cross-attention to the context, and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm_ca = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size))

    def forward(self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        (shift_msa, scale_msa, gate_msa, shift_ca, scale_ca, gate_ca,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(9, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_ca.unsqueeze(1) * self.cross_attn(modulate(self.norm_ca(x), shift_ca, scale_ca), context, key_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class CrossDiT(nn.Module):
    """DiT + cross-attention to text tokens, called as ``net(z, t, cond)`` with the dict in this module's docstring."""

    def __init__(
        self,
        size: str | None = "S",
        patch_size: int = 2,
        depth: int | None = None,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        in_channels: int = 4,
        out_channels: int | None = None,
        input_size: int = 32,
        pooled_dim: int = 768,
        context_dim: int = 768,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        cond_drop_prob: float = 0.463,
        learned_null: bool = False,
        gradient_checkpointing: bool = False,
        max_text_tokens: int | None = None,
    ):
        """
        Args:
            size: named DiT size "S", "B", "L" or "XL", or None to give depth, hidden_size and num_heads.
            patch_size: patch side p in latent pixels.
            depth: number of blocks; overrides the named size.
            hidden_size: token width; overrides the named size.
            num_heads: attention heads; overrides the named size.
            in_channels: latent channels C of z.
            out_channels: output channels; None means in_channels.
            input_size: largest latent side; the position table covers input_size/p tokens per side, centre-cropped for smaller latents.
            pooled_dim: size of cond["pooled"]; 0 to condition on tokens only.
            context_dim: channels of cond["tokens"].
            mlp_ratio: MLP hidden width / token width.
            qk_norm: RMSNorm on queries and keys per head (self- and cross-attention).
            cond_drop_prob: probability of replacing each text input (pooled, tokens) by its null in training, independently.
            learned_null: learn the null inputs instead of using zeros.
            gradient_checkpointing: recompute block activations in the backward pass to save memory.
            max_text_tokens: refuse cond["tokens"] longer than this many tokens (None: no limit).
        """
        super().__init__()
        if max_text_tokens is not None and max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be a positive number of tokens or None (no limit), got {max_text_tokens}")
        depth, hidden_size, num_heads = resolve_size(size, depth, hidden_size, num_heads)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.depth, self.hidden_size, self.num_heads, self.patch_size = depth, hidden_size, num_heads, patch_size
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.pooled_dim, self.context_dim = pooled_dim, context_dim
        self.input_size, self.max_text_tokens = input_size, max_text_tokens
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.pos_embed = SinCosPosEmbed2D(hidden_size, input_size // patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = VectorEmbedder(pooled_dim, hidden_size) if pooled_dim else None
        self.pooled_dropout = ConditionDropout(pooled_dim, cond_drop_prob, learned_null) if pooled_dim else None
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.tokens_dropout = ConditionDropout(context_dim, cond_drop_prob, learned_null)
        self.blocks = nn.ModuleList(CrossDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) timestep MLP, zero adaLN modulation and final layer."""
        init_linears_xavier(self)
        self.x_embedder.reset_parameters()
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            zero_init(block.adaLN_modulation[-1])
        self.final_layer.reset_parameters()

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameters (the fixed position table is a buffer and not counted)."""
        return num_params(self, trainable_only)

    # ---- conditioning -------------------------------------------------------------------
    def _check_cond(self, cond: object) -> dict:
        return require_keys(cond, ("pooled", "tokens") if self.pooled_dim else ("tokens",), type(self).__name__)

    def null_condition(self, cond: dict) -> dict:
        """The unconditional counterpart of cond: null pooled vector and null tokens (same shapes), mask all True."""
        cond = self._check_cond(cond)
        out = dict(cond)
        if self.pooled_dim:
            out["pooled"] = self.pooled_dropout.null_like(cond["pooled"])
        out["tokens"] = self.tokens_dropout.null_like(cond["tokens"])
        if cond.get("mask") is not None:
            out["mask"] = torch.ones_like(cond["mask"])
        return out

    def drop_condition(self, cond: dict) -> dict:
        """Training-mode dropout: pooled and tokens independently replaced by their nulls (identity in eval)."""
        cond = self._check_cond(cond)
        out = dict(cond)
        if self.pooled_dim:
            out["pooled"] = self.pooled_dropout(cond["pooled"])[0]
        out["tokens"], mask = drop_tokens(self.tokens_dropout, cond["tokens"], cond.get("mask"))
        if mask is not None:
            out["mask"] = mask
        return out

    # ---- forward ------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """Velocity / noise prediction for latents z (B, C, H, W) at times t (B,); output shaped like z."""
        name = type(self).__name__
        h, w = check_latents(z, self.in_channels, self.patch_size, self.pos_embed.max_size, name, f"input_size={self.input_size}")
        b = z.shape[0]
        t = check_timesteps(t, b, name)
        cond = self._check_cond(cond)
        if self.pooled_dim:
            check_pooled(cond["pooled"], b, self.pooled_dim, name)
        check_tokens(cond["tokens"], b, self.context_dim, "tokens", name, self.max_text_tokens, "max_text_tokens")
        cond = self.drop_condition(cond)
        dtype = param_dtype(self)

        x = self.x_embedder(z.to(dtype))
        x = x + self.pos_embed(h, w).to(x.dtype)
        c = self.t_embedder(t)
        if self.pooled_dim:
            c = c + self.y_embedder(cond["pooled"].to(dtype))
        tokens = cond["tokens"]
        context = self.context_embedder(tokens.to(dtype))
        key_mask = check_mask(cond.get("mask"), tokens, "mask")

        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, context, c, key_mask, use_reentrant=False)
            else:
                x = block(x, context, c, key_mask)
        x = self.final_layer(x, c)
        return unpatchify(x, h, w, self.patch_size, self.out_channels).to(z.dtype)
