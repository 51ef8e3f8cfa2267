"""`python -m flowmatch export-lora`: write a LoRA run's adapter in diffusers' LoRA format, or merged full weights.

    python -m flowmatch export-lora CKPT --out DIR             # DIR/pytorch_lora_weights.safetensors
    python -m flowmatch export-lora CKPT --out DIR --merge     # DIR/config.json + diffusion_pytorch_model.safetensors

The adapter file holds diffusers' ``transformer.``-prefixed peft names, as a pipeline's ``save_lora_weights``
writes them: ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` loaded from the same base (export-diffusers
of the base checkpoint) and given it with a pipeline's ``load_lora_weights(DIR)`` (or the model's
``load_lora_adapter(DIR, prefix="transformer", weight_name="pytorch_lora_weights.safetensors")``) computes what the fine-tuned model does here. The scale alpha / rank is folded
into lora_B (diffusers assumes alpha = rank without metadata). Our fused q/k/v layers become diffusers'
separate ones with the same lora_A and lora_B's row blocks (flowmatch.adapters.diffusers_lora).

``--merge`` folds the adapter into the base weights (W + scale B A) and writes the whole transformer as a
diffusers model directory, as export-diffusers does; it also serves runs that trained parameters outside
an adapter (``trainable``), which a LoRA file cannot carry. ``--merge --format flowmatch --out merged.ckpt``
writes instead one flowmatch checkpoint (any network) that loads, samples and validates without the base.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser

from flowmatch.cli.import_sd3 import _HelpFormatter

EXAMPLE = """examples:
  python -m flowmatch export-lora runs/checkpoints/last.ckpt --out exported/lora
  python -m flowmatch sample --ckpt base.ckpt --adapter exported/lora --adapter_scale 0.8 --prompts "a sideways 7"
  python -c "from diffusers import SD3Transformer2DModel as T; m = T.from_pretrained('base_dir'); m.load_lora_adapter('exported/lora', prefix='transformer', weight_name='pytorch_lora_weights.safetensors')"
"""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch export-lora", description=__doc__, epilog=EXAMPLE,
                       formatter_class=_HelpFormatter, exit_on_error=True)
    p.add_argument("ckpt", type=str, help="checkpoint of a LoRA fine-tuning run (`fit` with model.init_args.adapter)")
    p.add_argument("--out", type=str, required=True, help="directory to write (a .ckpt file with --format flowmatch)")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into the base weights and write the full network (--format)")
    p.add_argument("--format", type=Literal["diffusers", "flowmatch"], default="diffusers",
                   help="with --merge: diffusers (a transformer directory, MMDiT and FLUX) or flowmatch (one checkpoint "
                        "file that load_objective, sample and validate read without the base; any network)")
    p.add_argument("--weights", type=Literal["auto", "ema", "raw"], default="auto",
                   help="auto: the EMA weights when the checkpoint has them; ema: require them; raw: the trained weights")
    p.add_argument("--dtype", type=Literal["keep", "float32", "bfloat16", "float16"], default="keep",
                   help="dtype of the written weights (keep: float32 for an adapter, as stored for --merge)")
    p.add_argument("--force", action="store_true", help="replace the files in --out if it already holds some")
    return p


def export_lora(ckpt: str | Path, out: str | Path, merge: bool = False, weights: str = "auto", dtype: str = "keep",
                force: bool = False, fmt: str = "diffusers") -> dict:
    """Write the checkpoint's adapter (diffusers LoRA file) or, with ``merge``, its merged network; returns a summary."""
    import torch

    from flowmatch.adapters.diffusers_lora import LORA_FILE, to_diffusers, write_lora
    from flowmatch.adapters.lora import has_lora, lora_layout, lora_state_dict, merge_lora
    from flowmatch.cli.export_diffusers import _check_out, write_network
    from flowmatch.objectives.loading import load_objective

    out = Path(out)
    if fmt not in ("diffusers", "flowmatch"):
        raise ValueError(f"--format {fmt!r}: choose diffusers or flowmatch")
    if fmt == "flowmatch" and not merge:
        raise ValueError("--format flowmatch writes merged weights: add --merge")
    if fmt == "flowmatch":
        if out.exists() and not force:
            raise FileExistsError(f"--out {out} exists; pass --force to replace it")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"the directory of --out, {out.parent}, does not exist")
    else:
        _check_out(out, force)
    model = load_objective(ckpt, weights=weights)
    net = model.net
    summary = {"ckpt": str(ckpt), "out": str(out), "network": type(net).__name__, "weights": model.loaded_weights}
    if merge:
        if has_lora(net):
            summary["layers"] = len(lora_layout(net).ranks)
            merge_lora(net)
        if fmt == "flowmatch":
            summary["parameters"] = write_merged_checkpoint(ckpt, net, out, dtype, model.loaded_weights)
            summary["file"] = str(out)
            return summary
        summary["diffusers_class"] = write_network(net, out, dtype, force, source=str(ckpt))
        summary["file"] = str(out)
        return summary
    if not has_lora(net):
        raise ValueError(f"{ckpt} carries no LoRA adapter (a full or partial fine-tuning run?): export its weights with --merge "
                         "or python -m flowmatch export-diffusers")
    extra = sorted(n for n, p in net.named_parameters() if p.requires_grad and ".lora_" not in n)
    if extra:
        raise ValueError(f"{ckpt} also trained parameters outside its adapter ({extra[:3]}, model.init_args.trainable), "
                         "which a LoRA file cannot carry: export the merged model with --merge")
    layout = lora_layout(net)
    tensors = to_diffusers(net, lora_state_dict(net), layout)
    out_dtype = torch.float32 if dtype == "keep" else getattr(torch, dtype)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        write_lora(tmp, tensors, out_dtype)
        out.mkdir(exist_ok=True)
        os.replace(tmp / LORA_FILE, out / LORA_FILE)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    ranks = sorted(set(layout.ranks.values()))
    summary.update(file=str(out / LORA_FILE), layers=len(layout.ranks), diffusers_layers=len(tensors) // 2,
                   ranks=ranks, parameters=sum(t.numel() for t in tensors.values()))
    return summary


