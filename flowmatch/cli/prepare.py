"""`python -m flowmatch prepare`: images + captions -> latent/caption webdataset shards (docs/data.md).

    python -m flowmatch prepare --source demo --out data/demo
    python -m flowmatch prepare --source photos/ --out data/photos --size 256 --autoencoder path/to/sd3_vae \\
        --text_encoders [path/to/clip_l,path/to/t5] --max_length [77,256]
    python -m flowmatch prepare --source captions.jsonl --out data/mine --autoencoder runs/.../last.ckpt
    python -m flowmatch prepare --source demo_buckets --out data/demo_buckets        (aspect-ratio buckets)
    python -m flowmatch prepare --source scenes --out data/scenes                    (6,000 RGB scenes, 32x32)
    python -m flowmatch prepare --source scenes --out data/scenes64 --size 64 --num 10000 --seed 1
    python -m flowmatch prepare --source scenes --out data/scenes_ae16 --autoencoder runs/.../last.ckpt
        (the conv autoencoder of configs/autoencoder/ae_scenes_d16.yaml: 32x32x3 -> 16x8x8)
    python -m flowmatch prepare --source photos/ --out data/photos_ar --bucket_pixels 65536 --autoencoder path/to/sd3_vae

A re-run with the same settings skips finished shards (resumable); the summary names what was written.

The scenes (docs/scenes.md) are drawn, not read: --num scenes of 1-4 coloured shapes at --size (32 or 64), from
--seed (which also draws the split). Every sample holds the rendered image's latent, an original caption ("a red
circle"), a synthetic one from the scene graph, the number of objects as its label, and the scene graph in its json
("scene"); captions are encoded to 64 tokens (MiniLM's default 32 would cut a fifth of the synthetic ones short).
Without --autoencoder the scenes are stored as the demo is, through lossless space-to-depth (factor 4: 32x32x3 ->
48x8x8, exact in float16), so the stored latents decode to the rendered images bit for bit; a checkpoint of the
platform's conv autoencoder fitted on the scenes (configs/autoencoder/ae_scenes_d16.yaml) gives 16x8x8 latents.
"""

from __future__ import annotations

import argparse
import sys

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types and defaults) with the description's lines and examples kept as written."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch prepare", description=__doc__, exit_on_error=True, formatter_class=_HelpFormatter)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    p.add_argument("--source", type=str, default="demo", help="'demo' (sklearn digits), 'sideways', 'demo_buckets' (digits on square / wide / tall pictures), 'scenes' (procedural RGB shapes with two captions and a scene graph, docs/scenes.md), a folder of images (captions in NAME.txt / NAME.syn.txt), or a .jsonl of {image, caption, synthetic_caption?, label?}")
    p.add_argument("--out", type=str, default="data/demo", help="output folder for the shards and manifest.json")
    p.add_argument("--autoencoder", type=str, default="space_to_depth:4", help="space_to_depth[:F] (the default, factor 4: lossless pixel unshuffle, C x 16 channels at 1/4 the side, e.g. 16x8x8 for the demo, 48x8x8 for 32x32 RGB scenes), an AutoencoderModule .ckpt (the platform's conv autoencoder, e.g. fitted with configs/autoencoder/ae_scenes_d16.yaml), or a diffusers AutoencoderKL directory")
    p.add_argument("--text_encoders", type=list[str], default=["minilm"], help="local transformers directories (CLIP text, T5 encoder, BERT-style) or 'minilm'; [] for none")
    p.add_argument("--max_length", type=list[int] | None, default=None, help="tokens per caption, one per text encoder (default: 64 for the scenes' long synthetic captions, else 32 for minilm, 77 for CLIP / T5)")
    p.add_argument("--store_encodings", type=bool, default=True, help="store the text encodings in the shards (false: record the encoders, encode while training)")
    p.add_argument("--size", type=int | None, default=None, help="image side (default 32 for the demo and the scenes, 256 otherwise; the scenes need at least 32 and are made at 32 or 64)")
    p.add_argument("--channels", type=int | None, default=None, help="image channels: 1 (grey) or 3 (RGB); default 1 for the demo, 3 otherwise (the scenes are RGB)")
    p.add_argument("--num", type=int | None, default=None, help="scenes to draw (the scenes source only; default 6000: 4,800 / 600 / 600 train / val / test; MiniLM encodes about 80 captions a second on one core, so prepare takes about a minute per 5,000 scenes)")
    p.add_argument("--shard_size", type=int, default=256, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the train / val / test split (and of --limit's subset); for the scenes also of the scenes and their captions")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of the images held out for validation")
    p.add_argument("--test_fraction", type=float, default=0.1, help="share of the images held out for testing")
    p.add_argument("--limit", type=int | None, default=None, help="use only this many images (a fixed random subset), e.g. for tests")
    p.add_argument("--shift", type=float | None, default=None, help="latent normalisation shift (default: the autoencoder's, else the train mean)")
    p.add_argument("--scale", type=float | None, default=None, help="latent normalisation scale (default: the autoencoder's, else 1 / train std)")
    p.add_argument("--buckets", type=list[list[int]] | None, default=None, help="aspect-ratio buckets [[H,W],...] in pixels: each image goes to the nearest aspect ratio, resized and centre-cropped (default: the source's own, e.g. demo_buckets'; none: one square --size)")
    p.add_argument("--bucket_pixels", type=int | None, default=None, help="make the buckets instead: about this many pixels each, aspect ratios up to --bucket_max_ratio (SDXL / kohya style)")
    p.add_argument("--bucket_multiple", type=int | None, default=None, help="bucket sides must be multiples of this (default: the autoencoder's downsampling x 2, for 2x2 patches)")
    p.add_argument("--bucket_max_ratio", type=float, default=2.0, help="largest aspect ratio of the buckets --bucket_pixels makes")
    p.add_argument("--small_images", type=str, default="skip", help="an image below every bucket in both sides: 'skip' it (counted in the summary) or 'upscale' it")
    p.add_argument("--batch_size", type=int, default=128, help="images per autoencoder batch")
    p.add_argument("--text_batch_size", type=int, default=None, help="captions per text-encoder batch (default: the source's; 256, and 32 for the scenes, whose captions sorted by length pad little in small batches: twice as fast on a CPU)")
    p.add_argument("--device", type=str, default="cpu", help="torch device for the autoencoder and text encoders")
    p.add_argument("--overwrite", type=bool, default=False, help="delete shards in --out written with other settings instead of refusing")
    p.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from flowmatch.autoencoders.base import AutoencoderError
    from flowmatch.data.prepare import PrepareConfig, PrepareError, prepare_shards
    from flowmatch.data.sources import SourceError
    from flowmatch.text.encoders import TextEncoderError

    if os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    fields = {k: v for k, v in vars(args).items() if k != "config" and not k.startswith("__")}
    try:
        prepare_shards(PrepareConfig(**fields))
    except (PrepareError, SourceError, AutoencoderError, TextEncoderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
