"""`python -m flowmatch convert-checkpoint`: one checkpoint file from a DeepSpeed ZeRO checkpoint directory.

A fit under DeepSpeed (configs/trainer/deepspeed_*.yaml) writes each checkpoint as a directory of
per-rank shards. This command consolidates the weights to float32 (Lightning's
convert_zero_checkpoint_to_fp32_state_dict, i.e. DeepSpeed's zero_to_fp32), joins the ZeRO-3 shards
of the EMA weights if the run kept an EMA, and writes one Lightning-format file (atomically, no
optimizer state) that `validate` / `test` (--ckpt_path), `sample` (--ckpt) and
flowmatch.objectives.loading.load_objective read. To resume training, keep using the directory itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse

from jsonargparse import ArgumentParser, DefaultHelpFormatter

EXAMPLE = """example:
  python -m flowmatch convert-checkpoint runs/checkpoints/last.ckpt --out model.ckpt
  python -m flowmatch sample --ckpt model.ckpt --out samples/       # EMA weights if the run kept them
"""


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help with the description and examples kept as written."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch convert-checkpoint", description=__doc__, epilog=EXAMPLE,
                       formatter_class=_HelpFormatter, exit_on_error=True)
    p.add_argument("directory", type=str, help="a DeepSpeed checkpoint directory written by `fit` (e.g. runs/checkpoints/last.ckpt)")
    p.add_argument("--out", type=str, required=True, help="the consolidated checkpoint file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from flowmatch.checkpoints import CheckpointError, consolidate_deepspeed_checkpoint

    src, out = Path(args.directory), Path(args.out)
    if not src.exists():
        print(f"error: checkpoint not found: {src}", file=sys.stderr)
        return 2
    if src.is_file():
        print(f"error: {src} is already a single checkpoint file (only DeepSpeed checkpoint directories need converting)", file=sys.stderr)
        return 2
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    try:
        ckpt = consolidate_deepspeed_checkpoint(src, out)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in ckpt["state_dict"].values())
    ema = ckpt.get("ema") or {}
    what = f"{len(ckpt['state_dict'])} tensors, {n:,} values"
    if ema.get("state_dict"):
        what += f", EMA weights ({ema.get('num_updates', 0)} updates, decay {ema.get('decay')})"
    print(f"wrote {out}: step {ckpt.get('global_step', '?')}, {what}")
    print(f"sample it:  python -m flowmatch sample --ckpt {out} --out samples/")
    return 0
