"""MM-DiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al. 2024).

    z (B, C, H, W) --patchify 2--> image tokens + centre crop of a fixed pos_embed_max_size^2 sin-cos table
    c   = MLP(sinusoid_256(1000 t), cos first) + MLP(pooled text vector)
    ctx = Linear(text tokens)                          (one context embedder per token stream)
    N x MMDiTBlock: every stream (text ..., image) has its own weights: adaLN (6 chunks from c), qkv,
        optional per-head QK RMSNorm, output projection, MLP; attention is JOINT over the concatenation
        [text tokens, (text tokens 2,) image tokens]. In the last block the text streams are "pre-only":
        adaLN with (shift, scale) only, k and v only; their outputs are never used.
    LN -> adaLN (shift, scale) -> Linear(p*p*C) -> unpatchify

Defaults follow the paper: hidden = 64 * depth, heads = depth (head dim 64), MLP ratio 4 with
GELU(tanh), biases everywhere, patch 2. ``context_dim_2`` turns on the "3 sets" variant: a second
token stream (e.g. T5 when ``tokens`` holds CLIP) with its own weights in every block.

Conditioning dict (``cond``):
    "pooled":   float (B, pooled_dim)         pooled text vector (CLIP-L + CLIP-G in SD3)
    "tokens":   float (B, L, context_dim)     text token sequence
    "mask":     bool (B, L), optional         True = real token; False keys are ignored by attention
    "tokens_2": float (B, L2, context_dim_2)  second token stream (3-sets variant only)
    "mask_2":   bool (B, L2), optional        its mask
A masked (padded) text token is a key that no query, image or text, attends to; its own query row
still attends to the real keys (the image keys always remain, so no softmax is ever empty and no NaN
arises), and its output is never used by the real tokens. Hence appending masked padding to a prompt
leaves the output unchanged (to float32 rounding). So the blocks never see what changes nothing: padding after
every row's last real token is cut, and a null caption (L equal tokens, all visible: guidance's unconditional
input and every caption dropped in training) runs as one token weighted as L (layers.compact_tokens): on the
main job's captions this saves ~40% of the text tokens' work. Diffusers' SD3 uses no mask; imported models match
diffusers when no mask is given. ``max_text_tokens`` (default: no limit) makes longer token streams an error.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from flowmatch.networks.conditioning import ConditioningSpec
from flowmatch.networks.layers import (
    ConditionDropout,
    Mlp,
    VectorEmbedder,
    attention,
    check_mask,
    compact_tokens,
    join_key_masks,
    modulate,
    param_dtype,
    qk_norms,
    require_keys,
    split_heads,
)
from flowmatch.networks.rope import apply_rope
from flowmatch.networks.text_condition import TextStream, check_text, drop_text, null_text, require_text, text_spec
from flowmatch.networks.trunk import PatchTransformer


class MMDiTStream(nn.Module):
    """One modality's weight set inside an MM-DiT block (image tokens or one text token stream).

    ``pre_only``: the stream only contributes keys and values to the joint attention (the text
    streams of the last block): adaLN gives (shift, scale) only, and there is no output projection,
    no MLP and no query.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, pre_only: bool = False):
        super().__init__()
        self.num_heads, self.pre_only = num_heads, pre_only
        q_norm, k_norm = qk_norms(hidden_size, num_heads, qk_norm)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))
        self.k_norm = k_norm
        if pre_only:  # no query: its q_norm is left unused
            self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        else:
            self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
            self.q_norm = q_norm
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """Modulated LN of x -> (q or None, k, v) as (B, H, S, Dh), plus the gates/shifts for post_attention."""
        if self.pre_only:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
            k, v = self.kv(modulate(self.norm1(x), shift, scale)).chunk(2, dim=-1)
            return None, self.k_norm(split_heads(k, self.num_heads)), split_heads(v, self.num_heads), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(modulate(self.norm1(x), shift_msa, scale_msa)).chunk(3, dim=-1))
        return self.q_norm(q), self.k_norm(k), v, (gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor, state) -> torch.Tensor:
        """Gated residual of the projected attention output, then the gated modulated MLP."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = state
        x = x + gate_msa.unsqueeze(1) * self.proj(attn_out)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    """Joint attention over [text streams..., image] with a separate weight set per stream."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 num_text_streams: int = 1, text_pre_only: bool = False):
        super().__init__()
        self.text_pre_only = text_pre_only
        self.text = nn.ModuleList(
            MMDiTStream(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=text_pre_only) for _ in range(num_text_streams)
        )
        self.image = MMDiTStream(hidden_size, num_heads, mlp_ratio, qk_norm)

    def forward(self, x: torch.Tensor, contexts: list[torch.Tensor], c: torch.Tensor, key_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x: image tokens (B, N, D); contexts: text token streams [(B, L_i, D)]; key_mask: bool (B, sum L_i + N) or None;
        rope: rotary (cos, sin) of the image tokens (FLUX; text tokens sit at position 0, where the rotation is the identity).

        Returns (x, contexts); contexts is None after a pre-only block.
        """
        text = [stream.pre_attention(ctx, c) for stream, ctx in zip(self.text, contexts)]
        q_img, k_img, v_img, state_img = self.image.pre_attention(x, c)
        if rope is not None:
            q_img, k_img = apply_rope(q_img, rope), apply_rope(k_img, rope)
        k = torch.cat([s[1] for s in text] + [k_img], dim=2)
        v = torch.cat([s[2] for s in text] + [v_img], dim=2)
        if self.text_pre_only:  # only the image tokens ask queries
            out_img = attention(q_img, k, v, key_mask)
            return self.image.post_attention(x, out_img, state_img), None
        q = torch.cat([s[0] for s in text] + [q_img], dim=2)
        out = attention(q, k, v, key_mask)
        lengths = [ctx.shape[1] for ctx in contexts] + [x.shape[1]]
        *out_text, out_img = out.split(lengths, dim=1)
        contexts = [stream.post_attention(ctx, o, s[3]) for stream, ctx, o, s in zip(self.text, contexts, out_text, text)]
        return self.image.post_attention(x, out_img, state_img), contexts


class MMDiT(PatchTransformer):
    """SD3's MM-DiT, called as ``net(z, t, cond)`` with ``cond`` the dict described in this module's docstring."""

    #: default LoRA targets (flowmatch.adapters): attention q/k/v and output projections of every stream
    lora_target_modules = (r"blocks\.\d+\.(image|text\.\d+)\.(qkv|kv|proj)",)

    def __init__(
        self,
        depth: int = 4,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        in_channels: int = 16,
        out_channels: int | None = None,
        patch_size: int = 2,
        pooled_dim: int = 2048,
        context_dim: int = 4096,
        context_dim_2: int | None = None,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        pos_embed_max_size: int = 96,
        pos_embed_base_size: int | None = None,
        cond_drop_prob: float = 0.463,
        learned_null: bool = False,
        gradient_checkpointing: bool = False,
        max_text_tokens: int | None = None,
        max_text_tokens_2: int | None = None,
        tokens_2_source: str | None = None,
    ):
        """
        Args:
            depth: number of MM-DiT blocks (SD3: 15 .. 38; 24 ~ 2B parameters, 38 ~ 8B).
            hidden_size: token width; None means 64 * depth.
            num_heads: attention heads; None means depth (head dim 64 with the default width).
            in_channels: latent channels C of z (SD3: 16).
            out_channels: output channels; None means in_channels.
            patch_size: patch side in latent pixels (SD3: 2).
            pooled_dim: size of cond["pooled"] (SD3: 2048 = CLIP-L + CLIP-G pooled).
            context_dim: channels of cond["tokens"] (SD3: 4096).
            context_dim_2: channels of cond["tokens_2"]; set it for the "3 sets" variant (a second token stream with its own weights), None for the standard 2-set model.
            mlp_ratio: MLP hidden width / token width.
            qk_norm: RMSNorm (learnable scale, eps 1e-6) on queries and keys per head in every stream.
            pos_embed_max_size: side of the fixed sin-cos position table in tokens; latents are centre-cropped from it (SD3: 192).
            pos_embed_base_size: positions are arange(max) * base / max (diffusers' base_size = sample_size // patch_size); None means integer positions.
            cond_drop_prob: probability of replacing each text input (pooled, each token stream) by its null in training, independently (SD3: 0.463).
            learned_null: learn the null inputs instead of using zeros (SD3 uses zeros).
            gradient_checkpointing: recompute block activations in the backward pass to save memory.
            max_text_tokens: refuse cond["tokens"] longer than this many tokens (None: no limit; SD3: 77 + 256 = 333).
            max_text_tokens_2: the same for cond["tokens_2"] (3-sets variant only).
            tokens_2_source: 3-sets variant on data with one text encoder: the cond key ("tokens") whose sequence (and
                mask) also feeds the second stream, through its own weights and its own dropout; None reads cond["tokens_2"].
        """
        for name, value in (("max_text_tokens", max_text_tokens), ("max_text_tokens_2", max_text_tokens_2)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of tokens or None (no limit), got {value}")
        if tokens_2_source is not None and context_dim_2 is None:
            raise ValueError("tokens_2_source feeds the second token stream, which only the 3-sets variant (context_dim_2) has")
        if tokens_2_source is not None and learned_null:
            raise ValueError("tokens_2_source derives the second stream's null from the first's, so both must be zeros: "
                             "learned_null is not supported with it")
        if tokens_2_source not in (None, "tokens"):
            raise ValueError(f"tokens_2_source must be None (read cond['tokens_2']) or 'tokens', got {tokens_2_source!r}")
        if max_text_tokens_2 is not None and context_dim_2 is None:
            raise ValueError("max_text_tokens_2 limits cond['tokens_2'], which only the 3-sets variant (context_dim_2) has")
        if tokens_2_source is not None and context_dim_2 != context_dim:
            raise ValueError(f"tokens_2_source feeds cond[{tokens_2_source!r}] (context_dim={context_dim}) to the second stream, "
                             f"so context_dim_2 must equal it, got {context_dim_2}")
        hidden_size = hidden_size or 64 * depth
        num_heads = num_heads or depth
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        super().__init__(in_channels=in_channels, out_channels=out_channels, patch_size=patch_size, depth=depth,
                         hidden_size=hidden_size, num_heads=num_heads, pos_embed_max_size=pos_embed_max_size,
                         pos_embed_base_size=pos_embed_base_size, table_arg=f"pos_embed_max_size={pos_embed_max_size}",
                         gradient_checkpointing=gradient_checkpointing)
        self.pooled_dim, self.context_dim, self.context_dim_2 = pooled_dim, context_dim, context_dim_2
        self.qk_norm = qk_norm
        self.tokens_2_source = tokens_2_source
        self.max_text_tokens = (max_text_tokens,) if context_dim_2 is None else (max_text_tokens, max_text_tokens_2)
        self.token_keys = ("tokens",) if context_dim_2 is None else ("tokens", "tokens_2")
        self.mask_keys = ("mask",) if context_dim_2 is None else ("mask", "mask_2")
        context_dims = (context_dim,) if context_dim_2 is None else (context_dim, context_dim_2)

        self.y_embedder = VectorEmbedder(pooled_dim, hidden_size)
        self.context_embedders = nn.ModuleList(nn.Linear(d, hidden_size) for d in context_dims)
        self.pooled_dropout = ConditionDropout(pooled_dim, cond_drop_prob, learned_null)
        self.tokens_dropout = nn.ModuleList(ConditionDropout(d, cond_drop_prob, learned_null) for d in context_dims)
        self.add_blocks(
            MMDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, len(context_dims), text_pre_only=(i == depth - 1))
            for i in range(depth)
        )

    # ---- conditioning -------------------------------------------------------------------
    def _streams(self) -> list[TextStream]:
        """The token streams the blocks read, in order (the second one of the 3-sets variant included)."""
        return [TextStream(key, mask_key, embedder.in_features, limit, "max_text_tokens" + ("_2" if i else ""), dropout)
                for i, (key, mask_key, embedder, limit, dropout) in enumerate(
                    zip(self.token_keys, self.mask_keys, self.context_embedders, self.max_text_tokens, self.tokens_dropout))]

    @property
    def conditioning(self) -> ConditioningSpec:
        """The pooled vector and the token streams read from the data: with tokens_2_source the second stream
        is derived from cond["tokens"], so only "tokens" is read (at most the stricter of both limits)."""
        streams = self._streams()
        if self.tokens_2_source is not None:
            limits = [s.max_length for s in streams if s.max_length is not None]
            streams = [replace(streams[0], max_length=min(limits, default=None))]
        return text_spec(self.pooled_dim, streams)

    def _check_cond(self, cond: object) -> dict:
        if self.tokens_2_source is not None and isinstance(cond, dict) and "tokens_2" not in cond:
            src = require_keys(cond, ("pooled", self.tokens_2_source), type(self).__name__)
            cond = {**src, "tokens_2": src[self.tokens_2_source]}
            if src.get("mask") is not None:
                cond["mask_2"] = src["mask"]
        return require_text(cond, self.pooled_dropout, self._streams(), type(self).__name__)

    def null_condition(self, cond: dict) -> dict:
        """The unconditional counterpart of cond: null pooled vector and null tokens (same shapes), masks all True.
        Same keys as cond: a second stream derived from cond["tokens"] (tokens_2_source) is derived again from the null."""
        derived = self.tokens_2_source is not None and isinstance(cond, dict) and "tokens_2" not in cond
        out = null_text(self._check_cond(cond), self.pooled_dropout, self._streams())
        if derived:  # zeros either way (learned nulls are refused with tokens_2_source)
            out.pop("tokens_2")
            out.pop("mask_2", None)
        return out

    def drop_condition(self, cond: dict) -> dict:
        """Classifier-free-guidance dropout in training mode: the pooled vector and each token stream are
        independently replaced by their nulls with probability cond_drop_prob (a dropped stream's mask
        becomes all True). Identity in eval mode."""
        return drop_text(self._check_cond(cond), self.pooled_dropout, self._streams())

    def embed_condition(self, cond: dict, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[list[torch.Tensor], torch.Tensor | None]]:
        """MLP(pooled vector), and the context: the embedded token streams with the joint attention's key mask."""
        b = x.shape[0]
        cond = self._check_cond(cond)
        check_text(cond, b, self.pooled_dim, self._streams(), type(self).__name__)
        cond = self.drop_condition(cond)
        dtype = param_dtype(self)
        contexts, masks = [], []
        for key, mask_key, embedder in zip(self.token_keys, self.mask_keys, self.context_embedders):
            mask = check_mask(cond.get(mask_key), cond[key], mask_key, fix_empty_rows=False)  # image keys always remain
            tokens, mask = compact_tokens(cond[key], mask)  # padding cut, a null caption as one token: same output
            contexts.append(embedder(tokens.to(dtype)))
            masks.append(mask)
        key_mask = join_key_masks([*masks, None], [ctx.shape[1] for ctx in contexts] + [x.shape[1]], b, x.device)
        return self.y_embedder(cond["pooled"].to(dtype)), (contexts, key_mask)

    def run_block(self, block: MMDiTBlock, x: torch.Tensor, c: torch.Tensor, context):
        """Joint attention of the image tokens and the text streams; the text streams move on with x."""
        contexts, key_mask = context
        x, contexts = block(x, contexts, c, key_mask)
        return x, (contexts, key_mask)
