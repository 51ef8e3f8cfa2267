"""The LoRA demo, measured: does a fine-tuned model draw the new concept, and does it still draw the old captions?

The concept (flowmatch/data/sideways.py): "a sideways 7" = the digit turned 90 degrees counter-clockwise, a word the
demo's captions never contain. For each model (the base, the fine-tuned one) this script generates, with the main
job's metric sampler (Euler 25 steps, classifier-free guidance 1.5, seeded noise, float32):

- the new captions "a sideways 0" ... "a sideways 9", ``--n_per_class`` images each: the **sideways rate** (share the
  orientation classifier judges turned), the **digit rate** (share that is the captioned digit once turned back
  clockwise) and the **new-caption adherence** (both at once) (flowmatch/metrics/orientation.py);
- the old captions "a 0" ... "a 9" from the same noise: their sideways rate (does the concept leak into them?);
- and the old captions' numbers exactly as the main job reports them: the ImageSampleMetrics callback run by
  ``trainer.test`` on the demo's test split (data/demo, 180 held-out digits): **old-caption adherence**
  (``caption_acc``: the digit classifier's share of the captioned digit), adherence to the held-out synthetic
  captions, and the Fréchet distance of the held-out captions' samples to the other held-out half, with its ratio to
  the real-vs-real floor.

It prints a table, writes OUT/results.json (the numbers and settings) and OUT/grid.png (per model: a row for the first
images of the new captions, a row for the old ones from the same noise; columns the digits 0..9). Run from the
repository root:

    python benchmarks/lora_concept.py --base runs/base/mmdit_d16_main.ckpt --tuned runs/EXP/RUN/checkpoints/last.ckpt
    python benchmarks/lora_concept.py --base BASE.ckpt --adapter DIR    # the base plus a diffusers LoRA (export-lora's DIR)
    python benchmarks/lora_concept.py --base BASE.ckpt --tuned LORA.ckpt --adapter_scale 0 0.5 1 --no_fd   # a row per scale

``--tuned`` is any checkpoint ``flowmatch.objectives.loading.load_objective`` loads (a LoRA fine-tune's included: it
reads its frozen base from the file it was trained from). Without ``--tuned`` (or with ``--tuned`` = ``--base``) the
base is measured once and repeated: the before numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLER = "euler25:cfg=1.5"


def data_module(config: str, num_workers: int = 0):
    """The data module of a `fit` data config (configs/data/demo_digits.yaml), as the CLI builds it."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    spec = yaml.safe_load(Path(config).read_text())
    spec.setdefault("init_args", {})["num_workers"] = num_workers
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", fail_untyped=False)
    return parser.instantiate_classes(parser.parse_object({"data": spec})).data


def load_model(ckpt: str, adapter: str | None, weights: str):
    """A checkpoint as load_objective rebuilds it, with a LoRA adapter (a diffusers LoRA file or directory) attached when given."""
    from flowmatch.objectives.loading import load_objective

    model = load_objective(ckpt, weights=weights)
    if adapter is not None:  # as `python -m flowmatch sample --ckpt BASE --adapter DIR` attaches it
        from flowmatch.adapters.diffusers_lora import attach_lora
        from flowmatch.adapters.lora import has_lora

        if has_lora(model.net):
            raise SystemExit(f"{ckpt} already carries a LoRA adapter: give its base as --base with --adapter, or it as --tuned")
        attach_lora(model.net, adapter)
    return model


def concept_images(model, captions_new: list[str], captions_old: list[str], n_per_class: int, seed: int, sampler) -> dict:
    """Images (decoded, [-1, 1]) for the new and the old label captions, ``n_per_class`` each; image j of every
    caption (new or old) starts from the same noise."""
    from flowmatch.data.facts import LatentDataFacts

    info = getattr(model, "data_info", None)
    if not info:
        raise SystemExit("the checkpoint records no data (text encoders, autoencoder): it cannot be given prompts")
    facts = LatentDataFacts.from_record(info)
    gen = torch.Generator().manual_seed(seed)
    column_noise = torch.randn((n_per_class, *model.sample_shape), generator=gen)
    out = {}
    for name, captions in (("new", captions_new), ("old", captions_old)):
        caps = [c for c in captions for _ in range(n_per_class)]
        cond = facts.encode(caps)
        noise = column_noise.repeat(len(captions), *([1] * len(model.sample_shape)))
        start = time.perf_counter()
        with torch.no_grad():
            x, nfe = model.generate(len(caps), sampler, cond=cond, noise=noise)
        out[name] = facts.decode(x.float()).float().cpu()
        out[f"{name}_seconds"] = time.perf_counter() - start
        out["nfe"] = nfe
    out["shift_scale"] = (facts.shift, facts.scale)
    return out


