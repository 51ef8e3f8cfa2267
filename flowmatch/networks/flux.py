"""FLUX.1 (Black Forest Labs 2024): the rectified-flow transformer of double- and single-stream blocks.

Checked against black-forest-labs/flux (src/flux/model.py, modules/layers.py, math.py) and diffusers'
FluxTransformer2DModel (docs/spec.md §10):

    z (B, C, 2h, 2w) --pack 2x2--> image tokens (B, h w, 4C) --Linear--> (B, h w, D)    (no position table)
    vec = MLP(sinusoid(1000 t)) [+ MLP(sinusoid(1000 g)), guidance_embed] + MLP(pooled text vector)
    txt = Linear(text tokens)
    rope: 3-axis rotary embedding of (0, row, column) per image token, text tokens at 0   (rope.py)
    N_double x double-stream block: image and text each with their own adaLN (6 chunks), fused qkv,
        QK-RMSNorm, projection and GELU(tanh) MLP; attention JOINT over [text; image]  (= an MM-DiT block)
    N_single x single-stream block on [text; image]: adaLN (3 chunks), one linear to qkv and the MLP input,
        attention and MLP in parallel, one linear back; x + gate * out
    text tokens dropped; LN -> adaLN (shift, scale) -> Linear(4C) -> unpack

The double-stream block is :class:`MMDiTBlock` with QK-norm and RoPE: the same computation. Packing is
the trunk's patchify with patch 2 (a token holds the 2x2 latent pixels of every channel), so FLUX.1's
"in_channels 64" is ``in_channels=16, patch_size=2`` here; flowmatch.networks.flux_import maps
diffusers' tensors, whose final projection orders a token's values (channel, row, column) where ours are (row, column, channel).

Conditioning dict (``cond``):
    "pooled":   float (B, pooled_dim)       pooled text vector (FLUX.1: CLIP-L, 768)
    "tokens":   float (B, L, context_dim)   text token sequence (FLUX.1: T5-XXL, 4096, L <= 512 for dev)
    "mask":     bool (B, L), optional       True = real token (FLUX.1 attends to padding; diffusers passes no mask)
    "guidance": float (B,), guidance_embed models only: the guidance scale g the model imitates
The guidance scale is not text: it is never dropped, and a null condition keeps it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from flowmatch.networks.conditioning import ConditioningSpec
from flowmatch.networks.layers import (
    ConditionDropout,
    TimestepEmbedder,
    VectorEmbedder,
    attention,
    check_mask,
    modulate,
    param_dtype,
    qk_norms,
    split_heads,
)
from flowmatch.networks.mmdit import MMDiTBlock
from flowmatch.networks.rope import apply_rope, check_axes_dim, default_axes_dim, image_position_ids, rope_angles
from flowmatch.networks.text_condition import TextStream, check_text, drop_text, null_text, require_text, text_spec
from flowmatch.networks.trunk import PatchTransformer


class FluxSingleBlock(nn.Module):
    """Single-stream block on the joined [text; image] tokens: attention and MLP in parallel from one linear."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads, self.hidden_size = num_heads, hidden_size
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden)  # qkv and the MLP input
        self.q_norm, self.k_norm = qk_norms(hidden_size, num_heads, True)
        self.act = nn.GELU(approximate="tanh")
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)  # attention output and MLP output

    def forward(self, x: torch.Tensor, c: torch.Tensor, num_text: int, key_mask: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [text; image] tokens (B, L + N, D); rope rotates the image part (the last N tokens)."""
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        qkv, mlp_in = self.linear1(modulate(self.norm(x), shift, scale)).split([3 * self.hidden_size, self.mlp_hidden], dim=-1)
        q, k, v = (split_heads(t, self.num_heads) for t in qkv.chunk(3, dim=-1))
        q, k = self.q_norm(q), self.k_norm(k)
        q = torch.cat([q[:, :, :num_text], apply_rope(q[:, :, num_text:], rope)], dim=2)
        k = torch.cat([k[:, :, :num_text], apply_rope(k[:, :, num_text:], rope)], dim=2)
        out = self.linear2(torch.cat([attention(q, k, v, key_mask), self.act(mlp_in)], dim=-1))
        return x + gate.unsqueeze(1) * out


class FLUX(PatchTransformer):
    """FLUX.1's transformer, called as ``net(z, t, cond)`` with ``cond`` the dict described in this module's docstring.

    ``blocks`` holds the double-stream blocks, then the single-stream ones; ``double_blocks`` and
    ``single_blocks`` are views of the two parts.
    """

    #: default LoRA targets (flowmatch.adapters): the double blocks' attention projections of both streams and the
    #: single blocks' fused input (q, k, v, MLP in) and output projections
    lora_target_modules = (r"blocks\.\d+\.(image|text\.\d+)\.(qkv|proj)", r"blocks\.\d+\.linear[12]")

    def __init__(
        self,
        num_double_blocks: int = 2,
        num_single_blocks: int = 4,
        hidden_size: int = 256,
        num_heads: int = 4,
        in_channels: int = 16,
        out_channels: int | None = None,
        patch_size: int = 2,
        pooled_dim: int = 768,
        context_dim: int = 4096,
        mlp_ratio: float = 4.0,
        axes_dim: Sequence[int] | None = None,
        rope_theta: float = 10000.0,
        guidance_embed: bool = False,
        cond_drop_prob: float = 0.1,
        learned_null: bool = False,
        gradient_checkpointing: bool = False,
        max_text_tokens: int | None = None,
    ):
        """
        Args:
            num_double_blocks: double-stream blocks (FLUX.1: 19).
            num_single_blocks: single-stream blocks (FLUX.1: 38).
            hidden_size: token width (FLUX.1: 3072).
            num_heads: attention heads (FLUX.1: 24, head dim 128).
            in_channels: latent channels C of z (FLUX.1: 16; packed 2x2 into tokens of 4C = 64 values).
            out_channels: output channels; None means in_channels.
            patch_size: packing side (FLUX.1: 2). Latent height and width must be divisible by it.
            pooled_dim: size of cond["pooled"] (FLUX.1: 768, CLIP-L pooled).
            context_dim: channels of cond["tokens"] (FLUX.1: 4096, T5-XXL).
            mlp_ratio: MLP hidden width / token width (FLUX.1: 4).
            axes_dim: head-dim split of the rotary embedding over (0, row, column); must sum to the head dim.
                None: FLUX.1's proportions (head dim 128 -> [16, 56, 56], 64 -> [8, 28, 28]).
            rope_theta: rotary base (FLUX.1: 10000).
            guidance_embed: add MLP(sinusoid(1000 g)) of cond["guidance"] to the modulation vector (FLUX.1-dev:
                guidance-distilled; schnell: none). Such a model needs cond["guidance"]; others refuse it.
            cond_drop_prob: probability of replacing each text input (pooled, tokens) by its null in training,
                independently, for classifier-free guidance (FLUX.1's training recipe is unpublished).
            learned_null: learn the null inputs instead of using zeros.
            gradient_checkpointing: recompute block activations in the backward pass to save memory.
            max_text_tokens: refuse cond["tokens"] longer than this (None: no limit; FLUX.1-dev 512, schnell 256).
        """
        if num_double_blocks < 0 or num_single_blocks < 0 or num_double_blocks + num_single_blocks == 0:
            raise ValueError(f"FLUX needs at least one block, got num_double_blocks={num_double_blocks}, "
                             f"num_single_blocks={num_single_blocks}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if max_text_tokens is not None and max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be a positive number of tokens or None (no limit), got {max_text_tokens}")
        head_dim = hidden_size // num_heads
        self_axes = check_axes_dim(axes_dim if axes_dim is not None else default_axes_dim(head_dim), head_dim)
        super().__init__(in_channels=in_channels, out_channels=out_channels, patch_size=patch_size,
                         depth=num_double_blocks + num_single_blocks, hidden_size=hidden_size, num_heads=num_heads,
                         pos_embed_max_size=None, table_arg="", gradient_checkpointing=gradient_checkpointing)
        self.num_double_blocks, self.num_single_blocks = num_double_blocks, num_single_blocks
        self.axes_dim, self.rope_theta = self_axes, float(rope_theta)
        self.pooled_dim, self.context_dim, self.max_text_tokens = pooled_dim, context_dim, max_text_tokens
        self.guidance_embed = guidance_embed

        self.guidance_embedder = TimestepEmbedder(hidden_size) if guidance_embed else None
        self.y_embedder = VectorEmbedder(pooled_dim, hidden_size)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.pooled_dropout = ConditionDropout(pooled_dim, cond_drop_prob, learned_null)
        self.tokens_dropout = ConditionDropout(context_dim, cond_drop_prob, learned_null)
        self.add_blocks(
            [MMDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=True) for _ in range(num_double_blocks)]
            + [FluxSingleBlock(hidden_size, num_heads, mlp_ratio) for _ in range(num_single_blocks)]
        )

    @property
    def double_blocks(self) -> nn.ModuleList:
        return self.blocks[: self.num_double_blocks]

    @property
    def single_blocks(self) -> nn.ModuleList:
        return self.blocks[self.num_double_blocks:]

    def init_condition_embedders(self) -> None:
        """The guidance MLP starts like the timestep MLP (N(0, 0.02) weights)."""
        if self.guidance_embedder is not None:
            nn.init.normal_(self.guidance_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.guidance_embedder.mlp[2].weight, std=0.02)

    # ---- conditioning -------------------------------------------------------------------
    def _streams(self) -> list[TextStream]:
        return [TextStream("tokens", "mask", self.context_dim, self.max_text_tokens, "max_text_tokens", self.tokens_dropout)]

    @property
    def conditioning(self) -> ConditioningSpec:
        """The pooled vector and the token stream read from the data (the guidance scale is not data)."""
        return text_spec(self.pooled_dim, self._streams())

    def _check_cond(self, cond: object) -> dict:
        cond = require_text(cond, self.pooled_dropout, self._streams(), type(self).__name__)
        has_guidance = cond.get("guidance") is not None
        if self.guidance_embed and not has_guidance:
            raise ValueError("FLUX was built with guidance_embed=True (a guidance-distilled model, like FLUX.1-dev): "
                             "cond['guidance'] must hold the guidance scale per sample, shape (B,); none was given")
        if has_guidance and not self.guidance_embed:
            raise ValueError("FLUX was built without a guidance embedding (guidance_embed=False, like FLUX.1-schnell) "
                             "but cond['guidance'] was given: use classifier-free guidance instead, or a "
                             "guidance-distilled model")
        return cond

    def null_condition(self, cond: dict) -> dict:
        """The unconditional counterpart of cond: null pooled vector and tokens, masks all True, guidance kept."""
        return null_text(self._check_cond(cond), self.pooled_dropout, self._streams())

    def drop_condition(self, cond: dict) -> dict:
        """Classifier-free-guidance dropout in training mode (pooled and tokens independently); identity in eval."""
        return drop_text(self._check_cond(cond), self.pooled_dropout, self._streams())

    def _guidance(self, cond: dict, batch: int) -> torch.Tensor:
        g = cond["guidance"]
        if not isinstance(g, torch.Tensor):
            g = torch.tensor(float(g))
        if g.dim() == 0:
            g = g.expand(batch)
        if g.shape != (batch,):
            raise ValueError(f"FLUX: cond['guidance'] must have shape ({batch},) (one guidance scale per sample), got {tuple(g.shape)}")
        return g

    def embed_condition(self, cond: dict, x: torch.Tensor, grid: tuple[int, int]):
        """MLP(pooled) [+ MLP(guidance)], and the context: (text tokens, key mask, rotary angles of the image grid)."""
        b = x.shape[0]
        cond = self._check_cond(cond)
        check_text(cond, b, self.pooled_dim, self._streams(), type(self).__name__)
        cond = self.drop_condition(cond)
        dtype = param_dtype(self)
        tokens = cond["tokens"]
        txt = self.context_embedder(tokens.to(dtype))
        mask = check_mask(cond.get("mask"), tokens, "mask", fix_empty_rows=False)  # image keys always remain
        key_mask = None
        if mask is not None:
            key_mask = torch.cat([mask, torch.ones(b, x.shape[1], dtype=torch.bool, device=x.device)], dim=1)
        rope = rope_angles(image_position_ids(*grid, device=x.device), self.axes_dim, self.rope_theta)
        vector = self.y_embedder(cond["pooled"].to(dtype))
        if self.guidance_embedder is not None:
            vector = self.guidance_embedder(self._guidance(cond, b).to(x.device)) + vector
        return vector, (txt, key_mask, rope)

    def run_block(self, block: nn.Module, x: torch.Tensor, c: torch.Tensor, context):
        """A double block keeps the streams apart; a single block runs on [text; image] and splits them again."""
        txt, key_mask, rope = context
        if isinstance(block, FluxSingleBlock):
            joined = block(torch.cat([txt, x], dim=1), c, txt.shape[1], key_mask, rope)
            txt, x = joined.split([txt.shape[1], x.shape[1]], dim=1)
        else:
            x, (txt,) = block(x, [txt], c, key_mask, rope)
        return x, (txt, key_mask, rope)
