"""Building blocks shared by the transformer backbones (DiT, MM-DiT, CrossDiT).

Patch embedding and its inverse, the fixed 2-D sin-cos position table (centre-cropped to the latent
grid, as SD3 does), adaLN modulation, the MLP, RMSNorm for QK-normalisation, attention through
``torch.nn.functional.scaled_dot_product_attention`` (explicitly for short half-precision sequences on CPU,
where that is faster), the timestep / vector embedders, the conditioning dropout used for classifier-free
guidance, ``compact_tokens`` (a text stream without the tokens attention cannot see), the input checks every backbone runs before
its forward pass (each error says what was expected and what came), and ``load_network_state``,
which refuses a state dict of another architecture with the names and shapes that do not fit, and
``count_parameters``, which counts a network's parameters by building it on the meta device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from flowmatch.networks import attention_probe
from flowmatch.networks.embeddings import timestep_embedding


def num_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (buffers such as position tables are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_parameters(network: Callable[..., nn.Module], *args, trainable_only: bool = False, **kwargs) -> int:
    """Number of parameters of ``network(*args, **kwargs)`` (a network class or factory), built on the meta device:
    no memory and no weights are allocated, and no formula can drift from the code. E.g.
    ``count_parameters(MMDiT, depth=24, pooled_dim=2048, context_dim=4096)``."""
    with torch.device("meta"):
        return num_params(network(*args, **kwargs), trainable_only)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x (B, N, D) by per-sample shift and scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def param_dtype(module: nn.Module) -> torch.dtype:
    """dtype of a module's first parameter (inputs are cast to it so bf16-weight models accept fp32 data)."""
    return next(module.parameters()).dtype


# --------------------------------------------------------------------------------------------
# Patches and positions
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a (B, C, H, W) latent -> tokens (B, H/p * W/p, D), row-major."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if z.shape[-2] % p or z.shape[-1] % p:
            raise ValueError(f"latent height/width {tuple(z.shape[-2:])} must be divisible by patch_size {p}")
        return self.proj(z).flatten(2).transpose(1, 2)

    def reset_parameters(self) -> None:
        """DiT init: xavier-uniform on the kernel seen as a (D, C*p*p) matrix, zero bias."""
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


def unpatchify(x: torch.Tensor, height: int, width: int, patch_size: int, channels: int) -> torch.Tensor:
    """Tokens (B, h*w, p*p*C) with features ordered (p_row, p_col, C) -> image (B, C, h*p, w*p)."""
    b, p = x.shape[0], patch_size
    x = x.reshape(b, height, width, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, height * p, width * p)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin, cos] of positions ``pos`` (M,) at dim/2 geometric frequencies; float64, (M, dim)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, base_size: int | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos position table for a ``grid_size`` x ``grid_size`` grid, float32 (grid_size**2, dim).

    Row ``i * grid_size + j`` is the token in row i, column j. The first dim/2 channels encode the
    column, the last dim/2 the row (the MAE / DiT / diffusers convention). Positions are
    ``arange(grid_size) * base_size / grid_size`` as in diffusers' ``get_2d_sincos_pos_embed``
    (``base_size`` = None means ``grid_size``, i.e. integer positions as in DiT); SD3 checkpoints use
    base_size = sample_size // patch_size with grid_size = pos_embed_max_size.
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos position table")
    base = grid_size if base_size is None else base_size
    coords = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return emb.float()


class SinCosPosEmbed2D(nn.Module):
    """A fixed max_size x max_size sin-cos table, centre-cropped to each input's token grid (SD3 style).

    The table is a non-persistent buffer: it is rebuilt from the constructor arguments, never saved.
    """

    def __init__(self, hidden_size: int, max_size: int, base_size: int | None = None):
        super().__init__()
        self.hidden_size, self.max_size, self.base_size = hidden_size, max_size, base_size
        self.register_buffer("table", self.build_table(), persistent=False)

    def build_table(self) -> torch.Tensor:
        """The (max_size**2, hidden) float32 table (also used to rebuild it after meta-device construction)."""
        return sincos_pos_embed_2d(self.hidden_size, self.max_size, self.base_size)

    def forward(self, height: int, width: int) -> torch.Tensor:
        """Positions for a height x width token grid: the centre crop of the table, (1, height*width, D)."""
        m = self.max_size
        if height > m or width > m:
            raise ValueError(f"token grid {height}x{width} exceeds the position table ({m}x{m} tokens); raise pos_embed_max_size / input_size")
        top, left = (m - height) // 2, (m - width) // 2
        table = self.table.reshape(m, m, -1)[top : top + height, left : left + width]
        return table.reshape(1, height * width, -1)


