"""The exceptions behind an exception: itself, then what it was raised from or while handling, without cycles.

Libraries wrap the error that matters (torch.save reports a full disk as a RuntimeError raised while handling the
OSError; MLflow wraps the connection error of requests): flowmatch reads the chain to say what really happened."""

from __future__ import annotations

from collections.abc import Iterator


def causes(err: BaseException | None) -> Iterator[BaseException]:
    """``err``, then its ``__cause__`` (or else ``__context__``), and so on."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
