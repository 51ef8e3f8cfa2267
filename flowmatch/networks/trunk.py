"""The patch-transformer trunk that every image backbone (DiT, CrossDiT, MM-DiT) specialises.

    z (B, C, H, W) --patchify p--> tokens + centre crop of a fixed 2-D sin-cos position table
                                   (no table when the blocks place tokens themselves, e.g. FLUX's RoPE)
    c       = MLP(sinusoid(1000 t)) [+ the backbone's condition vector]
    context = what the backbone's blocks read besides x and c (text tokens and their mask; None for DiT)
    N x block(x, c, context)                 (the backbone's blocks; gradient-checkpointed on request)
    LN -> adaLN (shift, scale) from c -> Linear(p*p*C_out) -> unpatchify

A backbone is a file of blocks plus a short subclass of :class:`PatchTransformer`:

    class MyNet(PatchTransformer):
        def __init__(self, ...):
            super().__init__(in_channels=..., hidden_size=..., ...)   # patches, positions, timestep embedder
            self.y_embedder = ...                                       # its condition embedders
            self.add_blocks(MyBlock(...) for _ in range(depth))         # blocks, final layer, initialisation
        def embed_condition(self, cond, x, grid): ...                   # -> (vector added to c or None, context)
        def run_block(self, block, x, c, context): ...                  # -> (x, context)
        conditioning = property(...)                                    # its ConditioningSpec

Initialisation (DiT's, shared by all): xavier-uniform linears with zero biases, the patch kernel as a
matrix, N(0, 0.02) timestep MLP (and whatever ``init_condition_embedders`` adds), every adaLN
modulation inside the blocks and the final layer at zero: each block starts as the identity and the
output at exactly 0.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flowmatch.networks.conditioning import ConditioningSpec
from flowmatch.networks.layers import (
    FinalLayer,
    PatchEmbed,
    SinCosPosEmbed2D,
    TimestepEmbedder,
    check_latents,
    check_timesteps,
    init_linears_xavier,
    num_params,
    param_dtype,
    unpatchify,
    zero_init,
)


class PatchTransformer(nn.Module):
    """Patch embedding + positions -> blocks -> final adaLN layer -> unpatchify, called as ``net(z, t, cond)``.

    Subclasses build their condition embedders between ``super().__init__`` and :meth:`add_blocks`
    (the order in which modules are created fixes the parameter names and the initial weights for a seed).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None,
        patch_size: int,
        depth: int,
        hidden_size: int,
        num_heads: int,
        pos_embed_max_size: int | None,
        pos_embed_base_size: int | None = None,
        table_arg: str,
        gradient_checkpointing: bool = False,
    ):
        """
        Args:
            pos_embed_max_size: side of the position table in tokens (latents up to patch_size times that);
                None: no absolute position table (the blocks encode positions, as FLUX's rotary embedding does).
            pos_embed_base_size: positions are arange(max) * base / max; None means integer positions.
            table_arg: the constructor argument that sets the table, with its value (e.g. "input_size=32"),
                so that a latent too large for the table gets an error naming what to raise.
        """
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.patch_size, self.depth, self.hidden_size, self.num_heads = patch_size, depth, hidden_size, num_heads
        self.table_arg = table_arg
        self.gradient_checkpointing = gradient_checkpointing
        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.pos_embed = None if pos_embed_max_size is None else SinCosPosEmbed2D(hidden_size, pos_embed_max_size, pos_embed_base_size)
        self.t_embedder = TimestepEmbedder(hidden_size)

    def add_blocks(self, blocks: Iterable[nn.Module]) -> None:
        """The backbone's blocks, then the final layer; then the initial weights (call once, last in __init__)."""
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(self.hidden_size, self.patch_size, self.out_channels)
        self.initialize_weights()

    # ---- initialisation -----------------------------------------------------------------
    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) embeddings, zero adaLN modulation and final layer."""
        init_linears_xavier(self)
        self.x_embedder.reset_parameters()
        self.init_condition_embedders()
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in self.blocks.modules():  # adaLN-Zero: every block starts as the identity
            if isinstance(getattr(module, "adaLN_modulation", None), nn.Sequential):
                zero_init(module.adaLN_modulation[-1])
        self.final_layer.reset_parameters()

    def init_condition_embedders(self) -> None:
        """A backbone's own init of its condition embedders beyond xavier (DiT: its label table). None by default."""

    def num_params(self, trainable_only: bool = False) -> int:
        """Number of parameters (the fixed position table is a buffer and not counted)."""
        return num_params(self, trainable_only)

    # ---- what a backbone specialises ----------------------------------------------------
    @property
    def conditioning(self) -> ConditioningSpec:
        """What this network is conditioned on (class labels, pooled vector, token streams)."""
        raise NotImplementedError

    def embed_condition(self, cond: Any, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor | None, Any]:
        """Check ``cond`` for the image tokens x (B, N, D) on a token grid (h, w) (N = h w, row-major), apply classifier-free-guidance dropout (training
        mode) and embed it: (a (B, D) vector added to the timestep embedding, or None; the context the blocks read)."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, x: torch.Tensor, c: torch.Tensor, context: Any) -> tuple[torch.Tensor, Any]:
        """One block on the image tokens x (B, N, D) with modulation c (B, D); returns (x, context for the next block)."""
        return block(x, c), context

    # ---- forward ------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Velocity / noise prediction for latents z (B, C, H, W) at times t (B,); output shaped like z."""
        name = type(self).__name__
        max_grid = None if self.pos_embed is None else self.pos_embed.max_size
        h, w = check_latents(z, self.in_channels, self.patch_size, max_grid, name, self.table_arg)
        t = check_timesteps(t, z.shape[0], name)
        x = self.x_embedder(z.to(param_dtype(self)))
        if self.pos_embed is not None:
            x = x + self.pos_embed(h, w).to(x.dtype)
        vector, context = self.embed_condition(cond, x, (h, w))
        c = self.t_embedder(t)
        if vector is not None:
            c = c + vector
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, context = checkpoint(self.run_block, block, x, c, context, use_reentrant=False)
            else:
                x, context = self.run_block(block, x, c, context)
        x = self.final_layer(x, c)
        return unpatchify(x, h, w, self.patch_size, self.out_channels).to(z.dtype)