# --------------------------------------------------------------------------------------------
# Normalisation, MLP, attention
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learnable scale (QK-norm per head; computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear, biases included."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, H*Dh) -> (B, H, S, Dh)."""
    b, s, _ = x.shape
    return x.view(b, s, num_heads, -1).transpose(1, 2)


#: On CPU, PyTorch's fused SDPA kernel is slow for short sequences in bf16 / fp16: at 48 tokens its forward +
#: backward takes ~4x the explicit matmul -> softmax -> matmul, at 256 tokens they tie and beyond it wins
#: (`python benchmarks/bench_attention.py`, docs/benchmarks_backbones.md). Up to this many keys the explicit
#: form is used there; float32, longer sequences and every other device (GPUs: flash) keep SDPA.
EXPLICIT_ATTENTION_MAX_KEYS = 192


def use_explicit_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`attention` computes these heads explicitly instead of through SDPA (see above)."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-2] <= EXPLICIT_ATTENTION_MAX_KEYS


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v with the softmax in float32 (as autocast runs it); ``mask`` broadcasts
    to (B, H, S_q, S_k): bool (True = attend, False = -inf) or a float bias added to the logits."""
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(dim=-1).to(v.dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, S, Dh) heads; returns merged heads (B, S_q, H*Dh).

    ``key_mask``: optional (B, S_k), either bool (True = the key may be attended to) or a float bias added
    to the keys' logits (-inf hides a key; log n makes one key count as n equal ones: :func:`compact_tokens`).
    Every row must keep at least one key (callers guarantee it).
    """
    attention_probe.observe(q, k, key_mask)  # a no-op unless an AttentionLogitRecorder is open
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if use_explicit_attention(q, k):
        out = explicit_attention(q, k, v, mask)
    else:
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)  # SDPA wants a float bias in the queries' dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)


