"""GPU training throughput of an SD3-size MM-DiT and a FLUX-size block stack: step time, images/s, TFLOP/s, MFU.

Goal: >= 45% MFU (model FLOPs utilisation) on one H100 for the SD3-size MM-DiT, bf16.
Status: UNMEASURED on a GPU. Written and checked on CPU only (--dry-run, tests/test_bench_gpu.py); no GPU numbers exist yet.

Run on a machine with a CUDA GPU, from the repository root (one full run stays within --budget_s, 8 minutes):

    python benchmarks/bench_gpu.py                                    # both models, every config, table on stdout
    python benchmarks/bench_gpu.py --json gpu_bench.json              # ... and every number as JSON
    python benchmarks/bench_gpu.py --models mmdit --compile on --checkpointing off --max_batch 16
    python benchmarks/bench_gpu.py --flux_depth 4 8 --precision bf16  # a deeper FLUX stack, bf16 weights
    python benchmarks/bench_gpu.py --peak_tflops 989                  # a card missing from the table of peaks
    python benchmarks/bench_gpu.py --dry-run                          # no GPU: the same code path on CPU, tiny sizes

Without a CUDA device the script runs the dry run by itself: the same code on CPU at a tiny size (MM-DiT depth 2
and FLUX 1 + 2 blocks, hidden 64, 64 image tokens, 8 text tokens, batch 1 and 2, float32, compile off), with MFU
against a measured CPU matmul rate. It checks the path; its numbers mean nothing for a GPU.

Models (the platform's own networks, flowmatch.networks; random weights, conditioning dropout off):
    mmdit  MMDiT, SD3-medium-like: depth 24, hidden 64 * 24 = 1536, 24 heads (head dim 64), MLP ratio 4, no QK-norm;
           latents 16 x 128 x 128 (a 1024 px image), patch 2 -> 64 x 64 = 4096 image tokens; 154 text tokens
           (SD3's 77 CLIP + 77 T5) of dim 4096 in cond["tokens"], a pooled vector of dim 2048 in cond["pooled"]
    flux   FLUX at FLUX.1-dev's width: hidden 3072, 24 heads (head dim 128), guidance embedding; 4096 image tokens,
           512 T5 tokens of dim 4096, pooled 768; --flux_depth D S double- + single-stream blocks (default 2 4).
           FLUX.1's 19 + 38 blocks (11.9B parameters) do not fit a training step on one 80 GB card without
           sharding (FSDP / ZeRO-3) or offload: fp32 weights + grads + AdamW moments are 16 bytes a parameter
           (190 GB; 95 GB even all in bf16). The reduced stack runs the full width and sequence, so its per-block
           throughput and MFU are FLUX's; the script prints this arithmetic.
No text mask is passed, so flash attention is eligible.

One training step: zero grads; forward under bf16 autocast (--precision autocast, the default: fp32 weights,
grads and AdamW states, bf16 matmuls and attention; --precision bf16: weights, grads and AdamW states in bf16, no
fp32 master copy; fp32: no bf16 at all); loss = mean((out - target)^2) in float32; backward; AdamW step (fused on CUDA).

Swept, per model (each config builds a fresh network):
    compile         off / on: torch.compile of every block in place (nn.Module.compile, "regional" compilation;
                    identical blocks share one compiled graph, so only each kind of block is compiled, not the
                    whole network; --compile_backend, default inductor, e.g. aot_eager to check the path on CPU)
    checkpointing   off / on: the networks' gradient_checkpointing flag (every block's activations are recomputed
                    in the backward pass)
    batch           1, 2, 4, 8, ... up to --max_batch (default 64); a CUDA out-of-memory error (torch.cuda.OutOfMemoryError)
                    frees the memory, records "OOM" and ends that config's sweep
SDPA flash backend: before the sweep, a small copy of each network (the same head dim and dtype) runs a training
step under torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION). If that works, every timed step runs under
the same context, where no other attention kernel may run: flash is then confirmed used. If not, the steps run
with PyTorch's default choice and the header says why ("n/a" on CPU).
Timing: per batch size, --warmup (2) discarded steps (compilation happens there), then --steps (3) timed steps, each
between torch.cuda.synchronize() calls; the median. Budget: --budget_s for the whole run; each remaining config
gets an equal share of what is left; a batch size (or a whole config) whose estimated time exceeds its share
is skipped, and the skipped ones are listed. A measurement once started is finished.

Columns:
    model       the network and its parameter count
    compile     torch.compile of the blocks, on / off
    ckpt        activation checkpointing, on / off
    batch       images per training step
    step ms     median wall time of one training step (forward + backward + AdamW), or OOM / skipped
    img/s       batch / step time
    TFLOP/s     model FLOPs of the step (3 x forward, formula below) / step time
    MFU         TFLOP/s / the card's bf16 dense peak (KNOWN_PEAKS by device name, or --peak_tflops; for an
                unknown card or on CPU, the measured matmul rate); the header says which
    % matmul    TFLOP/s / the measured rate of a large matmul (8192^3 bf16 on GPU; 1024^3 on CPU), a reachable ceiling
    mem GB      torch.cuda.max_memory_allocated over the batch size's steps ("-" on CPU)

FLOP count (forward_flops; forward pass, per image; a multiply-add = 2 FLOPs):
    D hidden width, M = mlp_ratio * D (= 4 D), N image tokens, L text tokens, S = N + L joint sequence,
    P = patch^2 * latent channels (values per token), C_txt / C_pool text token / pooled vector dims, F = 256
    per token and block: q, k, v projections 6 D^2 + output projection 2 D^2 + MLP 4 D M   (= 24 D^2 at M = 4 D)
    per block, attention over the joint sequence: scores Q K^T 2 S^2 D + values A V 2 S^2 D = 4 S^2 D
        (summed over heads: heads * head dim = D)
    per block, adaLN modulation (once per image, from the conditioning vector): 2 D * (chunks * D)
    MM-DiT block (image and text stream, each with its own weights, joint attention):
        S (8 D^2 + 4 D M) + 4 S^2 D + 2 * 12 D^2
    MM-DiT last block (the text stream is "pre-only": k and v of the text tokens, queries from the image only):
        N (8 D^2 + 4 D M) + 4 D^2 L + 4 N S D + 12 D^2 + 4 D^2
    FLUX double block: the MM-DiT block (its QK-RMSNorm and RoPE add no matmuls)
    FLUX single block on [text; image]: linear1 2 D (3 D + M) + linear2 2 (D + M) D = 8 D^2 + 4 D M per token,
        so S (8 D^2 + 4 D M) + 4 S^2 D + 6 D^2
    outside the blocks: patch embedding 2 N P D, text embedding 2 L C_txt D, timestep MLP 2 F D + 2 D^2 (FLUX-dev's
        guidance MLP the same again), pooled MLP 2 C_pool D + 2 D^2, final layer 4 D^2 + 2 N D P
    training step = 3 x forward (backward: gradients of the activations and of the weights, 2 x forward; autograd
        skips the input gradient of the first layer of each input, under 0.1% at these sizes)
    Not counted, as usual for MFU: normalisations, activations, softmax, RoPE, modulation arithmetic, biases,
    residual adds and the optimizer; nor the forward that activation checkpointing recomputes (MFU counts model
    FLOPs, so checkpointing costs MFU: the hardware then does ~4 x forward).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without an installed flowmatch
    sys.path.insert(0, str(ROOT))

GOAL_MFU = 0.45
#: bf16 dense (no sparsity) peak TFLOP/s by device name: the first entry whose words all occur in
#: torch.cuda.get_device_name() (lower case) wins, so the more specific names come first
KNOWN_PEAKS = (
    (("h100", "pcie"), 756.0),
    (("h100", "nvl"), 835.0),
    (("h100",), 989.0),  # H100 SXM5, named e.g. "NVIDIA H100 80GB HBM3"
    (("h200",), 989.0),
    (("a100",), 312.0),
    (("l40s",), 362.0),
)
FLUX_FULL = (19, 38)
PRECISIONS = {
    "autocast": "bf16 autocast (torch.autocast): fp32 weights, grads and AdamW states; bf16 matmuls and attention",
    "bf16": "bf16 weights: weights, grads and AdamW states in bf16 (no fp32 master copy)",
    "fp32": "float32 throughout (no bf16)",
}
FREQ_DIM = 256  # the timestep (and guidance) sinusoid, flowmatch.networks.layers.TimestepEmbedder


# ---- architectures and their FLOPs --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arch:
    """One benchmarked network: its sizes and its inputs (kind "mmdit": ``depth`` blocks; "flux": ``double`` + ``single``)."""

    kind: str
    hidden: int
    heads: int
    depth: int = 0
    double: int = 0
    single: int = 0
    mlp_ratio: float = 4.0
    channels: int = 16
    patch: int = 2
    side: int = 128  # latent height = width
    text_tokens: int = 154
    context_dim: int = 4096
    pooled_dim: int = 2048
    guidance: bool = False

    @property
    def image_tokens(self) -> int:
        return (self.side // self.patch) ** 2

    @property
    def label(self) -> str:
        if self.kind == "mmdit":
            return f"MM-DiT d{self.depth} (h{self.hidden})"
        return f"FLUX {self.double}+{self.single} blocks (h{self.hidden})"

    def network_class(self):
        if self.kind == "mmdit":
            from flowmatch.networks.mmdit import MMDiT

            return MMDiT
        from flowmatch.networks.flux import FLUX

        return FLUX

    def network_kwargs(self) -> dict:
        """Constructor arguments of flowmatch.networks.mmdit.MMDiT / flowmatch.networks.flux.FLUX."""
        common = dict(hidden_size=self.hidden, num_heads=self.heads, in_channels=self.channels, patch_size=self.patch,
                      pooled_dim=self.pooled_dim, context_dim=self.context_dim, mlp_ratio=self.mlp_ratio, cond_drop_prob=0.0)
        if self.kind == "mmdit":
            return dict(common, depth=self.depth, pos_embed_max_size=self.side // self.patch)
        return dict(common, num_double_blocks=self.double, num_single_blocks=self.single, guidance_embed=self.guidance)


def mmdit_arch(dry: bool) -> Arch:
    """SD3-medium-like MM-DiT (depth 24, 4096 + 154 tokens); tiny in the dry run."""
    if dry:
        return Arch("mmdit", hidden=64, heads=2, depth=2, side=16, text_tokens=8, context_dim=32, pooled_dim=32)
    return Arch("mmdit", hidden=64 * 24, heads=24, depth=24, side=128, text_tokens=77 + 77, context_dim=4096, pooled_dim=2048)


def flux_arch(dry: bool, depth: tuple[int, int] | None) -> Arch:
    """FLUX.1-dev's width and sequence (4096 + 512 tokens) with ``depth`` = (double, single) blocks; tiny in the dry run."""
    if dry:
        double, single = depth or (1, 2)
        return Arch("flux", hidden=64, heads=2, double=double, single=single, side=16, text_tokens=8, context_dim=32,
                    pooled_dim=32, guidance=True)
    double, single = depth or (2, 4)
    return Arch("flux", hidden=3072, heads=24, double=double, single=single, side=128, text_tokens=512, context_dim=4096,
                pooled_dim=768, guidance=True)


