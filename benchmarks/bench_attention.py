"""Attention forward + backward on CPU: PyTorch's SDPA against the explicit matmul -> softmax -> matmul form.

Why it exists: on CPU the fused SDPA kernel is slow for short sequences in bf16 (the main job's joint
attention has 48 tokens), so ``flowmatch.networks.layers.attention`` computes short half-precision
sequences explicitly. This table is where its threshold (EXPLICIT_ATTENTION_MAX_KEYS) comes from.

Each row: heads (batch, heads, tokens, head dim) holding about the main job's 64 x 48 tokens, a random
key mask, forward + backward of sum(out); the median of STEPS timed calls after WARMUP.

    python benchmarks/bench_attention.py                 # bf16 and fp32, 48 .. 1024 tokens
    python benchmarks/bench_attention.py --threads 1 --tokens 48 333
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from flowmatch.networks.layers import EXPLICIT_ATTENTION_MAX_KEYS, explicit_attention

WARMUP, STEPS = 2, 7
TOKENS_PER_BATCH = 64 * 48  # the main job's batch: 64 samples of 16 image + 32 text tokens


def time_call(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def row(tokens: int, heads: int, head_dim: int, dtype: torch.dtype, warmup: int, steps: int) -> dict:
    batch = max(1, TOKENS_PER_BATCH // tokens)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g).to(dtype).requires_grad_() for _ in range(3))
    mask = torch.rand(batch, 1, 1, tokens, generator=g) > 0.3
    mask[..., -1] = True

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    def explicit():
        explicit_attention(q, k, v, mask).sum().backward()

    ms_sdpa, ms_explicit = time_call(sdpa, warmup, steps), time_call(explicit, warmup, steps)
    return {"shape": f"{batch} x {heads} x {tokens} x {head_dim}", "dtype": str(dtype).replace("torch.", ""),
            "sdpa": ms_sdpa, "explicit": ms_explicit}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[48, 96, 160, 256, 333, 1024])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"attention forward + backward on CPU, {args.threads} thread(s), median of {args.steps} calls after {args.warmup} warm-up; "
          f"the platform uses the explicit form for bf16/fp16 up to {EXPLICIT_ATTENTION_MAX_KEYS} keys")
    print("| heads (B x H x S x Dh) | dtype | SDPA ms | explicit ms | explicit / SDPA |")
    print("|---|---|---:|---:|---:|")
    for name in args.dtypes:
        for tokens in args.tokens:
            r = row(tokens, args.heads, args.head_dim, getattr(torch, name), args.warmup, args.steps)
            print(f"| {r['shape']} | {r['dtype']} | {r['sdpa']:.1f} | {r['explicit']:.1f} | {r['explicit'] / r['sdpa']:.2f}x |")


if __name__ == "__main__":
    main()
