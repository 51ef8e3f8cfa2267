"""`python -m flowmatch export-diffusers`: write a checkpoint's network as a diffusers model directory.

The inverse of import-sd3 / import-flux, for any checkpoint `load_objective` reads (a `fit` run's,
an imported one, a DeepSpeed directory): an MMDiT becomes an ``SD3Transformer2DModel`` directory, a
FLUX a ``FluxTransformer2DModel`` directory (config.json + diffusion_pytorch_model.safetensors), which
diffusers' ``from_pretrained`` loads, e.g. as the transformer/ of a pipeline. Networks diffusers
cannot express (learned null inputs, the 3-sets MMDiT, a FLUX with another RoPE theta or MLP ratio)
are refused with the reason.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

from flowmatch.cli.import_sd3 import _HelpFormatter

EXAMPLE = """example:
  python -m flowmatch export-diffusers --ckpt runs/checkpoints/last.ckpt --out exported/transformer
  python -c "from diffusers import FluxTransformer2DModel as T; T.from_pretrained('exported/transformer')"
"""
DTYPES = ("keep", "float32", "bfloat16", "float16")
#: network class name -> (diffusers class, the writer's module and function)
EXPORTERS = {
    "MMDiT": ("SD3Transformer2DModel", "flowmatch.networks.sd3_import", "save_sd3_diffusers"),
    "FLUX": ("FluxTransformer2DModel", "flowmatch.networks.flux_import", "save_flux_diffusers"),
}
#: files of a diffusers model directory that a forced export replaces
_MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch export-diffusers", description=__doc__, epilog=EXAMPLE,
                       formatter_class=_HelpFormatter, exit_on_error=True)
    p.add_argument("--ckpt", type=str, required=True, help="checkpoint file (or DeepSpeed checkpoint directory) whose network to export")
    p.add_argument("--out", type=str, required=True, help="directory to write (config.json + diffusion_pytorch_model.safetensors)")
    p.add_argument("--weights", type=Literal["auto", "ema", "raw"], default="auto",
                   help="auto: the EMA weights when the checkpoint has them; ema: require them; raw: the trained weights")
    p.add_argument("--dtype", type=Literal["keep", "float32", "bfloat16", "float16"], default="keep",
                   help="dtype of the written weights (keep: as stored)")
    p.add_argument("--force", action="store_true", help="replace the model files in --out if it already holds some")
    return p


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a directory to write the diffusers model into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} is not empty; pass --force to replace the model files in it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the directory of --out, {out.parent}, does not exist")


def _install(tmp: Path, out: Path) -> None:
    """Move the written files from ``tmp`` into ``out``, replacing the model files already there (no stale shard stays)."""
    out.mkdir(exist_ok=True)
    for pattern in _MODEL_FILES:
        for stale in out.glob(pattern):
            stale.unlink()
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def write_network(net, out: Path, dtype: str = "keep", force: bool = False, source: str = "checkpoint") -> str:
    """Write a plain (adapter-free) network in its diffusers layout into ``out``; returns the diffusers class.
    Nothing under ``out`` changes unless the whole export succeeds."""
    import importlib

    import torch

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}")
    name = type(net).__name__
    if name not in EXPORTERS:
        raise ValueError(f"{source}: its network is {type(net).__module__}.{name}, which has no diffusers layout here; "
                         f"export-diffusers writes {', '.join(f'{k} (as {v[0]})' for k, v in EXPORTERS.items())}")
    _check_out(out, force)
    diffusers_class, module, function = EXPORTERS[name]
    if dtype != "keep":
        net = net.to(getattr(torch, dtype))
    save = getattr(importlib.import_module(module), function)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        save(net, tmp)  # errors (what diffusers cannot express) come before anything under --out changes
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return diffusers_class


def export_diffusers(ckpt: str | Path, out: str | Path, weights: str = "auto", dtype: str = "keep", force: bool = False) -> dict:
    """Rebuild the checkpoint's objective, write its network in diffusers' layout; returns a summary dict.
    A LoRA run's adapter is merged into the base weights first."""
    from flowmatch.adapters.lora import has_lora, merge_lora
    from flowmatch.objectives.loading import load_objective

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}")
    out = Path(out)
    _check_out(out, force)
    model = load_objective(ckpt, weights=weights)
    net = model.net
    merged = has_lora(net)
    if merged:
        merge_lora(net)
    diffusers_class = write_network(net, out, dtype, force, source=str(ckpt))
    return {"ckpt": str(ckpt), "out": str(out), "network": type(net).__name__, "diffusers_class": diffusers_class,
            "weights": model.loaded_weights, "parameters": sum(p.numel() for p in net.parameters()),
            "dtype": "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in net.parameters()})), "merged_lora": merged}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = export_diffusers(args.ckpt, args.out, args.weights, args.dtype, args.force)
    except Exception as err:  # one readable line: the message names the file, network or tensor
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err) or type(err).__name__
        if isinstance(err, OSError) and err.filename:
            msg = f"{err.filename}: {err.strerror}"
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 1
    merged = " with its LoRA adapter merged" if s["merged_lora"] else ""
    print(f"exported {s['network']} ({s['parameters']:,} parameters, {s['weights']} weights, {s['dtype']}){merged} from {s['ckpt']}")
    print(f"wrote {s['out']} as a diffusers {s['diffusers_class']} (load with {s['diffusers_class']}.from_pretrained)")
    return 0