def write_merged_checkpoint(ckpt: str | Path, net, out: Path, dtype: str, weights: str) -> int:
    """A standalone flowmatch checkpoint of the merged network: the run's config without its fine-tuning settings,
    the network's full weights (those ``weights`` chose), its sample / data record; no base file needed to load it."""
    import torch

    from flowmatch.atomic_io import atomic_write
    from flowmatch.checkpoints import read_weights

    source = read_weights(ckpt)
    hparams = dict(source.get("hyper_parameters", {}))
    for key in ("adapter", "trainable", "frozen_dtype", "init_weights"):
        hparams[key] = None
    if dtype != "keep":
        net = net.to(getattr(torch, dtype))
    state = {"net." + k: v.detach().clone() for k, v in net.state_dict().items()}
    merged = {k: source[k] for k in ("epoch", "global_step", "pytorch-lightning_version", "flowmatch", "mlflow") if k in source}
    merged.update(state_dict=state, hyper_parameters=hparams, merged_from={"checkpoint": str(ckpt), "weights": weights})
    with atomic_write(out) as fh:
        torch.save(merged, fh)
    return sum(p.numel() for p in net.parameters())


def main(argv: list[str]) -> int:
    from flowmatch.adapters.diffusers_lora import LORA_FILE

    args = build_parser().parse_args(argv)
    try:
        s = export_lora(args.ckpt, args.out, args.merge, args.weights, args.dtype, args.force, args.format)
    except Exception as err:  # one readable line: the message names the file, layer or tensor
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err) or type(err).__name__
        if isinstance(err, OSError) and err.filename:
            msg = f"{err.filename}: {err.strerror}"
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 1
    if args.merge and args.format == "flowmatch":
        print(f"merged the adapter of {s['ckpt']} ({s.get('layers', 0)} layers, {s['weights']} weights) into its {s['network']}")
        print(f"wrote {s['file']} ({s['parameters']:,} parameters), a checkpoint that loads without its base")
    elif args.merge:
        print(f"merged the adapter of {s['ckpt']} ({s.get('layers', 0)} layers, {s['weights']} weights) into its {s['network']}")
        print(f"wrote {s['file']} as a diffusers {s['diffusers_class']} (load with {s['diffusers_class']}.from_pretrained)")
    else:
        print(f"exported the LoRA adapter of {s['ckpt']}: {s['layers']} {s['network']} layers -> {s['diffusers_layers']} diffusers "
              f"layers, rank {'/'.join(map(str, s['ranks']))}, {s['parameters']:,} parameters, {s['weights']} weights")
        print(f"wrote {s['file']} (diffusers: pipe.load_lora_weights(DIR), or transformer.load_lora_adapter(DIR, prefix='transformer', weight_name='{LORA_FILE}'))")
    return 0
