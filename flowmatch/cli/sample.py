"""`python -m flowmatch sample`: draw samples from a trained checkpoint with any solver; text-to-image for
models trained on latent/caption shards.

Image models (trained on latent shards): the checkpoint records its text encoders, autoencoder and latent
normalisation (or give --data_dir / --manifest of the shards). Prompts are encoded, latents generated and
decoded to images:

    python -m flowmatch sample --ckpt last.ckpt --prompts "a 7" "a thick three" --num 4 --steps 25 --guidance 4 --out samples/

writes OUT/images/0000_a-7.png ... (one PNG per image, prompt by prompt), OUT/grid.png (one row per
prompt; column j starts from the same noise in every row), OUT/grid_captioned.png (the same with each
prompt written beside its row), OUT/samples.npy (decoded images, float32
(N, C, H, W) in [-1, 1]), OUT/latents.npy (the generated normalised latents) and OUT/samples.json
(settings, prompts, NFE, seconds). --num is the number of images per prompt. --prompts_file takes one
prompt per line. A prompt longer than a text encoder's max_length is truncated, with a warning.
Without prompts a text-conditioned model samples unconditionally (the null condition it was trained
with for dropped captions), --num images.

Size: by default the size the model was trained at (the checkpoint's sample_shape). --height H --width W
(image pixels) samples another size: latents H/f x W/f, f the autoencoder's downsampling factor (the
checkpoint's data record); --latent_size h w gives the latent size itself. The networks with a cropped
position table (DiT, MM-DiT) take sizes up to their table, FLUX (RoPE) any even size. The time grid's
shift is the model's training time_shift rule evaluated at the size sampled (FLUX's mu from the token
count, SD3's sqrt rule from the pixels; 1 = none for a model trained without one); --shift A overrides it.
samples.json records the shift and where it came from.

Other models (2-D points, class labels, pixel images, latent models that record no data): OUT/samples.npy
(float32, shape (num, *sample_shape)), OUT/samples.json and a picture OUT/samples.png (a scatter plot
for 2-D data, an image grid for images).

Bad input (an unknown solver, steps < 1, guidance < 0, prompts for a model that takes no text, a missing
prompts file or checkpoint, a checkpoint of another model, a size the network cannot take) is an error with exit code 2 that writes nothing.
"""

import argparse
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from flowmatch.sampling import SOLVERS, SamplerConfig
from flowmatch.sampling.time_grid import GRID_KINDS

