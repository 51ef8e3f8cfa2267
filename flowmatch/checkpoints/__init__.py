"""Checkpoint files: safe reading, atomic writing, DeepSpeed directories, EMA weights, and the RNG
streams that make a resume exact. Nothing here knows the objectives: rebuilding a trained model from
a checkpoint is ``flowmatch.objectives.loading.load_objective``.

Files are read with safe unpickling (``weights_only=True``): a checkpoint cannot run code. A checkpoint
may hold an exponential moving average of the weights (``checkpoint["ema"]``, written by
flowmatch.callbacks.EMA); ``select_weights`` swaps it in. A DeepSpeed ZeRO checkpoint is a directory;
``python -m flowmatch convert-checkpoint DIR --out FILE`` makes one file of it that everything reads.

- errors: CheckpointError
- safe_loading: torch.load with weights_only, also where DeepSpeed asks for less
- deepspeed_dirs: DeepSpeed checkpoint directories and their consolidation into one file
- reading: read_checkpoint / read_client_state / read_weights
- writing: atomic_torch_save, AtomicCheckpointIO (Lightning's checkpoint IO, atomic), probe_writable
- weights: select_weights (raw or EMA)
- rng: every rank's RNG state, captured and restored
"""

from flowmatch.checkpoints.deepspeed_dirs import (
    CONSOLIDATED_KEYS,
    consolidate_deepspeed_checkpoint,
    consolidate_sharded_ema,
    deepspeed_model_state_files,
    is_deepspeed_checkpoint,
)
from flowmatch.checkpoints.errors import CheckpointError
from flowmatch.checkpoints.reading import read_checkpoint, read_client_state, read_weights
from flowmatch.checkpoints.rng import capture_rng_state, gather_rng_states, restore_rng_state
from flowmatch.checkpoints.safe_loading import forced_safe_loading, safe_load
from flowmatch.checkpoints.weights import Weights, has_ema, select_weights
from flowmatch.checkpoints.writing import AtomicCheckpointIO, atomic_torch_save

__all__ = [
    "CONSOLIDATED_KEYS",
    "AtomicCheckpointIO",
    "CheckpointError",
    "Weights",
    "atomic_torch_save",
    "capture_rng_state",
    "consolidate_deepspeed_checkpoint",
    "consolidate_sharded_ema",
    "deepspeed_model_state_files",
    "forced_safe_loading",
    "gather_rng_states",
    "has_ema",
    "is_deepspeed_checkpoint",
    "read_checkpoint",
    "read_client_state",
    "read_weights",
    "restore_rng_state",
    "safe_load",
    "select_weights",
]