def evaluate_model(model, label, ckpt, adapter, scale, dm, args, sampler, captions_new, captions_old, labels, orientation, digits):
    """The numbers of one model (a table row) and its images."""
    from flowmatch.metrics.orientation import caption_adherence, concept_adherence, sideways_rate

    imgs = concept_images(model, captions_new, captions_old, args.n_per_class, args.seed, sampler)
    row = {"model": label, "checkpoint": str(ckpt), "adapter": adapter, "adapter_scale": scale,
           "weights": getattr(model, "loaded_weights", "raw"),
           **concept_adherence(imgs["new"], labels, orientation, digits),
           "old_sideways_rate": sideways_rate(imgs["old"], orientation),
           "old_label_adherence_same_noise": caption_adherence(imgs["old"], labels, digits),
           "nfe": imgs["nfe"], "seconds_new": round(imgs["new_seconds"], 1), "seconds_old": round(imgs["old_seconds"], 1),
           "latent_shift_scale": list(imgs["shift_scale"])}
    if dm is not None:
        row.update(old_caption_metrics(model, dm, args))
    else:  # without the callback: the same computation on this script's own "a k" images
        row["old_caption_adherence"] = row["old_label_adherence_same_noise"]
    return row, imgs


def old_caption_metrics(model, dm, args) -> dict:
    """ImageSampleMetrics' numbers on the test split (``test/...``), via ``trainer.test`` as `python -m flowmatch test` runs it."""
    import lightning as L

    from flowmatch.callbacks import ImageSampleMetrics

    metrics = ImageSampleMetrics(samplers=[SAMPLER], test_samplers=[SAMPLER], feature_network=args.digit_classifier,
                                 feature_network_config="configs/classifier/digits.yaml", per_class=args.n_per_class,
                                 seed=args.seed, plot=False, print_table=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_test_batches=1, callbacks=[metrics])
    trainer.test(model, datamodule=dm, verbose=False)
    tag = metrics.test_samplers[0].name
    keys = {"caption_acc": "old_caption_adherence", "caption_acc_syn": "old_synthetic_adherence", "fd": "old_fd",
            "fd_ratio": "old_fd_ratio"}
    out = {new: metrics.last[f"test/{key}_{tag}"] for key, new in keys.items() if f"test/{key}_{tag}" in metrics.last}
    out["fd_real"] = metrics.last["test/fd_real"]
    return out


