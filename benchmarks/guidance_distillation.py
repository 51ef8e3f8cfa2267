"""Guidance distillation, measured: the teacher with real classifier-free guidance against the guidance-distilled student.

For each guidance scale g, both models sample the demo's held-out captions with the same sampler (Euler 25 steps by default)
and the same seeded noise: the teacher with CFG at g (conditional and unconditional halves in one doubled batch), the
student with g as its embedded input (one plain batch; docs/guidance_distillation.md). Sample quality is computed by the
demo's own metric code, flowmatch.callbacks.ImageSampleMetrics, run by `trainer.test` exactly as `python -m flowmatch test`
runs it: caption adherence on the label captions ("a 0" ... "a 9", ``--per_class`` each) and on the held-out half's
synthetic captions, Fréchet distance of the held-out captions' samples to the other held-out half and its ratio to the
real-vs-real floor, in the feature space of the demo's digit classifier. Beside them: NFE (network evaluations per
image, as the platform counts them: 2 per solver step for CFG, 1 for embedded guidance), the images a forward hook saw
pushed through the network per generated image (which must equal the NFE) and the wall-clock sampling time per image (the ODE solve only, in the
process's torch threads). Run from the repository root:

    python benchmarks/guidance_distillation.py --teacher TEACHER.ckpt --student STUDENT.ckpt
    python benchmarks/guidance_distillation.py --teacher T.ckpt --student S.ckpt --guidance 1 1.5 3 4.5 --sampler euler10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def data_module(config: str, num_workers: int):
    """The data module of a `fit` data config (configs/data/demo_digits.yaml), as the CLI builds it."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    spec = yaml.safe_load(Path(config).read_text())
    spec.setdefault("init_args", {})["num_workers"] = num_workers
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", fail_untyped=False)
    return parser.instantiate_classes(parser.parse_object({"data": spec})).data


class SamplingMeter:
    """Wraps ``model.generate`` (an instance attribute, for this process only) to time each call and count the
    network's forward calls and the images it processes (a forward hook on ``model.net``)."""

    def __init__(self, model):
        self.model, self.generate = model, model.generate
        self.calls = self.rows = 0
        self.records: dict[str, dict] = {}
        model.net.register_forward_hook(self._count)
        model.generate = self

    def _count(self, module, inputs, output) -> None:
        self.calls += 1
        self.rows += int(inputs[0].shape[0])

    def __call__(self, num, sampler=None, **kwargs):
        calls, rows = self.calls, self.rows
        start = time.perf_counter()
        x, nfe = self.generate(num, sampler, **kwargs)
        seconds = time.perf_counter() - start
        self.records[sampler.name] = {"num": num, "nfe": nfe, "calls": self.calls - calls,
                                      "passes_per_image": (self.rows - rows) / num, "ms_per_image": 1000 * seconds / num}
        return x, nfe


def evaluate(model, dm, specs: list[str], args) -> tuple[dict, dict]:
    """ImageSampleMetrics' numbers (``test/...``, the test split) and the meter's records for one model, via
    ``trainer.test`` as `python -m flowmatch test` runs it."""
    import lightning as L

    from flowmatch.callbacks import ImageSampleMetrics

    metrics = ImageSampleMetrics(samplers=specs, test_samplers=specs, feature_network=args.feature_network,
                                 feature_network_config=args.feature_network_config, per_class=args.per_class, seed=args.seed,
                                 plot=False, print_table=False)
    meter = SamplingMeter(model)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_test_batches=1,  # one batch of test loss: the metrics are what counts
                        callbacks=[metrics])
    trainer.test(model, datamodule=dm, verbose=False)
    return metrics.last, meter.records


def table(rows: list[dict], fd_real: float, args) -> str:
    head = (f"{'g':>5}  {'model':<22}{'caption acc':>12}{'synthetic':>11}{'FD':>9}{'FD/real':>9}{'NFE':>5}"
            f"{'passes/img':>12}{'ms/img':>9}")
    lines = [f"guidance distillation on the test split: {args.sampler}, seed {args.seed}, "
             f"{args.per_class} images per label caption; FD of real vs real held-out halves = {fd_real:.3f}",
             head, "-" * len(head)]
    for r in rows:
        acc = f"{100 * r['caption_acc']:.1f}%" if "caption_acc" in r else "-"
        syn = f"{100 * r['caption_acc_syn']:.1f}%" if "caption_acc_syn" in r else "-"
        lines.append(f"{r['g']:>5g}  {r['model']:<22}{acc:>12}{syn:>11}{r['fd']:>9.3f}{r['fd_ratio']:>9.2f}{r['nfe']:>5}"
                     f"{r['passes_per_image']:>12.0f}{r['ms_per_image']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the CFG-trained teacher's checkpoint (e.g. experiments/flux_d16.yaml's)")
    p.add_argument("--student", required=True,
                   help="the guidance-distilled student's checkpoint (experiments/flux_d16_guidance_distill.yaml's)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.5, 3.0], help="guidance scales g to compare")
    p.add_argument("--sampler", default="euler25",
                   help="solver and steps as in the sample metrics' specs (euler25, heun10, dopri5); the scale is added per g")
    p.add_argument("--data", default=str(ROOT / "configs/data/demo_digits.yaml"), help="the data config both models were trained on")
    p.add_argument("--per_class", type=int, default=10, help="images per label caption")
    p.add_argument("--seed", type=int, default=1234, help="seed of the sampling noise (the same for both models)")
    p.add_argument("--weights", choices=["auto", "ema", "raw"], default="auto", help="EMA weights when the checkpoints have them (auto)")
    p.add_argument("--feature_network", default="runs/feature_networks/digits_classifier/last.ckpt")
    p.add_argument("--feature_network_config", default="configs/classifier/digits.yaml", help="trains the feature network if it is missing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from flowmatch.objectives.guidance_distillation import GuidanceDistillation
    from flowmatch.objectives.loading import load_objective
    from flowmatch.sampling.guidance import embeds_guidance

    teacher = load_objective(args.teacher, weights=args.weights)
    student = load_objective(args.student, weights=args.weights)
    if embeds_guidance(teacher.net) or not embeds_guidance(student.net):
        raise SystemExit(f"--teacher must be a CFG model and --student a guidance-embedded one; got a "
                         f"{type(teacher.net).__name__} teacher (guidance_embed={embeds_guidance(teacher.net)}) and a "
                         f"{type(student.net).__name__} student (guidance_embed={embeds_guidance(student.net)})")
    if isinstance(student, GuidanceDistillation):
        student.set_teacher(teacher)  # its test / validation loss needs it (the meters count calls inside generate only)
    dm = data_module(args.data, num_workers=0)
    specs = [args.sampler + (f":cfg={g:g}" if g != 1 else "") for g in args.guidance]

    results, fd_real = {}, None
    for name, model in (("teacher", teacher), ("student", student)):
        values, records = evaluate(model, dm, specs, args)
        fd_real = values["test/fd_real"]
        results[name] = (values, records)

    from flowmatch.callbacks.common import parse_samplers

    rows = []
    for g, sampler in zip(args.guidance, parse_samplers(specs)):
        for name, label in (("teacher", "teacher (CFG)"), ("student", "student (embedded g)")):
            values, records = results[name]
            tag = sampler.name
            row = {"g": g, "model": label, **records[tag]}
            for key in ("fd", "fd_ratio", "caption_acc", "caption_acc_syn"):
                if f"test/{key}_{tag}" in values:
                    row[key] = values[f"test/{key}_{tag}"]
            rows.append(row)
    text = table(rows, fd_real, args)
    print(text)
    return text


if __name__ == "__main__":
    main()
