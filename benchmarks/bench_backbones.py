"""Training-step speed and peak memory of the transformer backbones on CPU, against diffusers' SD3 MM-DiT.

Fixed config (the same for every model):
    batch 16, latents 16 x 32 x 32 (patch 2 -> 16 x 16 = 256 image tokens), 77 text tokens of dim 384,
    pooled text vector of dim 384, float32, train mode, conditioning dropout off.
    One step = zero grads, forward, loss = mean(out^2), backward (no optimiser step).
    Timing: in each of ROUNDS rounds every model runs WARMUP discarded steps and STEPS timed steps in
    a fresh subprocess (model order reversed in every other round, so that a changing background load
    hits all models alike); the table gives the median wall time over all timed steps, and the median
    CPU time of the process per step (less sensitive to other jobs on a shared machine).
Models:
    DiT-S/2                        flowmatch DiT (12 blocks, hidden 384, 6 heads), conditioned on the pooled vector
    MM-DiT depth 4 (flowmatch)     flowmatch MMDiT, depth 4, hidden 256, 4 heads (head dim 64), no QK-norm
    MM-DiT depth 4 (diffusers)     diffusers.SD3Transformer2DModel at the identical config (only if diffusers is installed)
Peak memory: every model runs in its own fresh subprocess; the column is ru_maxrss at the end minus
ru_maxrss just before the model is built (torch / diffusers imports and the inputs excluded), i.e. the
peak resident memory the parameters, gradients and activations of a training step added (median over
rounds).

    python benchmarks/bench_backbones.py                 # all models, table on stdout
    python benchmarks/bench_backbones.py --rounds 3 --steps 10 --threads 2 --models mmdit_depth4 sd3_depth4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BATCH, CHANNELS, SIDE, PATCH = 16, 16, 32, 2
TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 77, 384, 384
MMDIT_DEPTH, MMDIT_HIDDEN, MMDIT_HEADS = 4, 256, 4
WARMUP, STEPS, ROUNDS = 2, 5, 2

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


def worker(name: str, threads: int, warmup: int, steps: int) -> dict:
    """Run one model's training steps in this (fresh) process and return its numbers."""
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
    wall, cpu = [], []
    for i in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        for p in net.parameters():
            p.grad = None
        out = fwd(z, t, tokens, pooled)
        out.square().mean().backward()
        if i >= warmup:
            wall.append(1000 * (time.perf_counter() - start))
            cpu.append(1000 * (time.process_time() - start_cpu))
    return {"name": name, "params": params, "wall_ms": wall, "cpu_ms": cpu, "peak_mb": _maxrss_mb() - rss_before}


def _have_diffusers() -> bool:
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--steps", type=int, default=STEPS, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.warmup, args.steps)))
        return

    models = [m for m in args.models if m != "sd3_depth4" or _have_diffusers()]
    skipped = sorted(set(args.models) - set(models))
    print(f"config: batch {BATCH}, latents {CHANNELS}x{SIDE}x{SIDE} (patch {PATCH}: {(SIDE // PATCH) ** 2} image tokens), "
          f"{TEXT_TOKENS} text tokens of dim {TEXT_DIM}, pooled {POOLED_DIM}; float32, fwd+bwd, "
          f"{args.threads} thread(s), {args.rounds} round(s) x {args.steps} timed steps after {args.warmup} warm-up per model")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for r in range(args.rounds):
        for name in (models if r % 2 == 0 else models[::-1]):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--threads", str(args.threads),
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                raise SystemExit(f"{name} failed:\n{res.stderr}")
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
    rows = []
    for name, rs in runs.items():
        wall = [x for run in rs for x in run["wall_ms"]]
        cpu = [x for run in rs for x in run["cpu_ms"]]
        rows.append({"name": name, "params": rs[0]["params"], "ms_median": statistics.median(wall), "ms_min": min(wall),
                     "ms_max": max(wall), "cpu_median": statistics.median(cpu), "peak_mb": statistics.median(run["peak_mb"] for run in rs)})

    header = ("model", "params", "fwd+bwd ms/step (median)", "min..max ms", "CPU ms/step", "peak memory MB")
    lines = [(MODELS[r["name"]], f"{r['params'] / 1e6:.2f}M", f"{r['ms_median']:.0f}",
              f"{r['ms_min']:.0f}..{r['ms_max']:.0f}", f"{r['cpu_median']:.0f}", f"{r['peak_mb']:.0f}") for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"  # noqa: E731
    print(fmt(header))
    print("|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|")
    for line in lines:
        print(fmt(line))
    if skipped:
        print(f"skipped (diffusers not installed): {', '.join(skipped)}")
    by = {r["name"]: r for r in rows}
    if "mmdit_depth4" in by and "sd3_depth4" in by:
        a, b = by["mmdit_depth4"], by["sd3_depth4"]
        print(f"flowmatch / diffusers MM-DiT d4: wall time {a['ms_median'] / b['ms_median']:.2f}x, CPU time "
              f"{a['cpu_median'] / b['cpu_median']:.2f}x, peak memory {a['peak_mb'] / b['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