DEFAULT_NUM = {"arrays": 2000, "prompts": 4, "images": 16}
DEFAULT_BATCH = {"arrays": 4096, "images": 64}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description (this module's docstring) kept as written."""


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m flowmatch sample", description=__doc__, exit_on_error=True, formatter_class=_HelpFormatter)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    p.add_argument("--ckpt", type=str | None, default=None,
                   help="checkpoint written by `python -m flowmatch fit` (or import-sd3 / import-flux); required")
    p.add_argument("--adapter", type=str | None, default=None,
                   help="a LoRA adapter for the --ckpt base, applied without merging: a diffusers LoRA file or directory "
                        "(pytorch_lora_weights.safetensors, from export-lora or diffusers' training scripts)")
    p.add_argument("--adapter_scale", type=float, default=1.0,
                   help="scale of the LoRA update (--adapter's, or a LoRA run's own): 0 = the base model, 1 = as trained")
    p.add_argument("--out", type=str, default="samples", help="output directory (created if missing)")
    p.add_argument("--prompts", type=str, default=None, nargs="+",
                   help='text prompts for a text-conditioned image model, e.g. --prompts "a 7" "a thick three"')
    p.add_argument("--prompts_file", type=str | None, default=None, help="a text file of prompts, one per line (blank lines skipped)")
    p.add_argument("--negative_prompt", type=str | None, default=None,
                   help="with --guidance != 1: guide away from this prompt instead of from the unconditional model")
    p.add_argument("--num", type=int | None, default=None,
                   help="images per prompt when prompts are given (default 4); otherwise the number of samples "
                        "(default 2000, or 16 unconditional images)")
    p.add_argument("--solver", type=str, default="euler", help=f"ODE solver: one of {', '.join(SOLVERS)}")
    p.add_argument("--steps", type=int, default=25, help="solver steps (ignored by the adaptive dopri5)")
    p.add_argument("--shift", type=float | None, default=None,
                   help="resolution shift alpha of the time grid (1 = none; SD3 uses 3 at 1024^2); default: the model's "
                        "training time_shift at the size sampled (1 without one)")
    p.add_argument("--height", type=int | None, default=None, help="image height in pixels (with --width); default: the training size")
    p.add_argument("--width", type=int | None, default=None, help="image width in pixels (with --height)")
    p.add_argument("--latent_size", type=int, nargs=2, default=None, metavar=("h", "w"),
                   help="latent height and width instead of --height / --width")
    p.add_argument("--grid", type=str, default="plain", help=f"time grid: one of {', '.join(GRID_KINDS)} (sd3 = SD3's reference sigmas)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="guidance scale w >= 0: classifier-free guidance (1 = off, 0 = unconditional), or, for a "
                        "guidance-distilled network (FLUX with guidance_embed), the scale it takes as an input "
                        "(one network call per step)")
    p.add_argument("--labels", type=list[int] | None, default=None, help="class labels for a class-conditional model, cycled over the samples, e.g. [0,3]")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--batch_size", type=int | None, default=None, help="samples integrated at once (default 4096; 64 for images)")
    p.add_argument("--device", type=str, default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--weights", type=Literal["auto", "ema", "raw"], default="auto",
                   help="which weights: the EMA weights (ema), the trained weights themselves (raw), or EMA when the checkpoint has them (auto)")
    p.add_argument("--data_dir", type=str | None, default=None,
                   help="shards the model was trained on (a folder with manifest.json): their text encoders, autoencoder and "
                        "normalisation replace those the checkpoint records (needed for checkpoints that record none)")
    p.add_argument("--manifest", type=str | None, default=None, help="the same, given as the manifest's path or URL")
    p.add_argument("--upscale", type=int, default=0,
                   help="PNG files: enlarge images by this integer factor, nearest neighbour (0 = auto: at least 128 pixels; 1 = none)")
    return p


# --- conditions ---------------------------------------------------------------------------------------------
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


def _text_conditioned(net) -> bool:
    """A network that takes the shards' text condition {"pooled", "tokens", "mask"}: one with text tokens
    (MM-DiT, CrossDiT), or a DiT conditioned on a pooled text vector (it uses the dict's "pooled")."""
    return net.conditioning.is_text


# --- everything checked and loaded before a file is written -------------------------------------------------
@dataclass
class Plan:
    """What main() generates and writes, all of it validated."""

    mode: str  # "arrays" | "images"
    model: Any
    config: SamplerConfig
    num: int  # images per prompt (prompts), else total samples
    batch_size: int
    shape: tuple[int, ...]  # one sample's shape: (C, h, w) latents or images, (D,) points
    shift_source: str  # where config.shift came from: "--shift", or the training rule at this size
    cond: Any = None  # arrays / label images: per-sample conditions (or None)
    prompts: list[str] | None = None
    prompt_cond: dict | None = None  # one row per prompt
    negative_cond: dict | None = None  # one row
    info: dict | None = None  # the data's checkpoint record (flowmatch.data.facts)
    info_source: str | None = None
    facts: Any = None  # LatentDataFacts: encoders, autoencoder, normalisation
    text: Any = None
    decoder: Any = None
    notes: list[str] = field(default_factory=list)  # warnings shown on stderr and kept in samples.json


def _check_numbers(args) -> None:
    if args.num is not None and args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise ValueError(f"--guidance must be a finite number >= 0 (1 = off, 0 = unconditional), got {args.guidance}")
    if args.upscale < 0:
        raise ValueError(f"--upscale must be >= 0 (0 = auto), got {args.upscale}")
    if args.data_dir is not None and args.manifest is not None:
        raise ValueError("give --data_dir or --manifest, not both")
    if (args.height is None) != (args.width is None):
        raise ValueError(f"give --height and --width together, got --height {args.height} --width {args.width}")
    if args.height is not None and args.latent_size is not None:
        raise ValueError("give --height / --width (pixels) or --latent_size (latents), not both")
    sizes = [*(() if args.height is None else (args.height, args.width)), *(args.latent_size or ())]
    if any(v < 1 for v in sizes):
        raise ValueError(f"sizes must be >= 1, got {' x '.join(map(str, sizes))}")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise ValueError(f"--shift must be a finite number > 0 (1 = none), got {args.shift}")


