"""`python -m flowmatch sample`: draw samples from a trained checkpoint with any solver.

Writes OUT/samples.npy (float32, shape (num, *sample_shape)), OUT/samples.json (settings, NFE,
seconds) and a picture: OUT/samples.png (a scatter plot for 2-D data, an image grid for images).
"""

import json
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from flowmatch.sampling import SOLVERS, SamplerConfig
from flowmatch.sampling.time_grid import GRID_KINDS


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch sample", description=__doc__, exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    p.add_argument("--ckpt", type=str, required=True, help="checkpoint written by `python -m flowmatch fit` (or import-sd3)")
    p.add_argument("--out", type=str, default="samples", help="output directory (created if missing)")
    p.add_argument("--num", type=int, default=2000, help="number of samples")
    p.add_argument("--solver", type=str, default="euler", help=f"ODE solver: one of {', '.join(SOLVERS)}")
    p.add_argument("--steps", type=int, default=25, help="solver steps (ignored by the adaptive dopri5)")
    p.add_argument("--shift", type=float, default=1.0, help="SD3 resolution shift alpha of the time grid (1 = none; SD3 uses 3 at 1024^2)")
    p.add_argument("--grid", type=str, default="plain", help=f"time grid: one of {', '.join(GRID_KINDS)} (sd3 = SD3's reference sigmas)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--labels", type=list[int] | None, default=None, help="class labels for a class-conditional model, cycled over the samples, e.g. [0,3]")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--batch_size", type=int, default=4096, help="samples integrated at once")
    p.add_argument("--device", type=str, default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--weights", type=Literal["auto", "ema", "raw"], default="auto",
                   help="which weights: the EMA weights (ema), the trained weights themselves (raw), or EMA when the checkpoint has them (auto)")
    return p


def _conditions(model, labels: list[int] | None, num: int):
    classes = getattr(model.net, "num_classes", 0) or 0
    if labels is None:
        return None
    if classes <= 0:
        raise ValueError("--labels was given but the model is not class-conditional")
    bad = [label for label in labels if not 0 <= label < classes]
    if bad:
        raise ValueError(f"--labels {bad} out of range: the model has {classes} classes (0..{classes - 1})")
    return torch.tensor(labels, dtype=torch.long).repeat(num // len(labels) + 1)[:num]


def save_picture(samples: np.ndarray, path: Path, title: str) -> bool:
    """Scatter plot for point data, image grid for (C, H, W) images with 1 or 3 channels."""
    from PIL import Image

    from flowmatch.callbacks.plots import image_grid, scatter_figure

    if samples.ndim == 2:
        Image.fromarray(scatter_figure([(title, samples[:5000])])).save(path)
        return True
    if samples.ndim == 4 and samples.shape[1] in (1, 3):
        Image.fromarray(image_grid(samples[:64])).save(path)
        return True
    return False  # latents need the data's decoder: written as .npy only


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from flowmatch.checkpoints import CheckpointError, load_objective

    try:
        config = SamplerConfig(solver=args.solver, steps=args.steps, shift=args.shift, grid=args.grid, guidance=args.guidance, rtol=args.rtol, atol=args.atol)
        model = load_objective(args.ckpt, map_location=args.device, weights=args.weights)
        cond = _conditions(model, args.labels, args.num)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, chunks, nfe = time.time(), [], 0
    gen = torch.Generator().manual_seed(args.seed)
    for lo in range(0, args.num, args.batch_size):
        n = min(args.batch_size, args.num - lo)
        noise = torch.randn((n, *model.sample_shape), generator=gen)
        part = None if cond is None else cond[lo : lo + n].to(args.device)
        x, nfe = model.generate(n, config, cond=part, noise=noise, progress=args.num > args.batch_size or config.solver != "dopri5")
        chunks.append(x.float().cpu())
    samples = torch.cat(chunks).numpy()
    seconds = time.time() - start
    np.save(out / "samples.npy", samples)
    info = {"ckpt": str(args.ckpt), "objective": type(model).__name__, "num": args.num, "shape": list(samples.shape),
            "sampler": config.name, "solver": config.solver, "steps": config.steps, "shift": config.shift, "grid": config.grid,
            "guidance": config.guidance, "labels": args.labels, "seed": args.seed, "nfe": nfe,
            "weights": getattr(model, "loaded_weights", "raw"), "seconds": round(seconds, 3)}
    (out / "samples.json").write_text(json.dumps(info, indent=2))
    drew = save_picture(samples, out / "samples.png", f"{type(model).__name__} {config.name} (NFE {nfe})")
    print(f"wrote {args.num} samples ({config.name}, NFE {nfe}, {info['weights']} weights, {seconds:.1f} s) to {out / 'samples.npy'}" + (f" and {out / 'samples.png'}" if drew else ""))
    return 0
