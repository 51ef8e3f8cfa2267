"""Training-step speed, peak memory and achieved FLOP/s of the transformer backbones on CPU, against diffusers' SD3 MM-DiT.

Fixed config (the same for every model):
    batch 16, latents 16 x 32 x 32 (patch 2 -> 16 x 16 = 256 image tokens), 77 text tokens of dim 384,
    pooled text vector of dim 384, float32 weights, train mode, conditioning dropout off.
    --shape main_job: the main job's step instead, batch 64 of 16 x 8 x 8 latents (16 image tokens) with 32 text
    tokens (no mask, which diffusers' SD3 cannot take, so the padding compaction of flowmatch plays no part).
    One step = zero grads, forward, loss = mean(out.float()^2), backward (no optimiser step).
Precisions (--precisions, default both; one table row per model and precision):
    fp32   everything in float32.
    bf16   the forward pass under torch.autocast("cpu", dtype=torch.bfloat16) with float32 weights (what
           Lightning's precision="bf16-mixed" does); the loss and the backward call outside autocast.
Timing: in each of ROUNDS rounds every (model, precision) pair runs WARMUP discarded steps and STEPS timed
    steps in a fresh subprocess (the order of the pairs reversed in every other round, so that a changing
    background load hits all of them alike); the table gives the median wall time over all timed steps, and
    the median CPU time of the process per step (less sensitive to other jobs on a shared machine).
Models:
    DiT-S/2                        flowmatch DiT (12 blocks, hidden 384, 6 heads), conditioned on the pooled vector
    MM-DiT depth 4 (flowmatch)     flowmatch MMDiT, depth 4, hidden 256, 4 heads (head dim 64), no QK-norm
    MM-DiT depth 4 (diffusers)     diffusers.SD3Transformer2DModel at the identical config (only if diffusers is installed)
Peak memory: every (model, precision) pair runs in its own fresh subprocess; the column is ru_maxrss at the end minus
ru_maxrss just before the model is built (torch / diffusers imports and the inputs excluded), i.e. the
peak resident memory the parameters, gradients and activations of a training step added (median over
rounds).
FLOP/s (how close the matmul work comes to this machine's limit):
    GFLOP/step   one training step (forward + backward) counted once per worker, before the timed steps,
                 by torch.utils.flop_counter.FlopCounterMode under the same precision context (this counted
                 step is not timed, but it warms up like a WARMUP step and is inside the memory window). The
                 counter counts matmuls (linear layers, bmm, convolutions such as the patch embedding) and
                 attention; elementwise work (norms, activations, softmax, modulation, biases, the loss) is
                 not counted. A multiply-add is 2 FLOPs. Attention: the fused CPU kernel
                 (aten._scaled_dot_product_flash_attention_for_cpu) has no formula in FlopCounterMode, so
                 this script gives it one: Q K^T and A V forward, their 4 gradient matmuls backward, i.e.
                 the same count as the unfused math (sdpa_kernel(SDPBackend.MATH)); the kernel's
                 recomputation of the scores in the backward is not counted. Autograd skips the gradient
                 w.r.t. the inputs of each input path's first layer, so the step is a little under 3 x forward.
    GFLOP/s      GFLOP/step / median wall seconds per step.
    matmul peak  measured once per precision, before the rounds, in its own fresh subprocess at the same
                 thread count: (n x n) @ (n x n) with n = --peak_size (default 4096), float32 tensors for
                 fp32 and bfloat16 tensors for bf16; 3 warm-up calls, then 2 n^3 / the median of 5 timed calls.
    % of matmul peak   GFLOP/s / the matmul peak of the row's precision. Since only the matmul work is
                 counted, this says how close the matmul part of a step gets to what a large, ideal matmul
                 reaches; the rest of the gap is the uncounted elementwise work, small matmuls and overheads.

    python benchmarks/bench_backbones.py                 # all models, fp32 and bf16, table on stdout
    python benchmarks/bench_backbones.py --rounds 3 --steps 10 --threads 2 --models mmdit_depth4 sd3_depth4
    python benchmarks/bench_backbones.py --models mmdit_depth4 sd3_depth4 --precisions bf16 --peak_size 2048
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BATCH, CHANNELS, SIDE, PATCH = 16, 16, 32, 2
TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 77, 384, 384
#: --shape: the fixed config above ("bench", the default), or the main job's step ("main_job": batch 64 of 16x8x8
#: latents, 16 image + 32 text tokens; no mask, so both implementations compute the same thing)
SHAPES = {"bench": dict(BATCH=16, SIDE=32, TEXT_TOKENS=77), "main_job": dict(BATCH=64, SIDE=8, TEXT_TOKENS=32)}


def _use_shape(shape: str) -> None:
    globals().update(SHAPES[shape])
MMDIT_DEPTH, MMDIT_HIDDEN, MMDIT_HEADS = 4, 256, 4
WARMUP, STEPS, ROUNDS = 2, 5, 2
PRECISIONS = ("fp32", "bf16")
PEAK_SIZE, PEAK_WARMUP, PEAK_REPS = 4096, 3, 5

MODELS = {
    "dit_s2": "DiT-S/2 (flowmatch)",
    "mmdit_depth4": "MM-DiT depth 4 (flowmatch)",
    "sd3_depth4": "MM-DiT depth 4 (diffusers SD3Transformer2DModel)",
}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _build(name: str):
    """(module, step function taking the inputs) for one model; imports stay outside the memory window."""
    if name == "dit_s2":
        from flowmatch.networks.dit import DiT

        net = DiT(size="S", patch_size=PATCH, in_channels=CHANNELS, input_size=SIDE, pooled_dim=POOLED_DIM, cond_drop_prob=0.0)
        return net, lambda z, t, tokens, pooled: net(z, t, pooled)
    if name == "mmdit_depth4":
        from flowmatch.networks.mmdit import MMDiT

        net = MMDiT(depth=MMDIT_DEPTH, hidden_size=MMDIT_HIDDEN, num_heads=MMDIT_HEADS, in_channels=CHANNELS, patch_size=PATCH,
                    pooled_dim=POOLED_DIM, context_dim=TEXT_DIM, pos_embed_max_size=SIDE // PATCH, cond_drop_prob=0.0)
        return net, lambda z, t, tokens, pooled: net(z, t, {"pooled": pooled, "tokens": tokens})
    if name == "sd3_depth4":
        from diffusers import SD3Transformer2DModel

        net = SD3Transformer2DModel(
            sample_size=SIDE, patch_size=PATCH, in_channels=CHANNELS, num_layers=MMDIT_DEPTH,
            attention_head_dim=MMDIT_HIDDEN // MMDIT_HEADS, num_attention_heads=MMDIT_HEADS, joint_attention_dim=TEXT_DIM,
            caption_projection_dim=MMDIT_HIDDEN, pooled_projection_dim=POOLED_DIM, out_channels=CHANNELS,
            pos_embed_max_size=SIDE // PATCH,
        )
        return net, lambda z, t, tokens, pooled: net(
            hidden_states=z, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=1000 * t, return_dict=False
        )[0]
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")


def _precision_context(precision: str):
    """The forward pass's context: bf16 autocast with float32 weights (Lightning's bf16-mixed), or nothing."""
    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")


def _flop_counter():
    """FlopCounterMode that also counts the fused CPU attention kernel, which it has no formula for: forward
    Q K^T and A V, backward their 4 gradient matmuls (2 x forward, as the unfused math; no recomputation)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return 2 * sdpa_flop_count(query, key, value)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd,
    })