def forward_flops(arch: Arch) -> dict[str, int]:
    """FLOPs of one image's forward pass by term (the formula in the module docstring): "linear" (token-wise
    projections and MLPs of the blocks), "attention" (Q K^T and A V), "adaln" (the blocks' modulation), "outside"
    (embeddings and final layer)."""
    d, m = arch.hidden, int(arch.hidden * arch.mlp_ratio)
    n, L = arch.image_tokens, arch.text_tokens
    s = n + L
    p = arch.patch**2 * arch.channels
    per_token = 8 * d * d + 4 * d * m  # q, k, v 6 D^2 + proj 2 D^2 + MLP 4 D M
    if arch.kind == "mmdit":
        full = arch.depth - 1  # the last block's text stream is pre-only
        linear = full * s * per_token + n * per_token + L * 4 * d * d
        attention = full * 4 * s * s * d + 4 * n * s * d
        adaln = full * 2 * 12 * d * d + (12 + 4) * d * d
    else:
        blocks = arch.double + arch.single
        linear = blocks * s * per_token
        attention = blocks * 4 * s * s * d
        adaln = arch.double * 2 * 12 * d * d + arch.single * 6 * d * d
    embedders = (2 if arch.guidance else 1) * (2 * FREQ_DIM * d + 2 * d * d) + 2 * arch.pooled_dim * d + 2 * d * d
    outside = 2 * n * p * d + 2 * L * arch.context_dim * d + embedders + 4 * d * d + 2 * n * d * p
    return {"linear": linear, "attention": attention, "adaln": adaln, "outside": outside}


