"""benchmarks/bench_gpu.py: its FLOP formula against torch's FlopCounterMode, and its CPU dry run end to end.

The formula (bench_gpu.forward_flops) is checked against an independent count: torch.utils.flop_counter.FlopCounterMode
around a real forward (and backward) of the platform's MMDiT and FLUX. Two things the counter does not see by itself:
  * attention on CPU: F.scaled_dot_product_attention dispatches to a fused CPU kernel that the counter has no formula
    for, so its Q K^T and A V FLOPs are missing; under sdpa_kernel(SDPBackend.MATH) the attention decomposes into
    bmm calls, which the counter counts. The tests count under MATH (and check that the default path misses exactly
    the formula's attention term, or nothing, should a later torch count the fused kernel).
  * the training step's 3 x forward: autograd skips the gradient with respect to the inputs (latents, text tokens,
    pooled vector, timestep sinusoid) of the first layer of each input path, so the counted forward + backward is
    3 x forward minus exactly those matmuls.
Elementwise work (norms, activations, softmax, RoPE, modulation, biases) is in neither count.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_gpu as bg  # noqa: E402

CPU = torch.device("cpu")
# odd sizes, so that no term of the formula can hide behind another: MM-DiT with 2 full blocks and the pre-only
# last block; FLUX-dev with its guidance embedding, 2 double + 2 single blocks
TINY = {
    "mmdit": bg.Arch("mmdit", hidden=48, heads=3, depth=3, channels=4, side=12, text_tokens=5, context_dim=24, pooled_dim=20),
    "flux": bg.Arch("flux", hidden=48, heads=3, double=2, single=2, channels=4, side=12, text_tokens=5, context_dim=24,
                    pooled_dim=20, guidance=True),
}


def count(arch: bg.Arch, batch: int, backward: bool = False, math_attention: bool = True) -> dict[str, int]:
    """FlopCounterMode's count of a forward (and backward) of the network at ``arch``, by aten op name."""
    net = bg.build_network(arch, CPU, "fp32", checkpointing=False)
    z, t, cond, target = bg.make_inputs(arch, batch, CPU)
    ctx = sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    with ctx, FlopCounterMode(display=False) as counter:
        out = net(z, t, cond)
        if backward:
            (out - target).square().mean().backward()
    return {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}


def skipped_input_grads(arch: bg.Arch) -> int:
    """Per image: the input-gradient matmuls of the first layer of each input path, which autograd does not run
    (patch embedding, text embedding, the first linear of the timestep / guidance / pooled MLPs)."""
    d, p = arch.hidden, arch.patch**2 * arch.channels
    return (2 * arch.image_tokens * p * d + 2 * arch.text_tokens * arch.context_dim * d
            + (2 if arch.guidance else 1) * 2 * bg.FREQ_DIM * d + 2 * arch.pooled_dim * d)


@pytest.mark.parametrize("kind", ["mmdit", "flux"])
def test_forward_flop_formula_matches_the_flop_counter(kind):
    """The formula's forward FLOPs equal FlopCounterMode's count of the real network's forward: in total, the
    attention term against the counted bmm (Q K^T, A V), the rest against the linears, matmuls and the patch conv."""
    arch, batch = TINY[kind], 3
    terms = {k: batch * v for k, v in bg.forward_flops(arch).items()}
    counted = count(arch, batch)
    assert sum(counted.values()) == pytest.approx(sum(terms.values()), rel=0.01), (counted, terms)
    assert counted["bmm"] == pytest.approx(terms["attention"], rel=0.01)
    rest = counted["addmm"] + counted.get("mm", 0) + counted["convolution"]
    assert rest == pytest.approx(terms["linear"] + terms["adaln"] + terms["outside"], rel=0.01)
    # the default CPU attention kernel is invisible to the counter (or, with a torch that counts it, fully seen)
    default = sum(count(arch, batch, math_attention=False).values())
    assert default in (pytest.approx(sum(terms.values()), rel=0.01),
                       pytest.approx(sum(terms.values()) - terms["attention"], rel=0.01))


