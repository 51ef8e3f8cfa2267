"""MLP velocity network for low-dimensional (2-D toy) data, optionally class-conditional.

Reads top to bottom:

    c = TimeMLP(timestep_embedding(t)) + ClassEmbedding(label)      conditioning vector, width `hidden`
    h = SiLU(Linear([z, c]))                                          first hidden layer (concatenation)
    h = SiLU(Linear(h))                    x (depth - 1)              further hidden layers
    v = Linear(h)                                                     zero-initialised output layer

Conditioning enters by concatenation with z, the simplest choice that fits the 2-D targets well
(as torchcfm's MLP does with t). The class table has ``num_classes + 1`` rows; the last row is the
*null* class, used for unconditional prediction in classifier-free guidance. During training each
label is replaced by the null class with probability ``cond_drop_prob`` (DiT's LabelEmbedder).

Initialisation: the output layer starts at zero, so the untrained net predicts v = 0 everywhere
(a harmless, common choice, like DiT's zeroed final layer; the gradient reaches the output layer
at once and the layers below from the second step on).
"""

from __future__ import annotations

import torch
from torch import nn

from flowmatch.networks.conditioning import ConditioningSpec
from flowmatch.networks.embeddings import timestep_embedding


class MLPVelocity(nn.Module):
    """Velocity (or noise) MLP called as ``net(z, t, cond=None) -> tensor shaped like z``.

    Args:
        dim: Dimension of a data point (z has shape (B, dim)).
        hidden: Width of every hidden layer and of the conditioning vector.
        depth: Number of hidden layers (each Linear + SiLU).
        time_dim: Width of the sinusoidal timestep embedding.
        num_classes: Number of class labels; 0 builds an unconditional network.
        cond_drop_prob: Probability, in training mode, of replacing a label by the null class.
    """

    #: default LoRA targets (flowmatch.adapters): the trunk's linear layers (the output layer is 2 wide)
    lora_target_modules = (r"trunk\.\d+",)

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        time_dim: int = 64,
        num_classes: int = 0,
        cond_drop_prob: float = 0.1,
    ):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1 or time_dim < 2:
            raise ValueError(
                f"MLPVelocity needs dim >= 1, hidden >= 1, depth >= 1, time_dim >= 2; "
                f"got dim={dim}, hidden={hidden}, depth={depth}, time_dim={time_dim}"
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.dim, self.hidden, self.depth, self.time_dim = dim, hidden, depth, time_dim
        self.num_classes, self.cond_drop_prob = num_classes, cond_drop_prob

        # Timestep: fixed sinusoids (float32) followed by a small learned MLP.
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # Class labels: one row per class plus the null class (index num_classes) for CFG.
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None

        # Trunk: [z, c] -> hidden -> ... -> dim.
        layers: list[nn.Module] = [nn.Linear(dim + hidden, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # ---- what it takes ----

    #: points have no patches (the input check of ``flowmatch.networks.conditioning.shape_problems``)
    patch_size = 1

    @property
    def in_channels(self) -> int:
        """The dimension of a data point (z has shape (B, dim))."""
        return self.dim

    @property
    def conditioning(self) -> ConditioningSpec:
        """Class labels (num_classes > 0) or nothing."""
        return ConditioningSpec(num_classes=self.num_classes)

    # ---- conditioning ----

    @property
    def null_class(self) -> int:
        """Index of the null (unconditional) class: the last row of the class table."""
        return self.num_classes

    def null_condition(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The unconditional counterpart of ``cond``: null-class labels shaped like it.

        Returns None for an unconditional network or when ``cond`` is None (None means
        "unconditional" to :meth:`forward` as well).
        """
        if self.num_classes == 0 or cond is None:
            return None
        return torch.full_like(cond, self.null_class)

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Classifier-free-guidance dropout: in training mode replace each label by the null
        class with probability ``cond_drop_prob``; in eval mode return the labels unchanged."""
        if not self.training or self.cond_drop_prob <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.cond_drop_prob
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def _check_inputs(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Validate shapes and labels; returns t as a (B,) tensor (a scalar t is broadcast)."""
        if z.ndim != 2 or z.shape[-1] != self.dim:
            raise ValueError(f"MLPVelocity expected z of shape (batch, {self.dim}), got {tuple(z.shape)}")
        batch = z.shape[0]
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"MLPVelocity expected t of shape ({batch},) (one time per sample), got {tuple(t.shape)}")
        if cond is None:
            return t
        if self.num_classes == 0:
            raise ValueError(
                "MLPVelocity was built unconditional (num_classes=0) but got a condition; "
                "set num_classes to the data module's num_classes or pass cond=None"
            )
        if cond.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"MLPVelocity expected integer class labels, got dtype {cond.dtype}")
        if cond.shape != (batch,):
            raise ValueError(f"MLPVelocity expected labels of shape ({batch},), got {tuple(cond.shape)}")
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) > self.null_class):
            raise ValueError(
                f"MLPVelocity expected labels in [0, {self.num_classes}) or {self.null_class} (the null class), "
                f"got values in [{int(cond.min())}, {int(cond.max())}]"
            )
        return t

    # ---- forward ----

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the velocity at (z, t): z (B, dim), t (B,) in [0, 1], cond (B,) labels or None."""
        t = self._check_inputs(z, t, cond)
        c = self.time_mlp(timestep_embedding(t, self.time_dim).to(z.dtype))
        if self.class_embed is not None:
            labels = torch.full((z.shape[0],), self.null_class, dtype=torch.long, device=z.device) if cond is None else cond.long()
            c = c + self.class_embed(self.drop_labels(labels))
        h = self.trunk(torch.cat([z, c.to(z.dtype)], dim=-1))
        return self.out(h)