def grid_picture(rows: list[tuple[str, torch.Tensor]], path: Path, upscale: int = 3) -> None:
    """A labelled grid: one row per (label, images (10, 1, H, W)), columns the digits 0..9."""
    from PIL import Image, ImageDraw, ImageFont

    from flowmatch.callbacks.plots import image_grid

    images = torch.cat([r[1] for r in rows]).numpy()
    images = images.repeat(upscale, axis=-2).repeat(upscale, axis=-1)
    grid = image_grid(images, ncols=rows[0][1].shape[0], pad=4)
    cell = images.shape[-1] + 4
    margin = 190
    top = 22
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0] + top), "white")
    canvas.paste(Image.fromarray(grid), (margin, top))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=15)
    for k in range(rows[0][1].shape[0]):
        draw.text((margin + 4 + k * cell + cell // 2, top // 2), str(k), fill="black", font=font, anchor="mm")
    for i, (label, _) in enumerate(rows):
        draw.text((8, top + 4 + i * cell + cell // 2), label, fill="black", font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def table(results: list[dict], args) -> str:
    cols = [("sideways_rate", "sideways"), ("digit_rate", "digit"), ("new_caption_adherence", "new adh."),
            ("old_sideways_rate", "old sideways"), ("old_caption_adherence", "old adh."), ("old_synthetic_adherence", "old syn. adh.")]
    head = f"{'model':<11}" + "".join(f"{h:>14}" for _, h in cols) + f"{'old FD':>9}{'FD/real':>9}"
    lines = [f"LoRA concept demo: {SAMPLER} (Euler 25 steps, guidance 1.5), seed {args.seed}, {args.n_per_class} images per caption",
             head, "-" * len(head)]
    for r in results:
        cells = "".join(f"{100 * r[k]:>13.1f}%" if k in r else f"{'-':>14}" for k, _ in cols)
        fd = f"{r['old_fd']:>9.3f}{r['old_fd_ratio']:>9.2f}" if "old_fd" in r else f"{'-':>9}{'-':>9}"
        lines.append(f"{r['model']:<11}{cells}{fd}")
    lines += [
        "sideways: share of the 'a sideways k' images the orientation classifier judges turned 90 degrees counter-clockwise",
        "digit: share of them that are digit k once turned back; new adh.: both (the new-caption adherence)",
        "old sideways: share of the 'a k' images (same noise) judged turned; old adh.: the main job's caption_acc on 'a k'"
        + (" (here on this script's own 'a k' images)" if args.no_fd else ""),
        "old syn. adh. / old FD: the main job's callback on data/demo's test split"
        + (f" (FD of real vs real halves = {results[0]['fd_real']:.3f})" if "fd_real" in results[0] else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base model's checkpoint (the main job's: runs/base/mmdit_d16_main.ckpt)")
    p.add_argument("--tuned", default=None, help="the fine-tuned checkpoint (default: the base itself, or the base plus --adapter)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter of the base: a diffusers LoRA file or directory (pytorch_lora_weights."
                   "safetensors, from export-lora); the tuned model = base + adapter")
    p.add_argument("--adapter_scale", type=float, nargs="+", default=[1.0],
                   help="scale(s) of the tuned model's LoRA update, one row each (0 = the base, 1 = as trained), e.g. 0 0.5 1")
    p.add_argument("--n_per_class", type=int, default=10, help="images per caption (new, old, and the old label captions of the metric)")
    p.add_argument("--out", default="docs/results/lora_concept", help="folder for results.json and grid.png")
    p.add_argument("--seed", type=int, default=1234, help="seed of the sampling noise (the same for every model and caption)")
    p.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto", help="EMA weights when a checkpoint has them (auto)")
    p.add_argument("--data", default=str(ROOT / "configs/data/demo_digits.yaml"), help="the data config of the old captions' metrics")
    p.add_argument("--digit_classifier", default="runs/feature_networks/digits_classifier/last.ckpt")
    p.add_argument("--orientation_classifier", default="runs/feature_networks/orientation_classifier/last.ckpt",
                   help="trained on first use (~10 s)")
    p.add_argument("--no_fd", action="store_true", help="skip the old captions' callback metrics (FD, synthetic-caption adherence)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.n_per_class < 1:
        raise SystemExit(f"--n_per_class must be >= 1, got {args.n_per_class}")
    if args.adapter is not None and args.tuned is not None:
        raise SystemExit("give --tuned CKPT or --adapter DIR, not both")
    for flag, path in (("--base", args.base), ("--tuned", args.tuned), ("--adapter", args.adapter)):
        if path is not None and not Path(path).exists():
            raise SystemExit(f"{flag} {path}: no such file or folder")
    if args.threads:
        torch.set_num_threads(args.threads)

    from flowmatch.callbacks.common import parse_samplers
    from flowmatch.data.digits import original_caption
    from flowmatch.data.sideways import sideways_caption
    from flowmatch.metrics.frechet import ensure_feature_network, load_feature_network
    from flowmatch.metrics.orientation import load_orientation_classifier

    sampler = parse_samplers([SAMPLER])[0]
    digits = load_feature_network(ensure_feature_network(args.digit_classifier, "configs/classifier/digits.yaml"))
    orientation = load_orientation_classifier(args.orientation_classifier)
    captions_new = [sideways_caption(k) for k in range(10)]
    captions_old = [original_caption(k) for k in range(10)]
    labels = torch.arange(10).repeat_interleave(args.n_per_class)
    dm = None if args.no_fd else data_module(args.data)

    tuned = args.tuned or args.base
    results, grid_rows = [], []
    for name, ckpt, adapter in (("base", args.base, None), ("tuned", tuned, args.adapter)):
        if results and adapter is None and Path(ckpt).resolve() == Path(args.base).resolve():  # the base again: the same numbers
            results.append({**results[0], "model": name})
            grid_rows += [(f"{name}: {label.split(': ', 1)[1]}", images) for label, images in grid_rows[:2]]
            print(f"{name}: the base itself (numbers and images repeated)")
            continue
        model = load_model(ckpt, adapter, args.weights)
        scales = [None] if name == "base" else args.adapter_scale
        if name == "tuned" and scales != [1.0]:
            from flowmatch.adapters.lora import has_lora

            if not has_lora(model.net):
                raise SystemExit(f"--adapter_scale {scales}: {ckpt} carries no LoRA adapter (give a LoRA run's checkpoint or --adapter)")
        for scale in scales:
            label = name if scale is None or len(scales) == 1 and scale == 1.0 else f"{name}@{scale:g}"
            if scale is not None:
                from flowmatch.adapters.lora import has_lora, set_lora_scale

                if has_lora(model.net):
                    set_lora_scale(model.net, scale)
            start = time.perf_counter()
            row, imgs = evaluate_model(model, label, ckpt, adapter, scale, dm, args, sampler, captions_new, captions_old, labels,
                                       orientation, digits)
            row["seconds"] = round(time.perf_counter() - start, 1)
            results.append(row)
            first = slice(0, None, args.n_per_class)  # the first image of each caption
            grid_rows += [(f"{label}: a sideways k", imgs["new"][first]), (f"{label}: a k", imgs["old"][first])]
            print(f"{label}: {ckpt}{' + ' + adapter if adapter else ''} ({row['weights']} weights"
                  f"{'' if scale is None else f', adapter scale {scale:g}'}) done in {row['seconds']} s", flush=True)
        del model

    text = table(results, args)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid_picture(grid_rows, out / "grid.png")
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}",
              "sampler": SAMPLER, "seed": args.seed, "n_per_class": args.n_per_class, "captions_new": captions_new,
              "captions_old": captions_old, "old_metrics_split": None if args.no_fd else "test", "results": results, "table": text}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    return report


if __name__ == "__main__":
    main()
