"""What a scaled-out run costs: samples/s, model FLOPs utilisation, peak memory, and the optimizer
state each rank holds (to see ZeRO's sharding measured, not assumed).

``SpeedMonitor`` is a callback. It counts the FLOPs of one real training step (forward + backward,
torch's FlopCounterMode), times the steps after a warm-up, and at the end of training prints one
table (rank 0), logs ``perf/*`` metrics and, with ``out_dir``, writes ``out_dir/rank<r>.json``.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Unwrap LightningOptimizer and DeepSpeed's ZeRO / bf16 wrappers down to the torch optimizer
    that holds the moments (under ZeRO its parameters are this rank's fp32 partitions)."""
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None or not hasattr(inner, "state"):
            break
        optimizer = inner
    return optimizer


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(optimizer: Any) -> dict[str, int]:
    """Bytes this rank holds in the optimizer: ``state`` (Adam's moments etc.) and ``params`` (the
    tensors it updates: the model's own parameters, or under ZeRO this rank's fp32 partitions)."""
    opt = innermost_optimizer(optimizer)
    state = sum(_tensor_bytes(s) for s in opt.state.values())
    params = sum(p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    return {"state": int(state), "params": int(params)}


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak accelerator memory allocated by torch, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "GPU max allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "CPU max RSS"


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict) and isinstance(batch.get("x0"), torch.Tensor):
        return int(batch["x0"].shape[0])
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return 0


class SpeedMonitor(L.Callback):
    """Throughput, MFU, peak memory and per-rank optimizer state of a training run.

    Args:
        warmup_steps: steps left out of the timing (compilation, allocator warm-up).
        out_dir: if set, each rank writes its numbers to ``out_dir/rank<r>.json``.
        count_flops: count the FLOPs of the first training step (forward + backward) with
            torch.utils.flop_counter; MFU needs it and the device's peak (known GPUs only).
    """

    def __init__(self, warmup_steps: int = 5, out_dir: str | None = None, count_flops: bool = True):
        self.warmup_steps = warmup_steps
        self.out_dir = out_dir
        self.count_flops = count_flops
        self.report: dict[str, Any] = {}
        self._flop_mode = None
        self._t0: float | None = None
        self._timed_steps = 0
        self._timed_samples = 0
        self._last_step = -1

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.count_flops and "flops_per_step" not in self.report and self._flop_mode is None:
            from torch.utils.flop_counter import FlopCounterMode

            self._flop_mode = FlopCounterMode(display=False)
            self._flop_mode.__enter__()
            self.report["batch_size_per_rank"] = _batch_size(batch)
        if trainer.global_step == self.warmup_steps and self._t0 is None:
            self._sync(pl_module.device)
            self._t0 = time.perf_counter()
            self._timed_steps = self._timed_samples = 0
            self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._flop_mode is not None:
            self._flop_mode.__exit__(None, None, None)
            self.report["flops_per_step"] = int(self._flop_mode.get_total_flops())
            self._flop_mode = None
        if "optimizer" not in self.report and trainer.optimizers:
            self.report["optimizer"] = optimizer_state_bytes(trainer.optimizers[0])
        if self._t0 is not None and trainer.global_step > self._last_step:
            self._timed_steps += trainer.global_step - self._last_step
            self._last_step = trainer.global_step
        if self._t0 is not None:
            self._timed_samples += _batch_size(batch)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._flop_mode is not None:  # never leave the FLOP counter active
            self._flop_mode.__exit__(None, None, None)
            self._flop_mode = None

    def on_train_end(self, trainer, pl_module) -> None:
        device = pl_module.device
        self._sync(device)
        r = self.report
        r["rank"], r["world_size"] = trainer.global_rank, trainer.world_size
        if self._t0 is not None and self._timed_steps > 0:
            seconds = time.perf_counter() - self._t0
            r["timed_steps"] = self._timed_steps
            r["seconds_per_step"] = seconds / self._timed_steps
            r["samples_per_s"] = self._timed_samples * trainer.world_size / seconds  # all ranks
            if r.get("flops_per_step"):
                achieved = r["flops_per_step"] / r["seconds_per_step"]  # per device
                r["tflops_per_device"] = achieved / 1e12
                from lightning.fabric.utilities.throughput import get_available_flops

                dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
                peak = get_available_flops(device, dtype) if device.type == "cuda" else None
                r["mfu"] = achieved / peak if peak else None
        r["peak_memory_bytes"], r["peak_memory_kind"] = peak_memory_bytes(device)
        if self.out_dir:
            out = Path(self.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(r, indent=2))
        metrics = {"perf/peak_memory_gb": r["peak_memory_bytes"] / 2**30}
        if "optimizer" in r:
            metrics["perf/optimizer_state_mb"] = r["optimizer"]["state"] / 2**20
        for key in ("samples_per_s", "mfu", "tflops_per_device"):
            if r.get(key) is not None:
                metrics[f"perf/{key}"] = float(r[key])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            print(self.table())

    def table(self) -> str:
        r = self.report
        mb = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
        rows = [
            ("world size", str(r.get("world_size"))),
            ("batch per rank", str(r.get("batch_size_per_rank", "?"))),
            ("timed steps", str(r.get("timed_steps", "-"))),
            ("seconds / step", f"{r['seconds_per_step']:.4f}" if "seconds_per_step" in r else "-"),
            ("samples / s (all ranks)", f"{r['samples_per_s']:.1f}" if "samples_per_s" in r else "-"),
            ("model TFLOP/s per device", f"{r['tflops_per_device']:.3g}" if r.get("tflops_per_device") else "-"),
            ("MFU", f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "n/a (peak FLOP/s unknown for this device)"),
            (f"peak memory ({r.get('peak_memory_kind')})", mb(r.get("peak_memory_bytes", 0))),
        ]
        if "optimizer" in r:
            rows.append(("optimizer state, rank 0", mb(r["optimizer"]["state"])))
            rows.append(("optimizer params, rank 0", mb(r["optimizer"]["params"])))
        width = max(len(k) for k, _ in rows)
        return "\n".join(["speed and memory", *(f"  {k:<{width}}  {v}" for k, v in rows)])