@pytest.mark.parametrize("kind", ["mmdit", "flux"])
def test_training_step_is_three_forwards(kind):
    """Forward + backward counted = 3 x the formula's forward, less the input gradients autograd skips."""
    arch, batch = TINY[kind], 2
    counted = sum(count(arch, batch, backward=True).values())
    expected = bg.train_flops(arch, batch) - batch * skipped_input_grads(arch)
    assert counted == pytest.approx(expected, rel=0.005)
    assert counted == pytest.approx(bg.train_flops(arch, batch), rel=0.05)  # the 3 x forward convention, at this tiny size


@pytest.mark.parametrize("kind", ["mmdit", "flux"])
def test_formula_at_the_benchmarked_full_sizes(kind):
    """At the GPU sizes (SD3 d24 with 4096 + 154 tokens; FLUX width with 4096 + 512 tokens, 2 + 4 blocks) the formula
    equals the counted forward, counted with fake tensors (shapes only: no memory, no arithmetic)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    arch = bg.mmdit_arch(dry=False) if kind == "mmdit" else bg.flux_arch(dry=False, depth=None)
    batch = 2
    with FakeTensorMode():
        net = arch.network_class()(**arch.network_kwargs()).train()
        z, t = torch.empty(batch, arch.channels, arch.side, arch.side), torch.empty(batch)
        cond = {"tokens": torch.empty(batch, arch.text_tokens, arch.context_dim), "pooled": torch.empty(batch, arch.pooled_dim)}
        if arch.guidance:
            cond["guidance"] = torch.empty(batch)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            net(z, t, cond)
    assert counter.get_total_flops() == pytest.approx(batch * sum(bg.forward_flops(arch).values()), rel=0.01)
    assert arch.image_tokens == 4096 and arch.text_tokens == (154 if kind == "mmdit" else 512)
    if kind == "mmdit":  # SD3-medium-like: 24 blocks, hidden 1536, 24 heads of 64; ~2B parameters
        assert (arch.depth, arch.hidden, arch.heads) == (24, 1536, 24)
        assert 1.9e9 < bg.param_count(arch) < 2.2e9
        # the per-token-per-block estimate 24 D^2 S + 4 S^2 D over 24 blocks is within a few % of the full count
        d, s = arch.hidden, arch.image_tokens + arch.text_tokens
        assert sum(bg.forward_flops(arch).values()) == pytest.approx(24 * (24 * d * d * s + 4 * s * s * d), rel=0.03)


def test_known_peaks_by_device_name():
    assert bg.known_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bg.known_peak_tflops("NVIDIA H100 PCIe") == 756
    assert bg.known_peak_tflops("NVIDIA H200") == 989
    assert bg.known_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bg.known_peak_tflops("NVIDIA L40S") == 362
    assert bg.known_peak_tflops("NVIDIA GeForce RTX 3090") is None
    assert bg.batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64] and bg.batch_sizes(5) == [1, 2, 4]


def _opts(**kw):
    import argparse

    base = dict(device=CPU, precision="fp32", warmup=0, steps=1, peak_tflops=1.0, matmul_tflops=1.0, flash={},
                compile_backend="inductor", deadline=time.perf_counter() + 60)
    return argparse.Namespace(**{**base, **kw})


def test_out_of_memory_ends_the_sweep_and_the_budget_skips(monkeypatch):
    """An out-of-memory error at batch 4 gives an "OOM" row and stops that config's sweep; a spent budget skips
    configs and lists their batch sizes."""
    arch = bg.mmdit_arch(dry=True)
    real = bg.time_steps

    def oom_from_4(net, opt, inputs, *args):
        if inputs[0].shape[0] >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(net, opt, inputs, *args)

    monkeypatch.setattr(bg, "time_steps", oom_from_4)
    rows = bg.run_config(arch, False, False, [1, 2, 4, 8], 60.0, _opts(), None)
    assert [(r["batch"], r["status"]) for r in rows] == [(1, "ok"), (2, "ok"), (4, "OOM")]
    assert all(r["step_ms"] > 0 for r in rows[:2])
    rows = bg.run_all([arch], [False, True], [False], [1, 2], _opts(deadline=time.perf_counter()))
    assert [r["status"] for r in rows] == ["skipped (budget)"] * 4
    table = "\n".join(bg.format_table(rows, {"mmdit": 1}))
    assert "skipped (budget)" in table


def test_dry_run_prints_the_table_for_both_models(tmp_path):
    """`python benchmarks/bench_gpu.py --dry-run` as a user runs it without a GPU: the same code on CPU at a tiny
    size, a markdown table with positive step times, images/s and MFU for the MM-DiT and the FLUX rows."""
    out_json = tmp_path / "bench.json"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--dry-run", "--threads", "1",
                          "--json", str(out_json)], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(out.stdout)
    assert elapsed < 60
    text = out.stdout
    assert "CPU DRY RUN" in text and "goal: >= 45% MFU on an H100" in text and "SDPA flash backend: n/a (CPU)" in text
    assert "MFU against" in text and "measured CPU matmul rate" in text
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:10] == ["model", "compile", "ckpt", "batch", "step ms", "img/s", "TFLOP/s", "MFU", "% matmul", "mem GB"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| MM-DiT") or line.startswith("| FLUX")]
    for model in ("MM-DiT", "FLUX"):
        mine = [r for r in rows if r[0].startswith(model)]
        assert {(r[2], r[3]) for r in mine} == {("off", "1"), ("off", "2"), ("on", "1"), ("on", "2")}, mine
        for r in mine:
            step_ms, img_s, tflops = float(r[4]), float(r[5]), float(r[6])
            mfu, matmul = (float(re.fullmatch(r"([\d.]+)%", x).group(1)) for x in (r[7], r[8]))
            assert step_ms > 0 and img_s > 0 and tflops > 0 and mfu > 0 and matmul > 0
            assert img_s == pytest.approx(int(r[3]) / (step_ms / 1000), rel=0.02)
    result = json.loads(out_json.read_text())
    assert result["dry_run"] and result["flash"]["mmdit"]["used"] is None
    assert {r["model"] for r in result["rows"]} == {"mmdit", "flux"} and all(r["status"] == "ok" for r in result["rows"])
    for r in result["rows"]:
        arch = bg.Arch(**result["models"][r["model"]]["arch"])
        assert r["tflops"] == pytest.approx(bg.train_flops(arch, r["batch"]) / (r["step_ms"] / 1000) / 1e12, rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tflops"] / result["peak_tflops"], rel=1e-6)


def test_gpu_studies_script_dry_run_prints_both_medium_plans(tmp_path):
    """benchmarks/gpu_studies.sh (issue #19's medium budgets on one GPU) is unmeasured here: its --cpu-dry-run checks
    the environment and prints both studies' medium plans with the parallel jobs, training nothing."""
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_studies.sh"), "--cpu-dry-run", "--out", str(tmp_path), "--jobs", "6"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "gpu_studies: CPU DRY RUN" in out
    for study, fits in (("sd3_formulations_digits", 24), ("fm_vs_vp_digits", 9)):
        assert f"study {study} " in out and f"budget medium: {fits} fits" in out and f"sqlite:///{tmp_path}/{study}.db" in out
        assert f"[{fits}/{fits}] {study} " in out
    assert out.count(", jobs 6") == 2 and "--trainer.max_steps 2000" in out and "--trainer.accelerator auto" in out
    assert not list(tmp_path.glob("work/**/*.ckpt"))  # nothing trained
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_studies.sh"), "--nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --nope" in bad.stderr
