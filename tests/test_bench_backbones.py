"""benchmarks/bench_backbones.py end to end: one tiny run of MM-DiT depth 4 in fp32 and bf16 (real worker and
matmul-peak subprocesses), its table's FLOP/s columns, and its FLOP count against an independent one.

The script counts the fused CPU attention kernel with a formula of its own (FlopCounterMode has none for it); the
independent count here runs the same network under sdpa_kernel(SDPBackend.MATH), where attention decomposes into
bmm calls that FlopCounterMode counts by itself, so the two counts agree only if that formula is right.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_backbones.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_backbones", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def independent_count(bb) -> int:
    """FlopCounterMode's own count of one fp32 training step of MM-DiT depth 4 at the script's config, math attention."""
    from flowmatch.networks.mmdit import MMDiT

    net = MMDiT(depth=bb.MMDIT_DEPTH, hidden_size=bb.MMDIT_HIDDEN, num_heads=bb.MMDIT_HEADS, in_channels=bb.CHANNELS,
                patch_size=bb.PATCH, pooled_dim=bb.POOLED_DIM, context_dim=bb.TEXT_DIM,
                pos_embed_max_size=bb.SIDE // bb.PATCH, cond_drop_prob=0.0).train()
    z = torch.randn(bb.BATCH, bb.CHANNELS, bb.SIDE, bb.SIDE)
    t = torch.rand(bb.BATCH)
    cond = {"pooled": torch.randn(bb.BATCH, bb.POOLED_DIM), "tokens": torch.randn(bb.BATCH, bb.TEXT_TOKENS, bb.TEXT_DIM)}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(z, t, cond).float().square().mean().backward()
    return counter.get_total_flops()


def test_precision_rows_flops_and_matmul_peak(capsys):
    bb = load_bench()
    rows = bb.main(["--models", "mmdit_depth4", "--precisions", "fp32", "bf16", "--rounds", "1", "--steps", "1",
                    "--warmup", "0", "--threads", "1", "--peak_size", "512"])
    printed = capsys.readouterr().out
    for precision in ("fp32", "bf16"):
        assert re.search(rf"^matmul peak \({precision}, 512 x 512 @ 512 x 512, 1 thread\(s\)\): \d+\.\d GFLOP/s$",
                         printed, re.M), printed
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    assert [(r["model"], r["precision"]) for r in table] == [
        ("MM-DiT depth 4 (flowmatch)", "fp32"), ("MM-DiT depth 4 (flowmatch)", "bf16")], printed
    for r in table:
        assert float(r["GFLOP/s"]) > 0 and float(r["GFLOP/step"]) > 0, r
        assert re.fullmatch(r"\d+\.\d%", r["% of matmul peak"]) and float(r["% of matmul peak"][:-1]) > 0, r

    fp32 = next(r for r in rows if r["name"] == "mmdit_depth4" and r["precision"] == "fp32")
    torch.manual_seed(0)
    assert fp32["flops"] == independent_count(bb)


def test_main_job_shape(capsys):
    bb = load_bench()
    rows = bb.main(["--shape", "main_job", "--models", "mmdit_depth4", "--precisions", "fp32", "--rounds", "1", "--steps", "1",
                    "--warmup", "0", "--threads", "1", "--peak_size", "256"])
    assert "config: batch 64, latents 16x8x8 (patch 2: 16 image tokens), 32 text tokens" in capsys.readouterr().out
    torch.manual_seed(0)
    assert rows[0]["flops"] == independent_count(bb)  # the module's config is now the main job's
