"""DiT: a Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie 2023).

    z (B, C, H, W) --patchify p--> tokens + fixed 2-D sin-cos positions
    c = MLP(sinusoid(1000 t)) + embed(condition)          (condition: class label or pooled text vector)
    N x [ x += gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
          x += gate_mlp * MLP (modulate(LN(x), shift_mlp, scale_mlp)) ]   the six vectors regressed from c
    LN -> modulate(shift, scale) -> Linear(p*p*C) -> unpatchify

The modulation layers and the final linear layer start at zero, so every block starts as the identity
and the network's output starts at exactly 0. ``out_channels`` defaults to ``in_channels``
(no learned sigma: the objectives regress a velocity or a noise).
"""

from __future__ import annotations

import torch
from torch import nn

from flowmatch.networks.conditioning import ConditioningSpec
from flowmatch.networks.layers import (
    ConditionDropout,
    LabelEmbedder,
    Mlp,
    SelfAttention,
    VectorEmbedder,
    check_pooled,
    modulate,
    param_dtype,
)
from flowmatch.networks.trunk import PatchTransformer

#: Named DiT sizes: size -> (depth, hidden_size, num_heads), from the DiT paper (Table 1).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def resolve_size(size: str | None, depth: int | None, hidden_size: int | None, num_heads: int | None) -> tuple[int, int, int]:
    """(depth, hidden, heads) from a named size, each overridden by an explicit value."""
    if size is None:
        named = (None, None, None)
    elif size in DIT_SIZES:
        named = DIT_SIZES[size]
    else:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)} or give depth/hidden_size/num_heads")
    out = tuple(v if v is not None else n for v, n in zip((depth, hidden_size, num_heads), named))
    if any(v is None for v in out):
        raise ValueError("give a named size or all of depth, hidden_size and num_heads")
    return out  # type: ignore[return-value]