# --- the size sampled and its time-grid shift ----------------------------------------------------------------
def downsample_factor(record: dict | None, decoder=None) -> int | None:
    """The autoencoder's downsampling factor f: image_shape over latent_shape of the data record, else the
    decoder's own ``downsample``; None when neither is known."""
    image, latent = (record or {}).get("image_shape"), (record or {}).get("latent_shape")
    if image and latent and image[-1] % latent[-1] == 0:
        return image[-1] // latent[-1]
    return getattr(decoder, "downsample", None)


def check_size(net, shape: tuple[int, ...], what: str) -> None:
    """Raise one ValueError naming ``what`` (the size asked for) when ``net`` cannot take latents of ``shape``:
    the networks' own check (patch divisibility, position table) run on a shape-only (meta) tensor."""
    from flowmatch.networks.layers import check_latents

    patch = getattr(net, "patch_size", 1) or 1
    table = getattr(net, "pos_embed", None)
    try:
        if hasattr(net, "table_arg"):  # the DiT / MM-DiT / FLUX trunk
            check_latents(torch.empty((1, *shape), device="meta"), net.in_channels, patch,
                          getattr(table, "max_size", None), type(net).__name__, net.table_arg)
        elif shape[-1] % patch or shape[-2] % patch:
            raise ValueError(f"{type(net).__name__}: latent {shape[-2]}x{shape[-1]} is not divisible by patch_size {patch}")
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def sample_size(args, model, record: dict | None, decoder=None) -> tuple[int, ...]:
    """One sample's shape: the training one, or (C, h, w) of --height/--width or --latent_size, checked against the network."""
    shape = tuple(model.sample_shape or ())
    if args.height is None and args.latent_size is None:
        return shape
    if len(shape) != 3:
        raise ValueError(f"--height/--width and --latent_size need a model of images or latents (C, H, W); {args.ckpt} "
                         f"generates samples of shape {shape}")
    if args.latent_size is not None:
        h, w = args.latent_size
        what = f"--latent_size {h} {w}"
    else:
        f = downsample_factor(record, decoder)
        if f is None:
            raise ValueError(f"--height/--width: {args.ckpt} records no autoencoder, so its downsampling factor is unknown: "
                             "give --latent_size h w, or --data_dir DIR (or --manifest FILE) of its shards")
        step = f * (getattr(model.net, "patch_size", 1) or 1)
        what = f"--height {args.height} --width {args.width}"
        if args.height % step or args.width % step:
            raise ValueError(f"{what}: image sizes must be multiples of {step} (the autoencoder's factor {f} x the "
                             f"network's patch_size {step // f})")
        h, w = args.height // f, args.width // f
        what += f" (latent {h}x{w})"
    shape = (shape[0], h, w)
    check_size(model.net, shape, what)
    return shape


def grid_shift(args, model, shape: tuple[int, ...]) -> tuple[float, str]:
    """(alpha of the time grid, where it came from): --shift, else the model's training rule at ``shape``."""
    from flowmatch.time_shift import sampling_shift

    if args.shift is not None:
        return args.shift, "--shift"
    rule = getattr(model, "time_shift", None)
    if rule is None:
        return 1.0, "none: the model trained without a time_shift"
    size = "x".join(map(str, shape[1:])) if len(shape) == 3 else str(shape)
    return sampling_shift(rule, (1, *shape)), f"the training time_shift {rule!r} at latent {size}"


def _data_facts(args, model):
    """(the LatentDataFacts, where they came from): --manifest / --data_dir, else the checkpoint's record; (None, None)."""
    from flowmatch.data.facts import LatentDataFacts

    location = args.manifest or args.data_dir
    if location is not None:
        flag = "--manifest" if args.manifest else "--data_dir"
        return LatentDataFacts.read(location), f"{flag} {location}"
    info = getattr(model, "data_info", None)
    return (LatentDataFacts.from_record(info), "checkpoint") if info else (None, None)