def matmul_peak(precision: str, threads: int, n: int) -> dict:
    """GFLOP/s of an (n x n) @ (n x n) matmul in this (fresh) process: 2 n^3 / the median of PEAK_REPS calls."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    for _ in range(PEAK_WARMUP):
        a @ b
    times = []
    for _ in range(PEAK_REPS):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return {"precision": precision, "n": n, "gflops": 2 * n**3 / statistics.median(times) / 1e9}


def worker(name: str, precision: str, threads: int, warmup: int, steps: int) -> dict:
    """Run one model's training steps at one precision in this (fresh) process and return its numbers."""
    import torch

    torch.set_num_threads(threads)
    if name == "sd3_depth4":
        import diffusers  # noqa: F401  (import cost kept out of the memory window)
    import flowmatch.networks.dit  # noqa: F401
    import flowmatch.networks.mmdit  # noqa: F401

    g = torch.Generator().manual_seed(0)
    z = torch.randn(BATCH, CHANNELS, SIDE, SIDE, generator=g)
    t = torch.rand(BATCH, generator=g)
    tokens = torch.randn(BATCH, TEXT_TOKENS, TEXT_DIM, generator=g)
    pooled = torch.randn(BATCH, POOLED_DIM, generator=g)

    rss_before = _maxrss_mb()
    torch.manual_seed(0)
    net, fwd = _build(name)
    net.train()
    params = sum(p.numel() for p in net.parameters())

    def step() -> None:
        for p in net.parameters():
            p.grad = None
        with _precision_context(precision):
            out = fwd(z, t, tokens, pooled)
        out.float().square().mean().backward()

    with _flop_counter() as counter:  # one counted, untimed step
        step()
    flops = counter.get_total_flops()
    wall, cpu = [], []
    for i in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        if i >= warmup:
            wall.append(1000 * (time.perf_counter() - start))
            cpu.append(1000 * (time.process_time() - start_cpu))
    return {"name": name, "precision": precision, "params": params, "flops": flops, "wall_ms": wall, "cpu_ms": cpu,
            "peak_mb": _maxrss_mb() - rss_before}


def _have_diffusers() -> bool:
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None


