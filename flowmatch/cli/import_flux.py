"""`python -m flowmatch import-flux`: turn a local diffusers FLUX.1 transformer into a flowmatch checkpoint.

The FLUX counterpart of import-sd3 (same options, same checkpoint format): reads a diffusers
``FluxTransformer2DModel`` directory (config.json + *.safetensors, sharded or not; a whole pipeline
directory with a transformer/ folder also works), maps its weights onto flowmatch's FLUX
(flowmatch.networks.flux_import) and writes a Lightning-format checkpoint that

  * `flowmatch.objectives.loading.load_objective` rebuilds (its hyper-parameters carry the objective's
    class path and the exact FLUX constructor arguments);
  * starts a fine-tuning run:  model.init_args.init_weights: model.ckpt  in a `fit` config whose
    network is the same FLUX (copy the printed network config).

Nothing is downloaded: DIR must already be on disk. An SD3 directory is refused with a pointer to import-sd3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

from flowmatch.cli.import_sd3 import OBJECTIVE_CLASS, _HelpFormatter, check_import_options, check_rebuilds, imported_checkpoint

NETWORK_CLASS = "flowmatch.networks.flux.FLUX"
LATENT_SIZE = 128  # FLUX.1's 1024 x 1024 images through its 8x autoencoder

EXAMPLE = """example:
  python -m flowmatch import-flux /models/FLUX.1-dev --out flux_dev.ckpt --dtype bfloat16
  python -m flowmatch fit --config my.yaml --model.init_args.init_weights flux_dev.ckpt   # fine-tune it
  python -m flowmatch fit --config my.yaml --model.init_args.init_weights flux_dev.ckpt --model.init_args.adapter.rank 16   # with LoRA
"""

DESCRIPTION = """Convert a local diffusers FluxTransformer2DModel directory into a flowmatch checkpoint.

The checkpoint holds the weights as flowmatch's FLUX (flowmatch.networks.flux.FLUX) inside a
RectifiedFlow objective, with the exact network config, so that
  - flowmatch.objectives.loading.load_objective rebuilds it, and
  - a `fit` config with  model.init_args.init_weights: OUT  and the same network (the printed
    network config) fine-tunes it.
diffusers' in_channels 64 (2x2-packed latents) becomes FLUX(in_channels=16, patch_size=2). A guidance-
distilled model (FLUX.1-dev, guidance_embeds) needs cond["guidance"] (the guidance scale) at every call.
Nothing is downloaded. An SD3 directory is refused: use import-sd3 for it."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch import-flux", description=DESCRIPTION, epilog=EXAMPLE,
                       formatter_class=_HelpFormatter, exit_on_error=True)
    p.add_argument("directory", type=str, help="local diffusers FluxTransformer2DModel directory (config.json + *.safetensors), or a pipeline directory holding transformer/")
    p.add_argument("--out", type=str, required=True, help="checkpoint file to write, e.g. model.ckpt (written atomically)")
    p.add_argument("--objective", type=Literal["rf", "rf/lognorm"], default="rf",
                   help="objective recorded in the checkpoint: rectified flow with uniform times (rf) or logit-normal(0, 1) times (rf/lognorm)")
    p.add_argument("--dtype", type=Literal["float32", "bfloat16", "float16"], default="float32", help="dtype of the stored weights")
    p.add_argument("--latent-size", type=int, default=LATENT_SIZE,
                   help="side of the latents the checkpoint's sample_shape records (128: FLUX.1's 1024 x 1024 images); even")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def network_config(directory: str | Path) -> tuple[Path, dict, dict]:
    """(transformer directory, diffusers config, FLUX init_args) for a diffusers FLUX directory.

    The init_args are exactly the arguments `load_flux_diffusers` builds the model with, so
    ``FLUX(**init_args)`` has the imported architecture."""
    from flowmatch.networks.diffusers_files import open_model_dir
    from flowmatch.networks.flux_import import CLASS_NAME, flux_kwargs_from_diffusers_config

    path, config = open_model_dir(directory, CLASS_NAME)
    return path, config, flux_kwargs_from_diffusers_config(config, source=str(path / "config.json"))


def import_flux(directory: str | Path, out: str | Path, objective: str = "rf", dtype: str = "float32",
                latent_size: int = LATENT_SIZE, force: bool = False) -> dict:
    """Convert and write; returns a summary dict. Raises on any problem (the CLI prints it)."""
    import torch

    from flowmatch.networks.flux import FLUX
    from flowmatch.networks.flux_import import load_flux_diffusers

    out = check_import_options(objective, dtype, out, force)
    if latent_size < 2 or latent_size % 2:
        raise ValueError(f"--latent-size {latent_size}: must be a positive even number (FLUX packs 2x2 latent pixels per token)")

    path, _config, init_args = network_config(directory)
    model = load_flux_diffusers(path, dtype=getattr(torch, dtype))  # default cond_drop_prob, as FLUX(**init_args)

    check_rebuilds(FLUX, init_args, model)

    from flowmatch.checkpoints import atomic_torch_save

    ckpt = imported_checkpoint(model, NETWORK_CLASS, init_args, objective, [init_args["in_channels"], latent_size, latent_size],
                               getattr(torch, dtype), "FluxTransformer2DModel")
    atomic_torch_save(ckpt, out)
    return {
        "source": str(path),
        "out": str(out),
        "parameters": model.num_params(),
        "double": model.num_double_blocks,
        "single": model.num_single_blocks,
        "hidden": model.hidden_size,
        "heads": model.num_heads,
        "guidance_embed": model.guidance_embed,
        "dtype": dtype,
        "objective": objective,
        "init_args": init_args,
    }


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = import_flux(args.directory, args.out, args.objective, args.dtype, args.latent_size, args.force)
    except Exception as err:  # one readable line, no traceback: the message names the file or tensor
        if isinstance(err, KeyError) and err.args:
            msg = err.args[0]
        elif isinstance(err, OSError) and err.filename:
            msg = f"{err.filename}: {err.strerror}"
        elif isinstance(err, (OSError, ValueError, NotImplementedError, RuntimeError)):
            msg = str(err)
        else:  # e.g. safetensors' error for a corrupt file
            msg = f"{type(err).__name__}: {err} (while importing {args.directory})"
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 1
    print(f"imported {s['source']}")
    print(f"  FLUX {s['double']} double + {s['single']} single blocks, hidden {s['hidden']}, heads {s['heads']}, "
          f"guidance_embed {s['guidance_embed']}, {s['parameters']:,} parameters ({s['dtype']})")
    if s["guidance_embed"]:
        print("  guidance-distilled: every call needs cond['guidance'] (the guidance scale, e.g. 3.5 for FLUX.1-dev)")
    print(f"  objective {s['objective']} ({OBJECTIVE_CLASS})")
    print(f"  network config: {json.dumps({'class_path': NETWORK_CLASS, 'init_args': s['init_args']})}")
    print(f"wrote {s['out']}")
    return 0
