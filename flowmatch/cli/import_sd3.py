"""`python -m flowmatch import-sd3`: turn a local diffusers SD3 transformer into a flowmatch checkpoint.

Reads a diffusers ``SD3Transformer2DModel`` directory (config.json + *.safetensors, sharded or not;
a whole pipeline directory with a transformer/ folder also works), maps its weights onto
flowmatch's MMDiT (flowmatch.networks.sd3_import) and writes a Lightning-format checkpoint that

  * `flowmatch.objectives.loading.load_objective` rebuilds (its hyper-parameters carry the objective's
    class path and the exact MMDiT constructor arguments), e.g. for `python -m flowmatch sample`;
  * starts a fine-tuning run:  model.init_args.init_weights: model.ckpt  in a `fit` config whose
    network is the same MMDiT (copy the printed network config); add model.init_args.adapter
    for LoRA (docs/fine_tuning.md).

Nothing is downloaded: DIR must already be on disk. SD3.5 Medium (MMDiT-X, dual attention layers)
is refused; SD3 Medium and SD3.5 Large / Large Turbo import.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser, DefaultHelpFormatter

OBJECTIVE_CLASS = "flowmatch.objectives.RectifiedFlow"
NETWORK_CLASS = "flowmatch.networks.mmdit.MMDiT"
#: --objective -> the time sampler recorded with the RectifiedFlow objective (None = uniform).
OBJECTIVES = {
    "rf": None,
    "rf/lognorm": {"class_path": "flowmatch.time_samplers.LogitNormalTime", "init_args": {"m": 0.0, "s": 1.0}},
}
DTYPES = ("float32", "bfloat16", "float16")


def check_import_options(objective: str, dtype: str, out: str | Path, force: bool) -> Path:
    """The options every import command shares, checked before anything is read; returns --out as a Path."""
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective!r}: choose one of {sorted(OBJECTIVES)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {list(DTYPES)}")
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give a file name such as {out / 'model.ckpt'}")
    if out.exists() and not force:
        raise FileExistsError(f"--out {out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the directory of --out, {out.parent}, does not exist")
    return out


def check_rebuilds(network_class, init_args: dict, model) -> None:
    """The recorded init_args must rebuild exactly the imported architecture (names and shapes of every tensor)."""
    import torch

    with torch.device("meta"):
        rebuilt = network_class(**init_args).state_dict()
    ours = model.state_dict()
    if {k: tuple(v.shape) for k, v in rebuilt.items()} != {k: tuple(v.shape) for k, v in ours.items()}:
        diff = sorted(set(rebuilt).symmetric_difference(ours)) or sorted(k for k in ours if rebuilt[k].shape != ours[k].shape)
        raise RuntimeError(f"internal error: {network_class.__name__}({init_args}) does not rebuild the imported model "
                           f"(differs at {diff[:5]})")

EXAMPLE = """example:
  python -m flowmatch import-sd3 /models/sd3-medium/transformer --out sd3_medium.ckpt
  python -m flowmatch sample --ckpt sd3_medium.ckpt ...            # or fine-tune it:
  python -m flowmatch fit --config my.yaml --model.init_args.init_weights sd3_medium.ckpt
  python -m flowmatch fit --config my.yaml --model.init_args.init_weights sd3_medium.ckpt --model.init_args.adapter.rank 16   # LoRA
"""


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help with the description and example kept as written."""