def train_flops(arch: Arch, batch: int) -> int:
    """Model FLOPs of one training step: 3 x forward, per image, times the batch."""
    return 3 * batch * sum(forward_flops(arch).values())


def param_count(arch: Arch) -> int:
    """Parameters of the network (built on the meta device: nothing is allocated)."""
    from flowmatch.networks.layers import count_parameters

    return count_parameters(arch.network_class(), **arch.network_kwargs())


# ---- the device: peaks, matmul rate, flash attention -------------------------------------------------------------
def known_peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a card from KNOWN_PEAKS, or None."""
    name = device_name.lower()
    for words, peak in KNOWN_PEAKS:
        if all(w in name for w in words):
            return peak
    return None


def human(n: float) -> str:
    """2.03B, 301.4M."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int | None = None,
                          rounds: int = 3) -> float:
    """The best of ``rounds`` rates (TFLOP/s) of ``reps`` back-to-back (n x n) @ (n x n) matmuls."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    reps = reps or (20 if cuda else 3)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e12)
    return best


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for the forward pass under --precision autocast, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()


def attention_context(flash: bool):
    """SDPA restricted to its flash backend if ``flash``, else PyTorch's choice. It spans forward and backward: the
    forward that activation checkpointing recomputes in the backward pass must pick the same kernel."""
    if not flash:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def probe_flash(arch: Arch, device: torch.device, precision: str) -> tuple[bool | None, str]:
    """Whether the network's attention runs on SDPA's flash backend: a training step of a small copy (same heads,
    head dim and dtype; 2 blocks, 64 image tokens) under sdpa_kernel(FLASH_ATTENTION), where only flash may run.
    (None, "n/a ...") on CPU."""
    if device.type != "cuda":
        return None, "n/a (CPU)"
    small = dataclasses.replace(arch, depth=min(arch.depth, 2), double=min(arch.double, 1), single=min(arch.single, 1),
                                side=8 * arch.patch, text_tokens=min(arch.text_tokens, 16))
    try:
        net = build_network(small, device, precision, checkpointing=False)
        z, t, cond, target = make_inputs(small, 1, device)
        with attention_context(flash=True):
            with autocast_context(device, precision):
                out = net(z, t, cond)
            (out.float() - target).square().mean().backward()
        _sync(device)
        return True, "used: every timed step runs under sdpa_kernel(FLASH_ATTENTION), where no other kernel may run"
    except Exception as exc:  # noqa: BLE001 (whatever keeps flash from running: report it, time without it)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"NOT available ({first[:160]}); the steps use PyTorch's default SDPA backend"
    finally:
        free_memory(device)


# ---- one training step and its timing ------------------------------------------------------------------------------
def build_network(arch: Arch, device: torch.device, precision: str, checkpointing: bool) -> torch.nn.Module:
    """The platform's network at ``arch``'s sizes, built directly on ``device``, in train mode."""
    torch.manual_seed(0)
    with torch.device(device):
        net = arch.network_class()(**arch.network_kwargs(), gradient_checkpointing=checkpointing)
    if precision == "bf16":
        net = net.to(torch.bfloat16)
    return net.train()


def compile_blocks(net: torch.nn.Module, backend: str = "inductor") -> None:
    """Regional compilation: every block compiled in place (its class is kept, which FLUX.run_block relies on)."""
    cfg = torch._dynamo.config  # identical blocks share a graph; a pre-only last block and a new batch size add some
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # (the older name)
    setattr(cfg, name, max(getattr(cfg, name), 64))
    for block in net.blocks:
        block.compile(backend=backend)


def make_inputs(arch: Arch, batch: int, device: torch.device, seed: int = 0):
    """(z, t, cond, target) for one step: latents, times, the cond dict the network reads (tokens, pooled and, for
    FLUX-dev, guidance; no mask) and a regression target, float32."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(batch, arch.channels, arch.side, arch.side, device=device, generator=g)
    t = torch.rand(batch, device=device, generator=g)
    cond = {"tokens": torch.randn(batch, arch.text_tokens, arch.context_dim, device=device, generator=g),
            "pooled": torch.randn(batch, arch.pooled_dim, device=device, generator=g)}
    if arch.guidance:
        cond["guidance"] = torch.full((batch,), 3.5, device=device)
    target = torch.randn(z.shape, device=device, generator=g)
    return z, t, cond, target


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, inputs, device: torch.device, precision: str,
               flash: bool) -> None:
    """Zero grads, forward (autocast / flash per the context), float32 MSE loss, backward, AdamW step."""
    z, t, cond, target = inputs
    opt.zero_grad(set_to_none=True)
    with attention_context(flash):
        with autocast_context(device, precision):
            out = net(z, t, cond)
        (out.float() - target).square().mean().backward()
    opt.step()


