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

from flowmatch.networks.conditioning import ConditioningSpec
from flowmatch.networks.dit import dit_trunk_args
from flowmatch.networks.layers import (
    ConditionDropout,
    CrossAttention,
    Mlp,
    SelfAttention,
    VectorEmbedder,
    check_mask,
    compact_tokens,
    modulate,
    param_dtype,
)
from flowmatch.networks.text_condition import TextStream, check_text, drop_text, null_text, require_text, text_spec
from flowmatch.networks.trunk import PatchTransformer


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


class CrossDiT(PatchTransformer):
    """DiT + cross-attention to text tokens, called as ``net(z, t, cond)`` with the dict in this module's docstring."""

    #: default LoRA targets (flowmatch.adapters): self- and cross-attention and MLP of every block
    lora_target_modules = (r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|mlp\.fc[12])",)

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
        if max_text_tokens is not None and max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be a positive number of tokens or None (no limit), got {max_text_tokens}")
        super().__init__(in_channels=in_channels, out_channels=out_channels, gradient_checkpointing=gradient_checkpointing,
                         **dit_trunk_args(size, depth, hidden_size, num_heads, patch_size, input_size))
        self.pooled_dim, self.context_dim = pooled_dim, context_dim
        self.input_size, self.max_text_tokens = input_size, max_text_tokens

        d = self.hidden_size
        self.y_embedder = VectorEmbedder(pooled_dim, d) if pooled_dim else None
        self.pooled_dropout = ConditionDropout(pooled_dim, cond_drop_prob, learned_null) if pooled_dim else None
        self.context_embedder = nn.Linear(context_dim, d)
        self.tokens_dropout = ConditionDropout(context_dim, cond_drop_prob, learned_null)
        self.add_blocks(CrossDiTBlock(d, self.num_heads, mlp_ratio, qk_norm) for _ in range(self.depth))

    # ---- conditioning -------------------------------------------------------------------
    def _streams(self) -> list[TextStream]:
        return [TextStream("tokens", "mask", self.context_dim, self.max_text_tokens, "max_text_tokens", self.tokens_dropout)]

    @property
    def conditioning(self) -> ConditioningSpec:
        """The pooled vector (when pooled_dim > 0) and one token stream, cond["tokens"]."""
        return text_spec(self.pooled_dim, self._streams())

    def _check_cond(self, cond: object) -> dict:
        return require_text(cond, self.pooled_dropout, self._streams(), type(self).__name__)

    def null_condition(self, cond: dict) -> dict:
        """The unconditional counterpart of cond: null pooled vector and null tokens (same shapes), mask all True."""
        return null_text(self._check_cond(cond), self.pooled_dropout, self._streams())

    def drop_condition(self, cond: dict) -> dict:
        """Training-mode dropout: pooled and tokens independently replaced by their nulls (identity in eval)."""
        return drop_text(self._check_cond(cond), self.pooled_dropout, self._streams())

    def embed_condition(self, cond: dict, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor | None]]:
        """MLP(pooled vector) (None without one), and the context: the embedded tokens with the cross-attention's key mask."""
        cond = self._check_cond(cond)
        check_text(cond, x.shape[0], self.pooled_dim or None, self._streams(), type(self).__name__)
        cond = self.drop_condition(cond)
        dtype = param_dtype(self)
        vector = self.y_embedder(cond["pooled"].to(dtype)) if self.pooled_dim else None
        tokens, mask = compact_tokens(cond["tokens"], check_mask(cond.get("mask"), cond["tokens"], "mask"))  # same output, fewer tokens
        return vector, (self.context_embedder(tokens.to(dtype)), mask)

    def run_block(self, block: CrossDiTBlock, x: torch.Tensor, c: torch.Tensor, context):
        """Self-attention, cross-attention to the (fixed) embedded tokens, MLP."""
        tokens, key_mask = context
        return block(x, tokens, c, key_mask), context