DESCRIPTION = """Convert a local diffusers SD3Transformer2DModel directory into a flowmatch checkpoint.

The checkpoint holds the weights as flowmatch's MMDiT (flowmatch.networks.mmdit.MMDiT) inside a
RectifiedFlow objective, with the exact network config, so that
  - flowmatch.objectives.loading.load_objective / `python -m flowmatch sample` rebuild it, and
  - a `fit` config with  model.init_args.init_weights: OUT  and the same network (the printed
    network config) fine-tunes it.
Nothing is downloaded. SD3 Medium and SD3.5 Large/Turbo import; SD3.5 Medium (MMDiT-X) does not."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch import-sd3", description=DESCRIPTION, epilog=EXAMPLE,
                       formatter_class=_HelpFormatter, exit_on_error=True)
    p.add_argument("directory", type=str, help="local diffusers SD3Transformer2DModel directory (config.json + *.safetensors), or a pipeline directory holding transformer/")
    p.add_argument("--out", type=str, required=True, help="checkpoint file to write, e.g. model.ckpt (written atomically)")
    p.add_argument("--objective", type=Literal["rf", "rf/lognorm"], default="rf",
                   help="objective recorded in the checkpoint: rectified flow with uniform times (rf) or SD3's logit-normal(0, 1) times (rf/lognorm)")
    p.add_argument("--dtype", type=Literal["float32", "bfloat16", "float16"], default="float32", help="dtype of the stored weights")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def network_config(directory: str | Path) -> tuple[Path, dict, dict]:
    """(transformer directory, diffusers config, MMDiT init_args) for a diffusers SD3 directory.

    The init_args are exactly the arguments `load_sd3_diffusers` builds the model with, so
    ``MMDiT(**init_args)`` has the imported architecture (``pos_embed_base_size`` included).
    """
    from flowmatch.networks.diffusers_files import open_model_dir
    from flowmatch.networks.sd3_import import mmdit_kwargs_from_sd3_config

    path, config = open_model_dir(directory, "SD3Transformer2DModel")
    kwargs = mmdit_kwargs_from_sd3_config(config, source=str(path / "config.json"))
    return path, config, kwargs


def _lightning_version() -> str:
    """The installed Lightning's version, without importing Lightning (seconds at start-up)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning")
    except PackageNotFoundError:
        return "0.0.0"


def imported_checkpoint(model, network_class: str, init_args: dict, objective: str, sample_shape: list[int], dtype,
                        imported_from: str) -> dict:
    """The Lightning-format checkpoint of an imported network wrapped in a RectifiedFlow objective (import-sd3's and
    import-flux's format): the objective's config as hyper-parameters, so load_objective rebuilds it."""
    hparams = {
        "_class_path": OBJECTIVE_CLASS,
        "network": {"class_path": network_class, "init_args": dict(init_args)},
        "time_sampler": OBJECTIVES[objective],
        "sample_shape": sample_shape,
        "_instantiator": "lightning.pytorch.cli.instantiate_module",  # lets LightningModule.load_from_checkpoint rebuild it too
    }
    state = {f"net.{k}": v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    return {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": _lightning_version(),
        "state_dict": state,
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "flowmatch": {"sample_shape": sample_shape, "objective": "RectifiedFlow", "imported_from": f"diffusers {imported_from}"},
    }


def import_sd3(directory: str | Path, out: str | Path, objective: str = "rf", dtype: str = "float32", force: bool = False) -> dict:
    """Convert and write; returns a summary dict. Raises on any problem (the CLI prints it)."""
    import torch

    from flowmatch.networks.mmdit import MMDiT
    from flowmatch.networks.sd3_import import load_sd3_diffusers

    out = check_import_options(objective, dtype, out, force)

    path, config, init_args = network_config(directory)
    model = load_sd3_diffusers(path, dtype=getattr(torch, dtype))  # default cond_drop_prob, as MMDiT(**init_args)

    check_rebuilds(MMDiT, init_args, model)

    from flowmatch.checkpoints import atomic_torch_save

    size = config.get("sample_size", 128)
    ckpt = imported_checkpoint(model, NETWORK_CLASS, init_args, objective, [init_args["in_channels"], size, size],
                               getattr(torch, dtype), "SD3Transformer2DModel")
    atomic_torch_save(ckpt, out)
    return {
        "source": str(path),
        "out": str(out),
        "parameters": model.num_params(),
        "depth": model.depth,
        "hidden": model.hidden_size,
        "heads": model.num_heads,
        "qk_norm": model.qk_norm,
        "dtype": dtype,
        "objective": objective,
        "init_args": init_args,
    }


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        s = import_sd3(args.directory, args.out, args.objective, args.dtype, args.force)
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
    print(f"  MMDiT depth {s['depth']}, hidden {s['hidden']}, heads {s['heads']}, qk_norm {s['qk_norm']}, "
          f"{s['parameters']:,} parameters ({s['dtype']})")
    print(f"  objective {s['objective']} ({OBJECTIVE_CLASS})")
    print(f"  network config: {json.dumps({'class_path': NETWORK_CLASS, 'init_args': s['init_args']})}")
    print(f"wrote {s['out']}")
    return 0
