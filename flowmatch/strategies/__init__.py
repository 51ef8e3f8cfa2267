"""Scale-out: DeepSpeed ZeRO as a Lightning strategy (also on CPU), ZeRO-3 helpers, and a throughput /
memory / optimizer-state report.

Select a strategy in config, e.g. ``--trainer configs/trainer/deepspeed_stage_2.yaml``."""

from flowmatch.strategies.deepspeed import DeepSpeedZeRO
from flowmatch.strategies.monitor import SpeedMonitor, optimizer_state_bytes

__all__ = ["DeepSpeedZeRO", "SpeedMonitor", "optimizer_state_bytes"]
