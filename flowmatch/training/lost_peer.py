"""A distributed run that loses one of its processes stops the others at once, with a clear error.

When a rank dies (killed, out of memory, its machine gone), the others are inside a collective (an
all-reduce, a barrier before a checkpoint) that fails as soon as the transport sees the broken connection:
gloo on CPU reports it within seconds (1.4 s measured over loopback, either rank killed). A peer that hangs
without dying is bounded by the process group's timeout (Lightning's default: 30 min; ``DDPStrategy(timeout=...)``
/ ``DeepSpeedStrategy(timeout=...)``). Lightning then kills the run's other local processes.

What the user saw was a traceback ending in ``gloo/transport/tcp/pair.cc ... Connection reset by peer ...
GLHF!``. The LostPeerReport callback (returned by the objectives' ``configure_callbacks``) notes, when such an
error stops the fit, the rank that saw it and the last checkpoint written; the CLI prints ``error: ...`` with
the command line's resume hint and exits with status 1. Checkpoints are written atomically, so a process
killed mid-save leaves the previous one intact.
"""

from __future__ import annotations

import lightning as L
import torch.distributed as dist

from flowmatch.error_chain import causes

#: filled by LostPeerReport when a lost peer stops a fit (read by the CLI)
LAST_LOSS: dict = {}

_TRANSPORT_SIGNS = ("connection reset by peer", "connection closed by peer", "broken pipe", "nccl communicator was aborted",
                    "socket timeout", "timed out", "connection refused")


def is_lost_peer(err: BaseException | None) -> bool:
    """Is ``err`` (or what it was raised from) a collective that failed because another process went away?"""
    for e in causes(err):
        text = str(e).lower()
        if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and ("gloo" in text or "nccl" in text)):
            if any(sign in text for sign in _TRANSPORT_SIGNS):
                return True
    return False


def lost_peer_message(err: BaseException) -> str | None:
    """The one-paragraph error for a fit stopped by a lost peer (None: ``err`` is something else)."""
    if not is_lost_peer(err):
        return None
    reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    reason = reason.split("] ", 1)[-1].split(". This is typically", 1)[0]  # gloo's source location and advice off
    where = f"rank {LAST_LOSS['rank']} of {LAST_LOSS['world']}" if LAST_LOSS else "this process"
    ckpt = LAST_LOSS.get("checkpoint")
    resume = (f"the last checkpoint written is {ckpt}: resume with --ckpt_path {ckpt}" if ckpt else
              "no checkpoint was written before it")
    return (f"another process of this distributed run went away ({where} saw: {reason}); the run stopped on every "
            f"rank. Look at the other processes' logs for why; {resume}")


class LostPeerReport(L.Callback):
    """Note the rank and the last checkpoint when a lost peer stops the fit (module docstring)."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.world_size > 1 and is_lost_peer(exception):
            callback = trainer.checkpoint_callback
            LAST_LOSS.update(rank=trainer.global_rank, world=trainer.world_size,
                             checkpoint=(getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") or None))
