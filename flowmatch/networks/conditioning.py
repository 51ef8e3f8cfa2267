"""What a network is conditioned on, declared once, and the one check of a network against its data.

Every network declares a :class:`ConditioningSpec` (its ``conditioning`` attribute): class labels, a
pooled vector, and which token streams (cond keys) with which widths and maximum lengths it reads.
Data declares the same object for what it provides (latent shards: the text encoders' widths and
max length; 2-D points: class labels; reflow couplings: what they were drawn with). Sampling,
reflow, the data module's users and checkpoint loading then compare the two with
:func:`fit_problems` / :func:`check_fits` instead of probing attributes of the network.

A network also declares its input: ``in_channels`` (channels of one sample, or the dimension of a
point) and ``patch_size`` (the latent side must divide by it; 1 for networks without patches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


class ConditioningMismatchError(ValueError):
    """A network and the data (or couplings, or a checkpoint) disagree on what the condition is."""


@dataclass(frozen=True)
class TokenStream:
    """A sequence of text tokens in the cond dict: ``cond[key]`` (B, L, width), padding mask ``cond[mask_key]``.

    ``max_length``: the most tokens the network accepts (None = any); for data, the length it provides."""

    key: str = "tokens"
    width: int = 0
    max_length: int | None = None
    mask_key: str = "mask"


@dataclass(frozen=True)
class ConditioningSpec:
    """The condition a network takes or a data set provides.

    * nothing: ``ConditioningSpec()`` (``kind == "none"``), cond is None;
    * class labels: ``num_classes > 0``, cond is an int64 tensor (B,) (index num_classes = the null class);
    * text: ``pooled_dim`` and/or ``token_streams``, cond is a dict {"pooled": (B, P), "tokens": (B, L, D), "mask": ...}.
    """

    num_classes: int = 0
    pooled_dim: int = 0
    token_streams: tuple[TokenStream, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.num_classes < 0 or self.pooled_dim < 0:
            raise ValueError(f"num_classes and pooled_dim must be >= 0, got {self.num_classes}, {self.pooled_dim}")
        if self.num_classes and (self.pooled_dim or self.token_streams):
            raise ValueError("a condition is class labels or text, not both")
        object.__setattr__(self, "token_streams", tuple(self.token_streams))

    @property
    def kind(self) -> str:
        """"none", "labels" or "text"."""
        if self.num_classes:
            return "labels"
        if self.pooled_dim or self.token_streams:
            return "text"
        return "none"

    @property
    def is_conditional(self) -> bool:
        return self.kind != "none"

    @property
    def is_text(self) -> bool:
        return self.kind == "text"

    def stream(self, key: str) -> TokenStream | None:
        return next((s for s in self.token_streams if s.key == key), None)

    def describe(self) -> str:
        if self.kind == "labels":
            return f"{self.num_classes} class labels"
        if self.kind == "text":
            parts = [f"pooled {self.pooled_dim}"] if self.pooled_dim else []
            parts += [f"{s.key} {s.max_length or 'any'} x {s.width}" for s in self.token_streams]
            return "text (" + ", ".join(parts) + ")"
        return "no condition"

    def to_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "pooled_dim": self.pooled_dim,
                "token_streams": [{"key": s.key, "width": s.width, "max_length": s.max_length, "mask_key": s.mask_key}
                                  for s in self.token_streams]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConditioningSpec":
        return cls(num_classes=int(d.get("num_classes") or 0), pooled_dim=int(d.get("pooled_dim") or 0),
                   token_streams=tuple(TokenStream(**s) for s in d.get("token_streams") or ()))

    @classmethod
    def text(cls, pooled_dim: int, context_dim: int, context_length: int | None = None) -> "ConditioningSpec":
        """One pooled vector and one token stream ("tokens" / "mask"): what latent/caption shards provide."""
        streams = (TokenStream("tokens", int(context_dim), context_length),) if context_dim else ()
        return cls(pooled_dim=int(pooled_dim), token_streams=streams)


def fit_problems(network: ConditioningSpec, data: ConditioningSpec, data_name: str = "the data") -> list[str]:
    """What keeps a network with condition ``network`` from training on / sampling from ``data`` (empty: it fits).

    Unconditional data fits any network that can run without a condition only when the network takes none;
    a network may ignore what the data provides beyond what it reads (e.g. a DiT reading only the pooled
    vector of text data), but every input it reads must be there with its width."""
    problems: list[str] = []
    if network.kind == "labels":
        if data.kind != "labels":
            problems.append(f"the network is class-conditional ({network.num_classes} classes) but {data_name} provides {data.describe()}")
        elif data.num_classes > network.num_classes:
            problems.append(f"{data_name} has {data.num_classes} classes, the network only {network.num_classes}")
        return problems
    if network.kind == "none":
        if data.kind == "labels":
            problems.append(f"{data_name} provides class labels but the network is unconditional")
        return problems
    # text
    if data.kind != "text":
        return [f"the network is text-conditioned ({network.describe()}) but {data_name} provides {data.describe()}"]
    if network.pooled_dim and network.pooled_dim != data.pooled_dim:
        problems.append(f"the network's pooled_dim is {network.pooled_dim} but {data_name}'s pooled vector has {data.pooled_dim}")
    for stream in network.token_streams:
        have = data.stream(stream.key)
        if have is None:
            problems.append(f"the network reads cond[{stream.key!r}] but {data_name} has no such token stream")
            continue
        if stream.width != have.width:
            problems.append(f"the network's {stream.key} width (context_dim) is {stream.width} but {data_name}'s is {have.width}")
        if stream.max_length is not None and have.max_length is not None and have.max_length > stream.max_length:
            problems.append(f"{data_name}'s {stream.key} are {have.max_length} tokens long, the network accepts at most {stream.max_length}")
    return problems


def shape_problems(network: Any, sample_shape: Sequence[int] | None, data_name: str = "the data") -> list[str]:
    """What keeps ``network`` (its ``in_channels`` and ``patch_size``) from taking samples of ``sample_shape``."""
    if sample_shape is None:
        return []
    shape = tuple(int(s) for s in sample_shape)
    problems = []
    channels = network.in_channels
    if channels is not None and shape and shape[0] != channels:
        problems.append(f"the network's in_channels is {channels} but {data_name}'s samples have shape {shape}")
    patch = network.patch_size
    if len(shape) == 3 and patch and (shape[1] % patch or shape[2] % patch):
        problems.append(f"{data_name}'s latent size {shape[1]}x{shape[2]} is not divisible by the network's patch_size {patch}")
    return problems


def check_fits(network: Any, conditioning: ConditioningSpec | None, sample_shape: Sequence[int] | None = None,
               data_name: str = "the data") -> None:
    """Raise ConditioningMismatchError naming every problem if ``network`` (a module declaring ``conditioning``,
    ``in_channels`` and ``patch_size``) does not fit data with this condition and sample shape."""
    problems = shape_problems(network, sample_shape, data_name)
    if conditioning is not None:
        problems += fit_problems(network.conditioning, conditioning, data_name)
    if problems:
        raise ConditioningMismatchError(f"{data_name} does not fit the network {type(network).__name__}: " + "; ".join(problems))