def _load_model(args, load_objective):
    """The --ckpt model, with --adapter attached and the adapter scale set."""
    from flowmatch.adapters.lora import has_lora, set_lora_scale

    if args.ckpt is None:
        what = f"--adapter {args.adapter} is a LoRA for a base model: give that base" if args.adapter else "give"
        raise ValueError(f"{what} with --ckpt CKPT (a checkpoint of `fit`, import-sd3 or import-flux)")
    if not math.isfinite(args.adapter_scale):
        raise ValueError(f"--adapter_scale must be a finite number, got {args.adapter_scale}")
    model = load_objective(args.ckpt, map_location=args.device, weights=args.weights)
    if args.adapter is not None:
        from flowmatch.adapters.diffusers_lora import attach_lora

        if has_lora(model.net):
            raise ValueError(f"{args.ckpt} already carries a LoRA adapter (a LoRA run's checkpoint); give its base as --ckpt, "
                             "or merge it first (python -m flowmatch export-lora ... --merge)")
        attach_lora(model.net, args.adapter)
        model.net.to(args.device)
    if args.adapter_scale != 1.0:
        if not has_lora(model.net):
            raise ValueError(f"--adapter_scale {args.adapter_scale}: {args.ckpt} carries no LoRA adapter; give one with --adapter")
        set_lora_scale(model.net, args.adapter_scale)
    return model