def qk_norms(dim: int, num_heads: int, qk_norm: bool) -> tuple[nn.Module, nn.Module]:
    """(q_norm, k_norm) for heads of dim // num_heads: RMSNorm each with QK-norm, identities without.
    The caller assigns them where its parameter order wants them (the order checkpoints and optimizers rely on)."""
    if dim % num_heads:
        raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
    if not qk_norm:
        return nn.Identity(), nn.Identity()
    return RMSNorm(dim // num_heads), RMSNorm(dim // num_heads)


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused qkv projection, optional per-head QK RMSNorm, output projection."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        q_norm, k_norm = qk_norms(dim, num_heads, qk_norm)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(attention(self.q_norm(q), self.k_norm(k), v, key_mask))


class CrossAttention(nn.Module):
    """Multi-head attention from tokens x (queries) to a context sequence (keys/values), same width."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        q_norm, k_norm = qk_norms(dim, num_heads, qk_norm)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = split_heads(self.q(x), self.num_heads)
        k, v = (split_heads(t, self.num_heads) for t in self.kv(context).chunk(2, dim=-1))
        return self.proj(attention(self.q_norm(q), self.k_norm(k), v, key_mask))


# --------------------------------------------------------------------------------------------
# Conditioning embedders
# --------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> 256-d sinusoid of 1000 t (float32, cos first) -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_dim)  # float32 even under autocast
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class VectorEmbedder(nn.Module):
    """A conditioning vector (e.g. pooled text embedding) -> Linear, SiLU, Linear."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; index ``num_classes`` is the null class used for guidance (DiT's LabelEmbedder).

    In training mode each label is replaced by the null class with probability ``drop_prob``.
    """

    def __init__(self, num_classes: int, hidden_size: int, drop_prob: float):
        super().__init__()
        self.num_classes, self.drop_prob = num_classes, drop_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels with classifier-free-guidance dropout applied (only in training mode)."""
        if self.training and self.drop_prob > 0:
            dropped = torch.rand(labels.shape[0], device=labels.device) < self.drop_prob
            labels = torch.where(dropped, torch.full_like(labels, self.num_classes), labels)
        return labels

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.dtype.is_floating_point or labels.dim() != 1:
            raise ValueError(f"class labels must be an integer tensor of shape (batch,), got {labels.dtype} {tuple(labels.shape)}")
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------
# Conditioning dropout (classifier-free guidance)
# --------------------------------------------------------------------------------------------


class ConditionDropout(nn.Module):
    """The null value of one conditioning input, and the training-time dropout that swaps it in.

    The input has feature size ``dim`` in its last axis (a pooled vector (B, dim) or a token stream
    (B, L, dim)). The null is zeros (SD3 practice) or, with ``learned=True``, a learned vector of
    size ``dim`` (initialised at zero) broadcast over all leading axes. Each sample of the batch is
    replaced by the null independently with probability ``prob``, in training mode only.
    """

    def __init__(self, dim: int, prob: float, learned: bool = False):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1], got {prob}")
        self.prob = prob
        self.null_value = nn.Parameter(torch.zeros(dim)) if learned else None

    def null_like(self, x: torch.Tensor) -> torch.Tensor:
        """The null input with the shape and dtype of ``x``."""
        if self.null_value is None:
            return torch.zeros_like(x)
        return self.null_value.to(x.dtype).expand_as(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (x with dropped samples replaced by the null, bool (B,) dropped mask or None)."""
        if not (self.training and self.prob > 0):
            return x, None
        dropped = torch.rand(x.shape[0], device=x.device) < self.prob
        keep = (~dropped).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(keep, x, self.null_like(x)), dropped


def drop_tokens(
    dropout: ConditionDropout, tokens: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditioning dropout of a token stream; a dropped sample's mask becomes all True (all null tokens visible)."""
    tokens, dropped = dropout(tokens)
    if mask is not None and dropped is not None:
        mask = mask | dropped[:, None]
    return tokens, mask


def compact_tokens(tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fewest tokens of a text stream (B, L, D) that attention needs, with the same result (to rounding).

    Text tokens are most of a small model's work (the main job: 32 text tokens per 16 image tokens), and much
    of them changes nothing:
    - columns after the last visible token of every row (the padding of short captions) are cut;
    - a row whose L tokens are all visible and all one vector (the null condition of guidance, and every
      caption dropped in training: L zero tokens) keeps one of them, which stands for all L: it gets log L
      added to its logits (L equal keys weigh L e^s in the softmax), and as a query it gets the output each
      of the L would get. Its other columns are hidden.

    ``mask``: bool (B, L), True = visible, or None (all visible). Returns (tokens (B, L', D), key mask):
    unchanged (the same tensors) when nothing can be saved, else the first L' columns with a float32 key
    bias (B, L'): 0 visible, -inf hidden, log L for a row's one standing token. It reads the tokens' values to
    choose L', so under torch.compile and on fake or meta tensors (shape tracing) everything runs unchanged.
    """
    if torch.compiler.is_compiling() or isinstance(tokens, FakeTensor) or tokens.device.type == "meta":
        return tokens, mask
    b, length = tokens.shape[:2]
    visible = torch.ones(b, length, dtype=torch.bool, device=tokens.device) if mask is None else mask
    repeated = visible.all(dim=1) & (tokens == tokens[:, :1]).flatten(1).all(dim=1)
    any_repeated = length > 1 and bool(repeated.any())  # one read of the values (a host sync on a GPU)
    if not any_repeated:
        repeated = torch.zeros_like(repeated)
    columns = torch.arange(length, device=tokens.device)
    last_needed = torch.where(visible, columns, -1).amax(dim=1)  # -1: a row with no visible token
    needed = torch.where(repeated, 0, last_needed)
    kept = max(int(needed.max()) + 1, 1)
    if kept == length and not any_repeated:
        return tokens, mask
    bias = torch.zeros(b, kept, device=tokens.device).masked_fill(~visible[:, :kept], float("-inf"))
    standing = torch.full((kept,), float("-inf"), device=tokens.device)
    standing[0] = math.log(length)
    bias = torch.where(repeated[:, None], standing, bias)
    return tokens[:, :kept], bias


def join_key_masks(masks: list[torch.Tensor | None], lengths: list[int], batch: int, device: torch.device) -> torch.Tensor | None:
    """One key mask for keys made of several token groups (text streams, image tokens), from each group's mask
    (bool, a float bias as :func:`compact_tokens` gives, or None = all visible); None when every group is all visible.
    Bool masks stay bool; a float bias anywhere makes the whole a float bias."""
    if all(m is None for m in masks):
        return None
    if all(m is None or m.dtype == torch.bool for m in masks):
        return torch.cat([torch.ones(batch, n, dtype=torch.bool, device=device) if m is None else m for m, n in zip(masks, lengths)], dim=1)
    parts = []
    for m, n in zip(masks, lengths):
        if m is None:
            m = torch.zeros(batch, n, device=device)
        elif m.dtype == torch.bool:
            m = torch.zeros(batch, n, device=device).masked_fill(~m, float("-inf"))
        parts.append(m.float())
    return torch.cat(parts, dim=1)


def check_mask(mask: torch.Tensor | None, tokens: torch.Tensor, key: str, fix_empty_rows: bool = True) -> torch.Tensor | None:
    """Validate a bool (B, L) token mask (True = real token).

    With ``fix_empty_rows`` a row with no real token is made all True, so that an attention whose
    only keys are these tokens (cross-attention) never sees an empty softmax (NaN).
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
        raise ValueError(f"cond['{key}'] must be a bool tensor of shape {tuple(tokens.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    return mask | ~mask.any(dim=1, keepdim=True) if fix_empty_rows else mask


def require_keys(cond: object, keys: tuple[str, ...], network: str) -> dict:
    """Check that cond is a dict holding ``keys``; a clear error names what is missing."""
    if not isinstance(cond, dict):
        raise TypeError(f"{network} expects cond as a dict with keys {list(keys)}, got {type(cond).__name__}")
    missing = [k for k in keys if k not in cond]
    if missing:
        raise KeyError(f"{network}: cond is missing key(s) {missing} (it has {sorted(cond)})")
    return cond


def check_latents(z: object, channels: int, patch_size: int, max_grid: int | None, network: str, table_arg: str) -> tuple[int, int]:
    """Validate latents z against a network's configuration; returns the token grid (h, w).

    ``max_grid`` is the side of the position table in tokens (None: no table, any size) and ``table_arg``
    names the constructor argument that sets it (e.g. "input_size=32" or "pos_embed_max_size=96"), so
    that the error says what to change.
    """
    p = patch_size
    limit = "" if max_grid is None else f" and at most {max_grid * p} ({table_arg})"
    expected = f"(B, {channels}, H, W) with H and W divisible by patch_size {p}{limit}"
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        got = f"shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{network} expects latents of shape {expected}; got {got}")
    if z.shape[1] != channels:
        raise ValueError(f"{network} expects latents with {channels} channels, shape {expected}; got {z.shape[1]} channels, shape {tuple(z.shape)}")
    height, width = z.shape[-2:]
    if height % p or width % p:
        raise ValueError(f"{network}: latent height/width {height}x{width} (shape {tuple(z.shape)}) must be divisible by patch_size {p}")
    h, w = height // p, width // p
    if max_grid is not None and (h > max_grid or w > max_grid):
        raise ValueError(
            f"{network}: latent {height}x{width} gives a {h}x{w} token grid, which exceeds the position table "
            f"({max_grid}x{max_grid} tokens, {table_arg}: latents up to {max_grid * p}x{max_grid * p}); raise {table_arg.split('=')[0]}"
        )
    return h, w


def check_timesteps(t: object, batch: int, network: str) -> torch.Tensor:
    """t must be a float tensor of shape (batch,) (a 0-d tensor is broadcast to the batch)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{network} expects t as a float tensor of shape ({batch},), got {type(t).__name__}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{network} expects t of shape ({batch},) (one time per latent), got {tuple(t.shape)}")
    return t


def check_tokens(tokens: object, batch: int, dim: int, key: str, network: str, max_tokens: int | None, max_arg: str) -> torch.Tensor:
    """Validate a text token stream cond[key]: a (batch, L, dim) tensor with L <= max_tokens (None: unlimited)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[0] != batch or tokens.shape[2] != dim:
        got = f"shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{network}: cond['{key}'] must have shape ({batch}, L, {dim}) (batch, tokens, context dim), got {got}")
    if max_tokens is not None and tokens.shape[1] > max_tokens:
        raise ValueError(
            f"{network}: cond['{key}'] has {tokens.shape[1]} tokens, more than {max_arg}={max_tokens}; "
            "truncate the text encoder's output or raise the limit"
        )
    return tokens


def check_pooled(pooled: object, batch: int, dim: int, network: str, key: str = "pooled") -> torch.Tensor:
    """Validate a pooled conditioning vector: a (batch, dim) tensor."""
    if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (batch, dim):
        got = f"shape {tuple(pooled.shape)}" if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise ValueError(f"{network}: cond['{key}'] must have shape ({batch}, {dim}) (batch, pooled_dim), got {got}")
    return pooled


# --------------------------------------------------------------------------------------------
# Loading weights
# --------------------------------------------------------------------------------------------


class NetworkStateError(ValueError):
    """A state dict that does not fit a network (another architecture or size)."""


def _describe(items: list[str], limit: int) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n    {shown}{more}"


def load_network_state(
    net: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict", prefix: str = "", limit: int = 10
) -> None:
    """Load ``state_dict`` into ``net`` strictly, or raise ``NetworkStateError`` saying exactly what does not fit.

    The error lists (up to ``limit`` of each, then a count) the network's tensors that the state dict
    lacks (with the shape the network expects), the state dict's tensors the network has no place for
    (with their shapes), and the tensors whose shapes differ (checkpoint shape vs network shape).
    Nothing is loaded unless everything fits.

    Args:
        net: the network to load into.
        state_dict: tensors by name (e.g. a checkpoint's state_dict).
        source: what the state dict is (a file name), for the message.
        prefix: if given, only keys starting with it are used and the prefix is stripped
            (e.g. "net." for a Lightning checkpoint of a flowmatch objective).
        limit: how many names of each kind the message lists.
    """
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        k for k in expected
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        shape = lambda x: tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__  # noqa: E731
        parts = [f"{source} does not fit {type(net).__name__} ({len(state_dict)} tensors given, {len(expected)} expected)"]
        if mismatched:
            rows = [f"{k}: {shape(state_dict[k])} given, {shape(expected[k])} expected" for k in mismatched]
            parts.append(f"{len(mismatched)} shape mismatch(es):" + _describe(rows, limit))
        if missing:
            parts.append(f"{len(missing)} missing tensor(s):" + _describe([f"{k} {shape(expected[k])}" for k in missing], limit))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s):" + _describe([f"{k} {shape(state_dict[k])}" for k in unexpected], limit))
        if missing and not prefix and unexpected:
            heads = sorted({k.split(".", 1)[0] + "." for k in unexpected if "." in k})
            hits = [h for h in heads if all(f"{h}{k}" in state_dict for k in list(expected)[:3])]
            if hits:
                parts.append(f"hint: the keys carry the prefix {hits[0]!r}; pass prefix={hits[0]!r}")
        parts.append("is it a checkpoint of another architecture or size?")
        raise NetworkStateError("\n".join(parts))
    net.load_state_dict(state_dict, strict=True)


def init_linears_xavier(module: nn.Module) -> None:
    """DiT's basic init: xavier-uniform weights and zero biases for every nn.Linear inside ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def zero_init(linear: nn.Linear) -> None:
    """Zero a linear layer's weight and bias (adaLN-Zero modulation and final projections)."""
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> adaLN (shift, scale) from c -> Linear to p*p*out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))

    def reset_parameters(self) -> None:
        """Zero modulation and zero projection: the network's output starts at exactly 0."""
        zero_init(self.adaLN_modulation[-1])
        zero_init(self.linear)
