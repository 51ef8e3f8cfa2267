"""diffusers model directories on disk (config.json + safetensors), shared by the SD3 and FLUX import/export.

A diffusers model directory holds ``config.json`` (with ``_class_name``) and its weights as one
``*.safetensors`` file or as shards listed by a ``*.safetensors.index.json``. A pipeline directory
holds the transformer under ``transformer/``. Nothing here knows a network: the tensor mappings are in
sd3_import.py and flux_import.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

#: diffusers transformer classes flowmatch imports -> what they are and how to import them, so that a
#: directory given to the wrong importer gets an error that says which one to use.
IMPORTERS = {
    "SD3Transformer2DModel": ("an SD3 / SD3.5 transformer", "python -m flowmatch import-sd3",
                              "flowmatch.networks.sd3_import.load_sd3_diffusers"),
    "FluxTransformer2DModel": ("a FLUX.1 transformer", "python -m flowmatch import-flux",
                               "flowmatch.networks.flux_import.load_flux_diffusers"),
}


def resolve_model_dir(directory: str | Path, expected: str) -> Path:
    """The directory holding config.json: ``directory`` itself, or its ``transformer/`` (a pipeline directory)."""
    path = Path(directory)
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"  # a whole pipeline directory was given
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: expected a diffusers {expected} directory")
    return path


def open_model_dir(directory: str | Path, class_name: str) -> tuple[Path, dict]:
    """(the directory holding config.json, its config) of a diffusers model or pipeline directory ``directory``;
    an error naming the path when it is missing, not a directory, or without a readable config."""
    path = Path(directory)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory (expected a diffusers {class_name} directory)")
    path = resolve_model_dir(path, class_name)
    return path, read_config(path)


def read_config(path: Path) -> dict:
    """``path/config.json`` as a dict, or an error naming the file."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} does not hold a JSON object")
    return config


def check_class_name(config: dict, expected: str, source: str) -> None:
    """Refuse a config of another model class; for a class another importer handles, name that importer.

    A config without ``_class_name`` is taken to be of the expected class (its keys are checked next)."""
    cls = config.get("_class_name", expected)
    if cls == expected:
        return
    message = f"{source}: _class_name is {cls!r}, expected {expected!r}"
    if cls in IMPORTERS:
        what, command, function = IMPORTERS[cls]
        message += f": this directory holds {what}; import it with `{command}` (or {function})"
    raise ValueError(message)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers model directory, sharded (with an index json) or not."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{path}: several safetensors index files {[p.name for p in indexes]}; keep one")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted({path / name for name in weight_map.values()})
        missing_files = [str(f) for f in files if not f.is_file()]
        if missing_files:
            raise FileNotFoundError(f"{indexes[0]} names shard(s) that do not exist: {missing_files}")
    else:
        files = sorted(path.glob("*.safetensors"))
        weight_map = None
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for name, tensor in load_file(str(f)).items():
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears in more than one file under {path} (second: {f.name})")
            tensors[name] = tensor
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise KeyError(f"{indexes[0]} lists tensor(s) missing from the shards: {absent}")
    return tensors


def write_model_dir(directory: str | Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Write config.json and one ``diffusion_pytorch_model.safetensors``; returns the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(path / WEIGHTS_NAME))
    return path


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along dim 0: diffusers' (scale, shift) <-> our (shift, scale)."""
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)
