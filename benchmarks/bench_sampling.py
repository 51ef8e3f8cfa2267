"""Sampling throughput of the main job's model: images per second at 25 Euler steps, batch 64, on CPU.

Measures the whole pipeline of `python -m flowmatch sample`: the ODE solve (with and without
classifier-free guidance, which runs the conditional and unconditional halves as one doubled batch),
in float32 and under bf16 autocast, and the decoding of the latents to images. The network is the
main job's (configs/model/mmdit_depth4.yaml) with random weights, or a trained checkpoint (--ckpt); the
speed does not depend on the weights. Run from the repository root:

    python benchmarks/bench_sampling.py
    python benchmarks/bench_sampling.py --ckpt runs/demo_digits/<run>/checkpoints/last.ckpt --batch 64 --steps 25
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def build_model(ckpt: str | None, network_config: str):
    from flowmatch.objectives import RectifiedFlow

    if ckpt:
        from flowmatch.objectives.loading import load_objective

        return load_objective(ckpt, map_location="cpu", weights="auto")
    from flowmatch.networks.mmdit import MMDiT

    cfg = yaml.safe_load(Path(network_config).read_text())
    torch.manual_seed(0)
    return RectifiedFlow(MMDiT(**cfg["init_args"]), sample_shape=[16, 8, 8]).eval()


def condition(batch: int, tokens: int, pooled_dim: int, context_dim: int) -> dict:
    """A text condition of the demo's shapes (the speed does not depend on its values)."""
    g = torch.Generator().manual_seed(0)
    return {"pooled": torch.randn(batch, pooled_dim, generator=g), "tokens": torch.randn(batch, tokens, context_dim, generator=g),
            "mask": torch.ones(batch, tokens, dtype=torch.bool)}


def rate(model, cond: dict, batch: int, steps: int, guidance: float, bf16: bool, repeats: int) -> tuple[float, int]:
    from flowmatch.autoencoders.space_to_depth import SpaceToDepth
    from flowmatch.sampling import SamplerConfig

    decoder = SpaceToDepth(4, 1)  # the demo's autoencoder (lossless space-to-depth 32x32 -> 16x8x8)
    config = SamplerConfig(solver="euler", steps=steps, guidance=guidance)
    best, nfe = 0.0, 0
    for r in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            x, nfe = model.generate(batch, config, cond=cond, seed=r)
        decoder.decode(x.float())
        seconds = time.perf_counter() - start
        if r:
            best = max(best, batch / seconds)
    return best, nfe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a trained checkpoint (default: the main job's network, random weights)")
    p.add_argument("--network", default=str(ROOT / "configs/model/mmdit_depth4.yaml"), help="network config when no --ckpt")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=1.5, help="the guided rows' scale (the main job evaluates 1.5; the speed does not depend on it)")
    p.add_argument("--tokens", type=int, default=32, help="text tokens (the demo: MiniLM, 32)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds per row (the best is kept: shared machines are noisy)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.ckpt, args.network)
    net = model.net
    cond = condition(args.batch, args.tokens, net.pooled_dim, net.context_dim)
    params = sum(q.numel() for q in net.parameters())
    print(f"\n{type(net).__name__} depth {net.depth}, hidden {net.hidden_size} ({params / 1e6:.1f}M params); batch {args.batch}, "
          f"{args.steps} Euler steps, latents {'x'.join(map(str, model.sample_shape))} -> 32x32 images; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores\n")
    print("| precision | guidance | NFE | images/s | s per batch |")
    print("|-----------|----------|-----|----------|-------------|")
    for bf16 in (False, True):
        for guidance in (1.0, args.guidance):
            r, nfe = rate(model, cond, args.batch, args.steps, guidance, bf16, args.repeats)
            print(f"| {'bf16' if bf16 else 'fp32':<9} | {guidance:>8g} | {nfe:>3} | {r:8.1f} | {args.batch / r:11.2f} |")
    try:
        print(f"\nload average while measuring: {os.getloadavg()[0]:.1f} (other jobs on the cores lower every row)")
    except OSError:
        pass


if __name__ == "__main__":
    main()