def plan(args) -> Plan:
    """Validate every option and load model, encoders and decoder; raises ValueError / OSError (nothing written)."""
    from flowmatch.objectives.loading import load_objective
    from flowmatch.sampling.guidance import embeds_guidance
    from flowmatch.sampling.prompts import PromptError, encode_prompts, read_prompts

    _check_numbers(args)
    config = SamplerConfig(solver=args.solver, steps=args.steps, shift=args.shift or 1.0, grid=args.grid, guidance=args.guidance,
                           rtol=args.rtol, atol=args.atol)
    prompts = read_prompts(args.prompts, args.prompts_file)
    if prompts is not None and args.labels is not None:
        raise ValueError("give --prompts or --labels, not both")
    if args.negative_prompt is not None:
        if prompts is None:
            raise PromptError("--negative_prompt needs --prompts (or --prompts_file)")
        if args.guidance == 1:
            raise PromptError("--negative_prompt has no effect with --guidance 1 (guidance off): give --guidance, e.g. 4")
    model = _load_model(args, load_objective)
    net, name = model.net, type(model.net).__name__
    text_model = _text_conditioned(net)
    if args.negative_prompt is not None and embeds_guidance(net):
        raise PromptError(f"{args.ckpt}: the {name} is guidance-distilled (guidance_embed=True): it takes --guidance as an input "
                          "and has no unconditional branch to replace with --negative_prompt; drop --negative_prompt")
    if prompts is not None and not text_model:
        raise PromptError(f"{args.ckpt}: the model ({type(model).__name__} with a {name}) is not text-conditioned; drop --prompts / --prompts_file")
    facts, source = _data_facts(args, model)
    shape = tuple(model.sample_shape or ())
    if facts is not None and tuple(facts.sample_shape) != shape:
        raise ValueError(f"{source}: the shards hold latents of shape {tuple(facts.sample_shape)} but the model generates {shape}")
    if facts is None:
        if prompts is not None:
            raise PromptError(f"{args.ckpt} records no text encoders or autoencoder (it predates them, or was imported): "
                              "give --data_dir DIR (or --manifest FILE) of the shards the model was trained on")
        if text_model:
            raise ValueError(f"{args.ckpt}: the model is text-conditioned but records no data (text encoders, autoencoder): "
                             "give --prompts and --data_dir DIR (or --manifest FILE) of the shards it was trained on")
        shape = sample_size(args, model, None)
        shift, shift_source = grid_shift(args, model, shape)
        num = args.num or DEFAULT_NUM["arrays"]
        return Plan("arrays", model, dataclasses.replace(config, shift=shift), num, args.batch_size or DEFAULT_BATCH["arrays"],
                    shape, shift_source, cond=_conditions(model, args.labels, num))

    decoder = facts.load_autoencoder(args.device)
    shape = sample_size(args, model, facts.record(), decoder)
    shift, shift_source = grid_shift(args, model, shape)
    num = args.num or DEFAULT_NUM["prompts" if prompts is not None else "images"]
    p = Plan("images", model, dataclasses.replace(config, shift=shift), num, args.batch_size or DEFAULT_BATCH["images"], shape,
             shift_source, info=facts.record(), info_source=source, facts=facts, prompts=prompts, cond=_conditions(model, args.labels, num))
    p.decoder = decoder
    if text_model:
        if prompts is None:
            p.notes.append("no prompts: sampling unconditionally (the model's null condition)"
                           + ("; --guidance has no effect" if config.guidance != 1 else ""))
            p.config = dataclasses.replace(config, guidance=1.0)
        else:
            if not facts.encoder_descriptions:
                raise PromptError(f"{source} names no text encoders: the model cannot be given prompts")
            from flowmatch.networks.conditioning import check_fits

            check_fits(net, facts.conditioning, data_name=f"the text encoders of {source}")
            p.text = facts.text_encoders.to(args.device)
            from flowmatch.text.encoders import TextTruncationWarning

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", TextTruncationWarning)
                p.prompt_cond = encode_prompts(p.text, prompts, args.device)
                if args.negative_prompt is not None:
                    p.negative_cond = encode_prompts(p.text, [args.negative_prompt], args.device)
            p.notes += [str(w.message) for w in caught if issubclass(w.category, TextTruncationWarning)]
            for w in caught:
                if not issubclass(w.category, TextTruncationWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return p


# --- generation ----------------------------------------------------------------------------------------------
def _null_text_condition(facts, net, n: int, device) -> dict:
    """The network's unconditional text input for n samples (null pooled vector and null tokens, all unmasked)."""
    length = facts.context_length or 1
    template = {"pooled": torch.zeros(n, facts.pooled_dim or net.pooled_dim, device=device),
                "tokens": torch.zeros(n, length, facts.context_dim or getattr(net, "context_dim", None) or 1, device=device),
                "mask": torch.ones(n, length, dtype=torch.bool, device=device)}  # a dropped caption: null tokens, all unmasked
    return net.null_condition(template)


def _generate(model, n: int, config: SamplerConfig, cond, noise: torch.Tensor, negative=None):
    """model.generate, with the unconditional branch of guidance replaced by ``negative`` (a condition) when given."""
    if negative is None:
        return model.generate(n, config, cond=cond, noise=noise, progress=False)
    model.null_condition = lambda _cond: negative  # one batch row, broadcast by the guidance (instance attribute only)
    try:
        return model.generate(n, config, cond=cond, noise=noise, progress=False)
    finally:
        del model.null_condition


def generate_images(p: Plan, seed: int, device: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(images (N, C, H, W), latents (N, c, h, w), NFE of each batch), prompt by prompt. Image j of every prompt
    starts from the same noise, whatever the batch size."""
    from tqdm.auto import tqdm

    from flowmatch.sampling.prompts import select

    model, shape = p.model, p.shape
    gen = torch.Generator().manual_seed(seed)
    groups = len(p.prompts) if p.prompts is not None else 1
    column_noise = torch.randn((p.num, *shape), generator=gen)
    total = groups * p.num
    images, latents, nfes = [], [], []
    starts = range(0, total, p.batch_size)
    for lo in tqdm(starts, desc="sample", unit="batch", total=len(starts), file=sys.stderr, dynamic_ncols=True):
        idx = torch.arange(lo, min(lo + p.batch_size, total))
        n = len(idx)
        noise = column_noise[idx % p.num]
        if p.prompt_cond is not None:
            cond = select(p.prompt_cond, idx // p.num)
        elif _text_conditioned(model.net):
            cond = _null_text_condition(p.facts, model.net, n, device)
        else:
            cond = None if p.cond is None else p.cond[lo : lo + n].to(device)
        x, nfe = _generate(model, n, p.config, cond, noise, p.negative_cond)
        nfes.append(nfe)
        latents.append(x.float().cpu())
        images.append(p.facts.decode(x.float()).cpu())
    return torch.cat(images).numpy(), torch.cat(latents).numpy(), nfes


# --- writing -------------------------------------------------------------------------------------------------
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


def upscale_factor(size: tuple[int, int], upscale: int) -> int:
    """--upscale, with 0 (auto) = the smallest integer factor that makes the short side >= 128 pixels."""
    return upscale if upscale > 0 else max(1, math.ceil(128 / max(1, min(size))))


def _enlarge(images: np.ndarray, factor: int) -> np.ndarray:
    return images if factor == 1 else images.repeat(factor, axis=-2).repeat(factor, axis=-1)


def captioned_grid(grid: np.ndarray, captions: list[str], rows: int) -> np.ndarray:
    """The grid with each row's caption written to its left (the picture a reader looks at first)."""
    from PIL import Image, ImageDraw, ImageFont

    height = grid.shape[0]
    row_h = (height - 2) / rows
    font = ImageFont.load_default(size=max(10, min(16, int(row_h * 0.3))))
    width = 12 + max(int(font.getlength(c)) for c in captions)
    canvas = Image.new("RGB", (width + grid.shape[1], height), "white")
    canvas.paste(Image.fromarray(grid), (width, 0))
    draw = ImageDraw.Draw(canvas)
    for i, caption in enumerate(captions[:rows]):
        draw.text((6, int(1 + (i + 0.5) * row_h)), caption, fill="black", font=font, anchor="lm")
    return np.asarray(canvas)


def write_images(out: Path, images: np.ndarray, names: list[str], rows: int, cols: int, factor: int,
                 captions: list[str] | None = None) -> dict:
    """OUT/images/NAME.png per image, and OUT/grid.png: ``rows`` x ``cols`` cells filled row by row
    (empty cells white), at most 64 x 16 of them shown; with ``captions`` (one per row: the prompts) also
    OUT/grid_captioned.png, the prompts written beside their rows. Returns the grid's shown rows and columns."""
    from PIL import Image

    from flowmatch.callbacks.plots import image_grid

    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("[0-9][0-9][0-9][0-9]*_*.png"):  # a previous run's images (its prompts may differ)
        stale.unlink()
    for image, name in zip(images, names):  # one image = a 1 x 1 grid without padding: uint8 RGB
        Image.fromarray(image_grid(_enlarge(image[None], factor), ncols=1, pad=0)).save(folder / name)
    cells = np.ones((rows * cols, *images.shape[1:]), images.dtype)  # white
    cells[: len(images)] = images
    shown_rows, shown_cols = min(rows, 64), min(cols, 16)
    shown = cells.reshape(rows, cols, *images.shape[1:])[:shown_rows, :shown_cols].reshape(-1, *images.shape[1:])
    grid = image_grid(_enlarge(shown, factor), ncols=shown_cols)
    Image.fromarray(grid).save(out / "grid.png")
    if captions:
        Image.fromarray(captioned_grid(grid, captions, shown_rows)).save(out / "grid_captioned.png")
    return {"rows": shown_rows, "cols": shown_cols}


def _image_name(p: Plan, i: int, width: int) -> str:
    from flowmatch.sampling.prompts import prompt_slug

    if p.prompts is not None:
        tag = prompt_slug(p.prompts[i // p.num])
    else:
        tag = "unconditional" if p.cond is None else f"label{int(p.cond[i])}"
    return f"{i:0{width}d}_{tag}.png"


def _print_shift(p: Plan) -> None:
    print(f"time-grid shift {p.config.shift:.4g} ({p.shift_source})")


def _main_images(args, p: Plan) -> int:
    for note in p.notes:
        print(f"warning: {note}", file=sys.stderr)
    _print_shift(p)
    start = time.time()
    images, latents, nfes = generate_images(p, args.seed, args.device)
    nfe = max(nfes)  # the same for every batch but with the adaptive dopri5
    seconds = time.time() - start
    if p.prompts is not None:  # one row per prompt
        rows, cols = len(p.prompts), p.num
    else:  # unconditional or class labels: a square-ish grid
        cols = math.ceil(math.sqrt(len(images)))
        rows = math.ceil(len(images) / cols)
    width = max(4, len(str(len(images) - 1)))
    names = [_image_name(p, i, width) for i in range(len(images))]
    factor = upscale_factor(tuple(images.shape[-2:]), args.upscale)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = write_images(out, images, names, rows, cols, factor, captions=p.prompts)
    np.save(out / "samples.npy", images.astype(np.float32))
    np.save(out / "latents.npy", latents.astype(np.float32))
    config = p.config
    info = {
        "ckpt": str(args.ckpt), "adapter": args.adapter, "adapter_scale": args.adapter_scale,
        "objective": type(p.model).__name__, "network": type(p.model.net).__name__,
        "mode": "text-to-image" if p.prompts is not None else ("class labels" if p.cond is not None else "unconditional"),
        "prompts": p.prompts, "negative_prompt": args.negative_prompt, "labels": args.labels,
        "num_per_prompt": p.num if p.prompts is not None else None, "num": len(images),
        "shape": list(images.shape), "latent_shape": list(latents.shape),
        "sampler": config.name, "solver": config.solver, "steps": config.steps, "shift": config.shift,
        "shift_source": p.shift_source, "grid": config.grid,
        "guidance": config.guidance, "seed": args.seed, "nfe": nfe, "nfe_per_batch": nfes, "batch_size": p.batch_size,
        "weights": getattr(p.model, "loaded_weights", "raw"), "seconds": round(seconds, 3),
        "seconds_per_image": round(seconds / len(images), 4),
        "data": {"from": p.info_source, "manifest": p.info.get("manifest"), "autoencoder": p.info["autoencoder"],
                 "text_encoders": [e.get("name", e.get("path")) for e in p.info.get("text_encoders", [])],
                 "shift": p.info["shift"], "scale": p.info["scale"]},
        "images": [{"file": f"images/{n}", "prompt": p.prompts[i // p.num] if p.prompts is not None else None}
                   for i, n in enumerate(names)],
        "grid_png": {"file": "grid.png", **grid}, "upscale": factor,
        "grid_captioned_png": "grid_captioned.png" if p.prompts is not None else None,
        "warnings": p.notes,
    }
    (out / "samples.json").write_text(json.dumps(info, indent=2))
    what = f"{len(p.prompts)} prompts x {p.num}" if p.prompts is not None else f"{len(images)}"
    print(f"wrote {what} images ({config.name}, NFE {nfe}, {info['weights']} weights, {seconds:.1f} s) to {out / 'images'}, "
          f"{out / 'grid.png'}, {out / 'samples.npy'} and {out / 'latents.npy'}")
    return 0


def _main_arrays(args, p: Plan) -> int:
    model, config, num = p.model, p.config, p.num
    _print_shift(p)
    start, chunks, nfe = time.time(), [], 0
    gen = torch.Generator().manual_seed(args.seed)
    for lo in range(0, num, p.batch_size):
        n = min(p.batch_size, num - lo)
        noise = torch.randn((n, *p.shape), generator=gen)
        part = None if p.cond is None else p.cond[lo : lo + n].to(args.device)
        x, nfe = model.generate(n, config, cond=part, noise=noise, progress=num > p.batch_size or config.solver != "dopri5")
        chunks.append(x.float().cpu())
    samples = torch.cat(chunks).numpy()
    seconds = time.time() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", samples)
    info = {"ckpt": str(args.ckpt), "objective": type(model).__name__, "num": num, "shape": list(samples.shape),
            "sampler": config.name, "solver": config.solver, "steps": config.steps, "shift": config.shift,
        "shift_source": p.shift_source, "grid": config.grid,
            "guidance": config.guidance, "labels": args.labels, "seed": args.seed, "nfe": nfe,
            "weights": getattr(model, "loaded_weights", "raw"), "seconds": round(seconds, 3)}
    (out / "samples.json").write_text(json.dumps(info, indent=2))
    drew = save_picture(samples, out / "samples.png", f"{type(model).__name__} {config.name} (NFE {nfe})")
    print(f"wrote {num} samples ({config.name}, NFE {nfe}, {info['weights']} weights, {seconds:.1f} s) to {out / 'samples.npy'}" + (f" and {out / 'samples.png'}" if drew else ""))
    if not drew and samples.ndim == 4:
        print("note: these are latents; give --data_dir (or --manifest) of the model's shards to decode them to images", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        p = plan(args)
    except (ValueError, OSError) as err:  # CheckpointError, PromptError, TextEncoderError, AutoencoderError, ShardFormatError ...
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _main_images(args, p) if p.mode == "images" else _main_arrays(args, p)