def dit_trunk_args(size: str | None, depth: int | None, hidden_size: int | None, num_heads: int | None,
                   patch_size: int, input_size: int) -> dict:
    """The PatchTransformer sizes of a DiT-style network (DiT, CrossDiT): its named size resolved, and a
    square position table of input_size / patch_size tokens per side."""
    depth, hidden_size, num_heads = resolve_size(size, depth, hidden_size, num_heads)
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
    return dict(patch_size=patch_size, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                pos_embed_max_size=input_size // patch_size, table_arg=f"input_size={input_size}")


def parse_dit_name(name: str) -> tuple[str, int]:
    """'DiT-XL/2' -> ('XL', 2)."""
    try:
        prefix, patch = name.split("/")
        model, size = prefix.split("-")
        assert model.lower() == "dit"
        return size, int(patch)
    except (ValueError, AssertionError):
        raise ValueError(f"cannot parse DiT name {name!r}; expected e.g. 'DiT-S/2' with size in {sorted(DIT_SIZES)}") from None


class DiTBlock(nn.Module):
    """[LN -> modulate -> self-attention -> gate] + [LN -> modulate -> MLP -> gate], modulation from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiT(PatchTransformer):
    """DiT with adaLN-Zero, called as ``net(z, t, cond)``.

    ``cond`` is, by construction: class labels (int64 (B,), with ``num_classes > 0``; the null class is
    index ``num_classes``), a pooled text vector (float (B, pooled_dim), with ``pooled_dim > 0``; null =
    zeros or learned), or ignored (both 0: unconditional). ``cond=None`` on a conditional model means
    the null condition for every sample. A text-conditioned DiT also takes the text condition dict of
    the latent/caption shards (``{"pooled", "tokens", "mask"}``) and uses its pooled vector only.
    """

    #: default LoRA targets (flowmatch.adapters): attention and MLP of every block
    lora_target_modules = (r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",)

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
        num_classes: int = 0,
        pooled_dim: int = 0,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        cond_drop_prob: float = 0.1,
        learned_null: bool = False,
        gradient_checkpointing: bool = False,
    ):
        """
        Args:
            size: named size "S", "B", "L" or "XL" (see DIT_SIZES), or None to give all three sizes explicitly.
            patch_size: patch side p in latent pixels (DiT-S/2 has p = 2).
            depth: number of blocks; overrides the named size.
            hidden_size: token width; overrides the named size.
            num_heads: attention heads; overrides the named size.
            in_channels: latent channels C of z.
            out_channels: output channels; None means in_channels.
            input_size: largest latent side; the position table covers input_size/p tokens per side and is centre-cropped for smaller or non-square latents.
            num_classes: > 0 for class-label conditioning (labels 0..num_classes-1; num_classes is the null class).
            pooled_dim: > 0 for conditioning on a pooled text vector of this size.
            mlp_ratio: MLP hidden width / token width.
            qk_norm: RMSNorm on queries and keys per head.
            cond_drop_prob: probability of replacing a sample's condition by its null in training (classifier-free guidance).
            learned_null: learn the null pooled vector instead of using zeros (labels always have a learned null class).
            gradient_checkpointing: recompute block activations in the backward pass to save memory.
        """
        if num_classes and pooled_dim:
            raise ValueError("DiT conditions on class labels (num_classes) or a pooled vector (pooled_dim), not both")
        super().__init__(in_channels=in_channels, out_channels=out_channels, gradient_checkpointing=gradient_checkpointing,
                         **dit_trunk_args(size, depth, hidden_size, num_heads, patch_size, input_size))
        self.num_classes, self.pooled_dim = num_classes, pooled_dim
        self.input_size = input_size

        self.y_embedder: nn.Module | None = None
        self.cond_dropout: ConditionDropout | None = None
        if num_classes:
            self.y_embedder = LabelEmbedder(num_classes, self.hidden_size, cond_drop_prob)
        elif pooled_dim:
            self.y_embedder = VectorEmbedder(pooled_dim, self.hidden_size)
            self.cond_dropout = ConditionDropout(pooled_dim, cond_drop_prob, learned=learned_null)
        self.add_blocks(DiTBlock(self.hidden_size, self.num_heads, mlp_ratio, qk_norm) for _ in range(self.depth))

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "DiT":
        """Build a named model, e.g. ``DiT.from_name("DiT-XL/2", num_classes=1000)``."""
        size, patch = parse_dit_name(name)
        return cls(size=size, patch_size=patch, **kwargs)

    def init_condition_embedders(self) -> None:
        """DiT's label table starts at N(0, 0.02)."""
        if isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    # ---- conditioning -------------------------------------------------------------------
    @property
    def conditioning(self) -> ConditioningSpec:
        """Class labels, or a pooled vector (of a text dict, only "pooled" is read), or nothing."""
        return ConditioningSpec(num_classes=self.num_classes, pooled_dim=self.pooled_dim)

    def null_condition(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The unconditional counterpart of a batch's cond (null class labels / null pooled vectors)."""
        if cond is None or self.y_embedder is None:
            return None
        if isinstance(cond, dict):  # the shards' text condition: only its pooled vector is used
            return {**cond, "pooled": self.null_condition(self._pooled(cond))}
        if self.num_classes:
            return torch.full_like(cond, self.num_classes)
        return self.cond_dropout.null_like(cond)

    def drop_condition(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """Classifier-free-guidance dropout of a batch's cond in training mode (identity in eval mode)."""
        if cond is None or self.y_embedder is None:
            return cond
        if self.num_classes:
            return self.y_embedder.drop(cond)
        return self.cond_dropout(cond)[0]

    def embed_condition(self, cond: torch.Tensor | dict | None, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor | None, None]:
        """The condition embedding (after dropout) added to the timestep embedding, (B, hidden); no context."""
        if self.y_embedder is None:
            return None, None
        if isinstance(cond, dict):
            cond = self._pooled(cond)
        batch, device, dtype = x.shape[0], x.device, param_dtype(self)
        if cond is None:  # conditional model called without a condition: use the null condition
            if self.num_classes:
                cond = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            else:
                cond = self.cond_dropout.null_like(torch.zeros(batch, self.pooled_dim, device=device, dtype=dtype))
        if self.num_classes:
            self._check_labels(cond, batch)
            return self.y_embedder(self.drop_condition(cond)), None
        check_pooled(cond, batch, self.pooled_dim, "DiT", key="pooled vector")
        return self.y_embedder(self.drop_condition(cond).to(dtype)), None

    def _pooled(self, cond: dict) -> torch.Tensor:
        if self.num_classes or "pooled" not in cond:
            raise ValueError(f"DiT got a condition dict with keys {sorted(cond)}: a dict must carry 'pooled', "
                             f"for a DiT with pooled_dim > 0 (this one has num_classes={self.num_classes}, pooled_dim={self.pooled_dim})")
        return cond["pooled"]

    def _check_labels(self, labels: object, batch: int) -> None:
        """Class labels: an integer tensor (batch,) with values in 0..num_classes (num_classes = the null class)."""
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (batch,):
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"DiT with num_classes={self.num_classes} expects class labels as an integer tensor of shape ({batch},), got {got}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(
                f"DiT class labels must lie in 0..{self.num_classes - 1} (or {self.num_classes} = the null class), "
                f"got values {labels.min().item()}..{labels.max().item()}"
            )
