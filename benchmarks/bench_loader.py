"""Is the data loader ever the bottleneck? Samples per second of

  1. the streaming loader (LatentShardDataModule on the demo shards: tar reading, decoding, caption mixing,
     shuffling, batching; worker start-up included, as every epoch pays it),
  2. the same batches served from memory (a plain DataLoader over tensors: the ceiling of any loader),
  3. a training step of the main job's MM-DiT (experiments/mmdit_d16.yaml: depth 4, QK-norm, bf16 autocast;
     forward, backward, AdamW) consuming them,

and the ratio loader / model (goal: >= 10x). Run from the repository root:

    python benchmarks/bench_loader.py                      # writes data/demo first if it is missing
    python benchmarks/bench_loader.py --data data/demo --workers 0 1 2 --steps 40 --depth 4 --precision bf16
    python benchmarks/bench_loader.py --data data/demo_buckets --source demo_buckets   # aspect-ratio buckets

With buckets the loader keeps one buffer per latent shape and every batch holds one shape; the memory row then
serves the batches of the first batch's shape, the model row trains on every shape in turn.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.data import DataLoader, TensorDataset


def stream_rate(dm, steps: int, workers: int) -> float:
    loader = dm.dataloader("train", rank=0, world_size=1, num_workers=workers)
    loader.steps = steps
    start = time.perf_counter()
    n = 0
    for batch in loader:
        batch = dm.on_before_batch_transfer(batch, 0)
        n += batch["x0"].shape[0]
    return n / (time.perf_counter() - start)


def memory_rate(batches: list[dict], batch_size: int, repeats: int = 5) -> float:
    shape = batches[0]["x0"].shape[1:]
    batches = [b for b in batches if b["x0"].shape[1:] == shape]  # one shape (a bucketed set: the first batch's)
    x0 = torch.cat([b["x0"] for b in batches])
    cond = [torch.cat([b["cond"][k] for b in batches]) for k in ("pooled", "tokens", "mask")]
    loader = DataLoader(TensorDataset(x0, *cond), batch_size=batch_size, shuffle=True)
    start = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for x, pooled, tokens, mask in loader:
            batch = {"x0": x, "cond": {"pooled": pooled, "tokens": tokens, "mask": mask}}
            n += batch["x0"].shape[0]
    return n / (time.perf_counter() - start)


def model_rate(dm, batches: list[dict], depth: int, hidden: int | None, steps: int, bf16: bool) -> tuple[float, int]:
    from flowmatch.networks.mmdit import MMDiT
    from flowmatch.objectives.rectified_flow import RectifiedFlow

    torch.manual_seed(0)
    net = MMDiT(depth=depth, hidden_size=hidden, in_channels=dm.facts.num_channels, pooled_dim=dm.facts.pooled_dim, context_dim=dm.facts.context_dim,
                qk_norm=True, pos_embed_max_size=16)
    model = RectifiedFlow(net, sample_shape=dm.sample_shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step(batch):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # what precision: bf16-mixed does
            loss = model.training_step(batch, 0)
        loss.backward()
        opt.step()

    model.log = lambda *a, **k: None  # no trainer attached
    step(batches[0])  # warm-up
    start = time.perf_counter()
    n = 0
    for i in range(steps):
        batch = batches[i % len(batches)]
        step(batch)
        n += batch["x0"].shape[0]
    return n / (time.perf_counter() - start), sum(p.numel() for p in net.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo", help="shard folder (prepared from the demo if it has no manifest)")
    p.add_argument("--source", default="demo", help="what prepare writes into --data when it has no manifest (demo, demo_buckets)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="batches per loader measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to measure")
    p.add_argument("--depth", type=int, default=4, help="MM-DiT depth (hidden = 64 * depth unless --hidden); 4 = the main job's")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="the model step's precision (the main job: bf16 autocast)")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--model_steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=3, help="measure each row this often and keep the best (shared machines are noisy)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from flowmatch.data.shards import LatentShardDataModule

    dm = LatentShardDataModule(data_dir=args.data, prepare_source=args.source, batch_size=args.batch_size, num_workers=0)
    dm.prepare_data()  # writes the demo shards on first use
    loader = dm.dataloader("train", rank=0, world_size=1, num_workers=0)
    loader.steps = 10
    batches = [dm.on_before_batch_transfer(b, 0) for b in loader]
    names = [f"streaming loader, {w} worker{'s' if w != 1 else ''}" for w in args.workers] + ["same tensors from memory"]
    best = dict.fromkeys(names, 0.0)
    rate, params = 0.0, 0
    for _ in range(args.repeats):  # interleaved, so that every row sees the machine in a similar state
        for name, w in zip(names, args.workers):
            best[name] = max(best[name], stream_rate(dm, args.steps, w))
        best[names[-1]] = max(best[names[-1]], memory_rate(batches, args.batch_size))
        r, params = model_rate(dm, batches, args.depth, args.hidden, args.model_steps, args.precision == "bf16")
        rate = max(rate, r)
    model_name = f"MM-DiT depth {args.depth} ({params / 1e6:.1f}M params, {args.precision}) training step"
    rows = [(name, best[name]) for name in names] + [(model_name, rate)]

    c, h, w = dm.sample_shape
    shapes = ", ".join(f"{b['name']} ({c}x{b['latent_size'][0]}x{b['latent_size'][1]})" for b in dm.facts.buckets) or f"{c}x{h}x{w}"
    print(f"\nbatch {args.batch_size}, latents {shapes}, text {dm.facts.context_length} x {dm.facts.context_dim} tokens + pooled {dm.facts.pooled_dim}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores\n")
    width = max(len(r[0]) for r in rows)
    print(f"| {'what':<{width}} | samples/s | x model |")
    print(f"|{'-' * (width + 2)}|-----------|---------|")
    for name, r in rows:
        print(f"| {name:<{width}} | {r:9.0f} | {r / rate:7.1f} |")
    slowest = min(r for name, r in rows[: len(args.workers)])
    verdict = "never the bottleneck" if slowest >= 10 * rate else "TOO SLOW: below 10x the model"
    print(f"\nslowest streaming loader / model = {slowest / rate:.1f}x: {verdict}")
    try:
        print(f"load average while measuring: {os.getloadavg()[0]:.1f} (other jobs on the cores lower every row)")
    except OSError:
        pass


if __name__ == "__main__":
    main()