def _run_json(cmd: list[str], env: dict, what: str) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{what} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict] | None:
    """Print the table; return its rows (one dict per model and precision; flops exact), None in a worker."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS),
                        help="fp32, and/or bf16 = forward under CPU bf16 autocast with fp32 weights (default: both)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--steps", type=int, default=STEPS, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--peak_size", type=int, default=PEAK_SIZE, help="n of the (n x n) @ (n x n) matmul peak")
    parser.add_argument("--shape", default="bench", choices=list(SHAPES),
                        help="bench: batch 16, 16x32x32 latents, 77 tokens (default); main_job: batch 64, 16x8x8, 32 tokens")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--peak", choices=list(PRECISIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _use_shape(args.shape)
    if args.worker:
        print(json.dumps(worker(args.worker, args.precisions[0], args.threads, args.warmup, args.steps)))
        return None
    if args.peak:
        print(json.dumps(matmul_peak(args.peak, args.threads, args.peak_size)))
        return None

    models = [m for m in args.models if m != "sd3_depth4" or _have_diffusers()]
    skipped = sorted(set(args.models) - set(models))
    print(f"config: batch {BATCH}, latents {CHANNELS}x{SIDE}x{SIDE} (patch {PATCH}: {(SIDE // PATCH) ** 2} image tokens), "
          f"{TEXT_TOKENS} text tokens of dim {TEXT_DIM}, pooled {POOLED_DIM}; float32 weights, precision(s) "
          f"{', '.join(args.precisions)}, fwd+bwd, {args.threads} thread(s), {args.rounds} round(s) x {args.steps} "
          f"timed steps after {args.warmup} warm-up per model and precision")
    script = os.path.abspath(__file__)
    root = os.path.dirname(os.path.dirname(script))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    peaks = {}
    for precision in args.precisions:
        peaks[precision] = _run_json([sys.executable, script, "--peak", precision, "--threads", str(args.threads),
                                      "--peak_size", str(args.peak_size)], env, f"matmul peak ({precision})")["gflops"]
        print(f"matmul peak ({precision}, {args.peak_size} x {args.peak_size} @ {args.peak_size} x {args.peak_size}, "
              f"{args.threads} thread(s)): {peaks[precision]:.1f} GFLOP/s")
    pairs = [(name, precision) for name in models for precision in args.precisions]
    runs: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
    for r in range(args.rounds):
        for name, precision in (pairs if r % 2 == 0 else pairs[::-1]):
            cmd = [sys.executable, script, "--worker", name, "--precisions", precision, "--shape", args.shape, "--threads", str(args.threads),
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]
            runs[name, precision].append(_run_json(cmd, env, f"{name} ({precision})"))
    rows = []
    for (name, precision), rs in runs.items():
        wall = [x for run in rs for x in run["wall_ms"]]
        cpu = [x for run in rs for x in run["cpu_ms"]]
        ms_median = statistics.median(wall)
        gflops = rs[0]["flops"] / (ms_median / 1000) / 1e9
        rows.append({"name": name, "precision": precision, "params": rs[0]["params"], "ms_median": ms_median,
                     "ms_min": min(wall), "ms_max": max(wall), "cpu_median": statistics.median(cpu),
                     "peak_mb": statistics.median(run["peak_mb"] for run in rs), "flops": rs[0]["flops"],
                     "gflops": gflops, "peak_fraction": gflops / peaks[precision]})

    header = ("model", "precision", "params", "fwd+bwd ms/step (median)", "min..max ms", "CPU ms/step", "peak memory MB",
              "GFLOP/step", "GFLOP/s", "% of matmul peak")
    lines = [(MODELS[r["name"]], r["precision"], f"{r['params'] / 1e6:.2f}M", f"{r['ms_median']:.0f}",
              f"{r['ms_min']:.0f}..{r['ms_max']:.0f}", f"{r['cpu_median']:.0f}", f"{r['peak_mb']:.0f}",
              f"{r['flops'] / 1e9:.1f}", f"{r['gflops']:.1f}", f"{100 * r['peak_fraction']:.1f}%") for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"  # noqa: E731
    print(fmt(header))
    print("|" + "|".join(("-" * (w + 1) + ":") if i >= 2 else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|")
    for line in lines:
        print(fmt(line))
    if skipped:
        print(f"skipped (diffusers not installed): {', '.join(skipped)}")
    by = {(r["name"], r["precision"]): r for r in rows}
    for precision in args.precisions:
        if ("mmdit_depth4", precision) in by and ("sd3_depth4", precision) in by:
            a, b = by["mmdit_depth4", precision], by["sd3_depth4", precision]
            print(f"flowmatch / diffusers MM-DiT d4 ({precision}): wall time {a['ms_median'] / b['ms_median']:.2f}x, CPU time "
                  f"{a['cpu_median'] / b['cpu_median']:.2f}x, peak memory {a['peak_mb'] / b['peak_mb']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
