"""Memory and step time of LoRA fine-tuning against full fine-tuning of the same model (issue 14).

Fixed config: an MM-DiT (depth DEPTH, hidden HIDDEN, QK-norm) started from a saved base checkpoint
(``init_weights``), batch BATCH of 16 x 16 x 16 latents (64 image tokens) with 32 text tokens of dim 384, rectified
flow with logit-normal times, AdamW, bf16 autocast on CPU (as the main job) or CUDA. One step = forward, backward,
optimizer step. Runs:

    full            every parameter trains (float32 weights, gradients, Adam moments)
    lora r16        LoRA rank 16 on the defaults (attention q/k/v and output projections), base float32
    lora r16 bf16   the same with the frozen base held in bfloat16 (frozen_dtype)
    lora r4 bf16    rank 4, base in bfloat16

Each run is a fresh subprocess. Columns: trainable parameters; bytes of parameters, of gradients and of the
optimizer state, counted from the tensors after the steps; peak memory (CUDA: max allocated; CPU: the process's
peak resident set size minus the one before the model was built); median step time over STEPS timed steps after
WARMUP. In each of ROUNDS rounds the runs go in alternating order, so that background load hits them alike.

    python benchmarks/lora_vs_full.py                       # table on stdout
    python benchmarks/lora_vs_full.py --depth 8 --hidden 512 --rounds 1 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = {
    "full": {},
    "lora r16": {"adapter": {"rank": 16}},
    "lora r16 bf16": {"adapter": {"rank": 16}, "frozen_dtype": "bfloat16"},
    "lora r4 bf16": {"adapter": {"rank": 4}, "frozen_dtype": "bfloat16"},
}
BATCH, LATENT, TOKENS, TEXT_DIM = 32, (16, 16, 16), 32, 384


def _network(depth: int, hidden: int):
    from flowmatch.networks.mmdit import MMDiT

    return MMDiT(depth=depth, hidden_size=hidden, num_heads=hidden // 64, in_channels=LATENT[0], pooled_dim=TEXT_DIM,
                 context_dim=TEXT_DIM, qk_norm=True, pos_embed_max_size=16)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def child(name: str, base: str, depth: int, hidden: int, steps: int, warmup: int, device: str) -> dict:
    """One run in this process: build, train ``warmup + steps`` steps, measure."""
    import torch

    from flowmatch.objectives import RectifiedFlow
    from flowmatch.time_samplers import LogitNormalTime

    dev = torch.device(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    model = RectifiedFlow(_network(depth, hidden), time_sampler=LogitNormalTime(), lr=1e-4, init_weights=base, **RUNS[name])
    model = model.to(dev)
    opt = model.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(BATCH, *LATENT, generator=g).to(dev)
    cond = {"pooled": torch.randn(BATCH, TEXT_DIM, generator=g).to(dev), "tokens": torch.randn(BATCH, TOKENS, TEXT_DIM, generator=g).to(dev)}
    times = []
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model.objective.training_loss(model.net, x0, cond).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    params = list(model.net.parameters())
    trainable = [p for p in params if p.requires_grad]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    return {
        "trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in params),
        "param_bytes": _bytes(params), "grad_bytes": _bytes(p.grad for p in trainable if p.grad is not None),
        "optimizer_bytes": sum(_bytes(v for v in s.values() if torch.is_tensor(v)) for s in opt.state.values()),
        "peak_bytes": int(peak), "step_s": statistics.median(times),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--base", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.base, args.depth, args.hidden, args.steps, args.warmup, args.device)))
        return 0

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base.ckpt")
        torch.manual_seed(0)
        net = _network(args.depth, args.hidden)
        with torch.no_grad():  # a trained-looking base: no zero gates (an adaLN-Zero init gives LoRA no gradient)
            for prm in net.parameters():
                prm.add_(torch.randn_like(prm) * 0.02)
        torch.save({"state_dict": {"net." + k: v for k, v in net.state_dict().items()}}, base)
        results: dict[str, list[dict]] = {name: [] for name in args.runs}
        for r in range(args.rounds):
            order = args.runs if r % 2 == 0 else args.runs[::-1]
            for name in order:
                cmd = [sys.executable, __file__, "--child", name, "--base", base, "--depth", str(args.depth), "--hidden",
                       str(args.hidden), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                       "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{args.rounds}: {name} {results[name][-1]['step_s'] * 1000:.0f} ms/step", file=sys.stderr)

    mb = lambda b: b / 2**20  # noqa: E731
    first = results[args.runs[0]][0]
    print(f"MM-DiT depth {args.depth}, hidden {args.hidden} ({first['total']:,} parameters), batch {BATCH}, latents "
          f"{'x'.join(map(str, LATENT))}, {TOKENS} text tokens, bf16 autocast, {args.device}, {args.threads} thread(s), "
          f"{args.rounds} round(s) x {args.steps} steps")
    header = f"{'run':<15} {'trainable':>12} {'params MB':>10} {'grads MB':>9} {'Adam MB':>8} {'peak MB':>8} {'ms/step':>8} {'vs full':>8}"
    print(header)
    print("-" * len(header))
    full_time = statistics.median(r["step_s"] for r in results[args.runs[0]])
    for name in args.runs:
        rs = results[name]
        step = statistics.median(r["step_s"] for r in rs)
        peak = statistics.median(r["peak_bytes"] for r in rs)
        r = rs[0]
        print(f"{name:<15} {r['trainable']:>12,} {mb(r['param_bytes']):>10.1f} {mb(r['grad_bytes']):>9.1f} "
              f"{mb(r['optimizer_bytes']):>8.2f} {mb(peak):>8.0f} {step * 1000:>8.0f} {step / full_time:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