def time_steps(net, opt, inputs, device: torch.device, precision: str, flash: bool, warmup: int, steps: int) -> list[float]:
    """Wall seconds of each of ``steps`` training steps after ``warmup`` discarded ones, synchronised per step."""
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        train_step(net, opt, inputs, device, precision, flash)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def describe_failure(exc: BaseException) -> str:
    """"OOM" for an out-of-memory error, else "error: ..." (the traceback goes to stderr)."""
    if is_oom(exc):
        return "OOM"
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return f"error: {type(exc).__name__}: {str(exc).strip()[:120]}"


# ---- the sweep -------------------------------------------------------------------------------------------------------
def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch."""
    return [2**i for i in range(int(math.log2(max_batch)) + 1)] if max_batch >= 1 else []


def run_config(arch: Arch, compiled: bool, checkpointing: bool, batches: list[int], share_s: float, opts, hint_s: float | None) -> list[dict]:
    """One (model, compile, checkpointing) config: a fresh network, batch sizes upward until OOM, the end of
    ``batches`` or of its time share. ``hint_s``: a step time of this model at batch 1 from an earlier config
    (estimates the first measurement). One row per batch size: status "ok", "OOM", "skipped (budget)" or "error: ..."."""
    device, start = opts.device, time.perf_counter()
    base = {"model": arch.kind, "label": arch.label, "compile": compiled, "checkpointing": checkpointing}
    rows: list[dict] = []

    def skip_rest(i: int) -> list[dict]:
        return rows + [dict(base, batch=b, status="skipped (budget)") for b in batches[i:]]

    per_batch = opts.warmup + opts.steps
    if share_s <= 0 or (hint_s is not None and hint_s * per_batch * (4 / 3 if checkpointing else 1) > share_s):
        return skip_rest(0)
    if compiled:
        torch._dynamo.reset()
    net = opt = None
    status = "ok"
    try:
        net = build_network(arch, device, opts.precision, checkpointing)
        if compiled:
            compile_blocks(net, opts.compile_backend)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    except Exception as exc:  # noqa: BLE001 (an OOM or a failure ends this config, not the run)
        status = describe_failure(exc)
    if status != "ok":
        net = opt = None
        free_memory(device)
        return rows + [dict(base, batch=batches[0], status=status)]

    last: tuple[int, float] | None = None  # (batch, step seconds) of the previous batch size
    for i, b in enumerate(batches):
        elapsed = time.perf_counter() - start
        estimate = last[1] * b / last[0] * per_batch if last else 0.0
        if last and elapsed + estimate > share_s:
            rows = skip_rest(i)
            break
        inputs = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            inputs = make_inputs(arch, b, device)
            times = time_steps(net, opt, inputs, device, opts.precision, opts.flash.get(arch.kind, False),
                               opts.warmup, opts.steps)
            status = "ok"
        except Exception as exc:  # noqa: BLE001
            status = describe_failure(exc)
        if status != "ok":
            inputs = None
            opt.zero_grad(set_to_none=True)
            free_memory(device)
            rows.append(dict(base, batch=b, status=status))
            break
        step_s = statistics.median(times)
        tflops = train_flops(arch, b) / step_s / 1e12
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append(dict(base, batch=b, status="ok", step_ms=1000 * step_s, step_ms_all=[1000 * x for x in times],
                         images_per_s=b / step_s, tflops=tflops, mfu=tflops / opts.peak_tflops,
                         matmul_fraction=tflops / opts.matmul_tflops, memory_gb=mem))
        last = (b, step_s)
    net = opt = inputs = None
    if compiled:
        torch._dynamo.reset()
    free_memory(device)
    return rows


def run_all(archs: list[Arch], compiles: list[bool], ckpts: list[bool], batches: list[int], opts) -> list[dict]:
    """Every config of every model within opts.budget_s: each remaining config gets an equal share of the time left."""
    configs = [(a, c, k) for a in archs for c in compiles for k in ckpts]
    rows: list[dict] = []
    hints: dict[str, float] = {}
    for i, (arch, compiled, ckpt) in enumerate(configs):
        left = opts.deadline - time.perf_counter()
        share = left / (len(configs) - i)
        got = run_config(arch, compiled, ckpt, batches, share, opts, hints.get(arch.kind))
        for r in got:
            if r["status"] == "ok" and r["batch"] == 1 and not r["compile"]:
                hints.setdefault(arch.kind, r["step_ms"] / 1000)
        rows += got
    return rows


# ---- output --------------------------------------------------------------------------------------------------------
def format_table(rows: list[dict], params: dict[str, int]) -> list[str]:
    """The markdown table of the rows (numbers of the rows whose status is not "ok" shown as "-")."""
    header = ("model", "compile", "ckpt", "batch", "step ms", "img/s", "TFLOP/s", "MFU", "% matmul", "mem GB")
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        num = lambda key, fmt: (fmt.format(r[key]) if ok and r.get(key) is not None else "-")  # noqa: E731
        lines.append((f"{r['label']}, {human(params[r['model']])}", "on" if r["compile"] else "off",
                      "on" if r["checkpointing"] else "off", str(r["batch"]),
                      f"{r['step_ms']:.1f}" if ok else r["status"].split(":")[0], num("images_per_s", "{:.2f}"), num("tflops", "{:.4g}"),
                      f"{100 * r['mfu']:.1f}%" if ok else "-", f"{100 * r['matmul_fraction']:.1f}%" if ok else "-",
                      num("memory_gb", "{:.1f}")))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"  # noqa: E731
    out = [fmt(header), "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"]
    return out + [fmt(line) for line in lines]


def flux_note(arch: Arch, precision: str) -> str | None:
    """Why the FLUX row runs fewer blocks than FLUX.1 (memory arithmetic of the full model)."""
    if arch.kind != "flux" or (arch.double, arch.single) == FLUX_FULL or arch.hidden != 3072:
        return None
    full = param_count(dataclasses.replace(arch, double=FLUX_FULL[0], single=FLUX_FULL[1]))
    per = 8 if precision == "bf16" else 16
    return (f"FLUX.1 has {FLUX_FULL[0]} + {FLUX_FULL[1]} blocks ({full / 1e9:.1f}B parameters): weights + grads + AdamW "
            f"moments take {per} bytes a parameter under --precision {precision} = {full * per / 1e9:.0f} GB before any "
            f"activation, so its training step does not fit one 80 GB card without sharding (FSDP / ZeRO-3) or offload. "
            f"This row runs {arch.double} + {arch.single} blocks at FLUX.1's width and sequence (--flux_depth D S to change).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="tiny sizes on CPU (automatic when no CUDA device is visible)")
    p.add_argument("--models", nargs="+", choices=["mmdit", "flux"], default=["mmdit", "flux"])
    p.add_argument("--flux_depth", nargs=2, type=int, metavar=("D", "S"), help="FLUX double and single blocks (default 2 4; dry run 1 2)")
    p.add_argument("--precision", choices=list(PRECISIONS), help="default autocast (dry run: fp32)")
    p.add_argument("--compile", choices=["off", "on", "both"], help="torch.compile of the blocks (default both; dry run off)")
    p.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend (default inductor; aot_eager checks the compiled path quickly on CPU)")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="both", help="activation checkpointing")
    p.add_argument("--max_batch", type=int, help="largest batch of the sweep 1, 2, 4, ... (default 64; dry run 2)")
    p.add_argument("--warmup", type=int, help="discarded steps per batch size (default 2; dry run 1)")
    p.add_argument("--steps", type=int, help="timed steps per batch size (default 3; dry run 2)")
    p.add_argument("--budget_s", type=float, default=480.0, help="time for the whole run; what does not fit is skipped (default 480)")
    p.add_argument("--peak_tflops", type=float, help="the card's bf16 dense peak (default: KNOWN_PEAKS by device name)")
    p.add_argument("--threads", type=int, help="torch CPU threads (dry run; default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    args = p.parse_args(argv)
    for name, value in (("max_batch", args.max_batch), ("warmup", args.warmup), ("steps", args.steps)):
        if value is not None and value < (1 if name != "warmup" else 0):
            p.error(f"--{name} must be positive, got {value}")
    if args.flux_depth and (min(args.flux_depth) < 0 or sum(args.flux_depth) == 0):
        p.error(f"--flux_depth needs at least one block, got {args.flux_depth}")
    return args


def main(argv: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    dry = not cuda
    device = torch.device("cuda") if cuda else torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("fp32" if dry else "autocast")
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("off" if dry else "both")]
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    batches = batch_sizes(args.max_batch or (2 if dry else 64))
    archs = [mmdit_arch(dry) if m == "mmdit" else flux_arch(dry, tuple(args.flux_depth) if args.flux_depth else None)
             for m in args.models]
    params = {a.kind: param_count(a) for a in archs}

    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} thread(s))"
    matmul_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    matmul = measure_matmul_tflops(device, matmul_dtype)
    spec = args.peak_tflops or (known_peak_tflops(device_name) if cuda else None)
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops, "--peak_tflops"
    elif spec:
        peak, peak_source = spec, f"bf16 dense peak of {device_name} (KNOWN_PEAKS)"
    else:
        peak, peak_source = matmul, ("measured matmul rate (card not in KNOWN_PEAKS; pass --peak_tflops)" if cuda
                                     else "measured CPU matmul rate (dry run)")
    flash = {a.kind: probe_flash(a, device, precision) for a in archs}

    opts = argparse.Namespace(device=device, precision=precision, warmup=args.warmup if args.warmup is not None else (1 if dry else 2),
                              steps=args.steps or (2 if dry else 3), peak_tflops=peak, matmul_tflops=matmul,
                              flash={k: bool(v[0]) for k, v in flash.items()},
                              compile_backend=args.compile_backend, deadline=t0 + args.budget_s)

    why = "--dry-run" if args.dry_run else "no CUDA device visible"
    print(f"# GPU training throughput{f' -- CPU DRY RUN ({why}; tiny sizes: checks the path, measures no GPU)' if dry else ''}")
    print(f"goal: >= {100 * GOAL_MFU:.0f}% MFU on an H100 (SD3-size MM-DiT, bf16)")
    print(f"device: {device_name}; torch {torch.__version__}; precision: {PRECISIONS[precision]}")
    print(f"MFU against {peak:.4g} TFLOP/s: {peak_source}; measured {'bf16' if matmul_dtype == torch.bfloat16 else 'fp32'} "
          f"matmul rate {matmul:.4g} TFLOP/s ('% matmul')")
    for a in archs:
        terms = forward_flops(a)
        print(f"{a.label}: {human(params[a.kind])} parameters, {a.image_tokens} image + {a.text_tokens} text tokens, "
              f"head dim {a.hidden // a.heads}; training FLOPs per image {3 * sum(terms.values()) / 1e12:.4g} T "
              f"(3 x forward; forward: linear {terms['linear'] / 1e9:.4g} G, attention {terms['attention'] / 1e9:.4g} G, "
              f"adaLN {terms['adaln'] / 1e9:.4g} G, embeddings {terms['outside'] / 1e9:.4g} G)")
        print(f"  SDPA flash backend: {flash[a.kind][1]}")
        note = flux_note(a, precision)
        if note:
            print(f"  {note}")
    print(f"sweep: compile {'/'.join('on' if c else 'off' for c in compiles)}"
          f"{f' (backend {args.compile_backend})' if True in compiles else ''}, checkpointing "
          f"{'/'.join('on' if c else 'off' for c in ckpts)}, batch {', '.join(map(str, batches))} (until OOM); "
          f"{opts.warmup} warm-up + {opts.steps} timed steps per batch (median); budget {args.budget_s:.0f} s")
    print()
    sys.stdout.flush()

    rows = run_all(archs, compiles, ckpts, batches, opts)
    for line in format_table(rows, params):
        print(line)
    skipped = [r for r in rows if r["status"].startswith("skipped")]
    if skipped:
        groups: dict[tuple, list[int]] = {}
        for r in skipped:
            groups.setdefault((r["label"], r["compile"], r["checkpointing"]), []).append(r["batch"])
        print("skipped (out of --budget_s): " + "; ".join(
            f"{label} compile {'on' if c else 'off'} ckpt {'on' if k else 'off'} batch {', '.join(map(str, bs))}"
            for (label, c, k), bs in groups.items()))
    for r in rows:
        if r["status"].startswith("error"):
            print(f"{r['label']} compile {'on' if r['compile'] else 'off'} ckpt {'on' if r['checkpointing'] else 'off'} "
                  f"batch {r['batch']}: {r['status']} (traceback on stderr)")
    ok = [r for r in rows if r["status"] == "ok"]
    for a in archs:
        best = max((r for r in ok if r["model"] == a.kind), key=lambda r: r["mfu"], default=None)
        if best:
            verdict = ("meets" if best["mfu"] >= GOAL_MFU else "below") if cuda else "dry run, no verdict"
            print(f"best {a.label}: {100 * best['mfu']:.1f}% MFU ({best['images_per_s']:.2f} img/s, batch {best['batch']}, "
                  f"compile {'on' if best['compile'] else 'off'}, ckpt {'on' if best['checkpointing'] else 'off'}) -- "
                  f"goal {100 * GOAL_MFU:.0f}%: {verdict}")
    elapsed = time.perf_counter() - t0
    print(f"total time {elapsed:.0f} s")
    result = {"device": device_name, "dry_run": dry, "torch": torch.__version__, "precision": precision,
              "precision_note": PRECISIONS[precision], "peak_tflops": peak, "peak_source": peak_source,
              "matmul_tflops": matmul, "goal_mfu": GOAL_MFU,
              "flash": {k: {"used": v[0], "note": v[1]} for k, v in flash.items()},
              "models": {a.kind: {"label": a.label, "arch": dataclasses.asdict(a), "params": params[a.kind],
                                  "forward_flops_per_image": forward_flops(a), "note": flux_note(a, precision)} for a in archs},
              "rows": rows, "budget_s": args.budget_s, "elapsed_s": elapsed}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
