"""Sample quality of image models: Fréchet distance and caption adherence per sampler, a sample grid, a table.

At the end of each validation / test epoch the model generates images for the held-out split and
for label captions, with every sampler setting, and compares them with the split's real images:

- Fréchet distance (``{stage}/fd_{sampler}``) in the feature space of a network given by path
  (torchmetrics' FrechetInceptionDistance with a custom feature module; for the demo a small digit
  classifier trained on the training split). The held-out split is cut into two disjoint halves A and
  B (even / odd positions): the model draws one image for each caption of A and is compared with B,
  and ``{stage}/fd_real`` = FD(A, B) is the floor that real images of the same count reach;
  ``{stage}/fd_ratio_{sampler}`` = FD / floor (1 is as good as real data at this sample size).
- caption adherence: the share of images generated for the label captions ("a 7", ``per_class`` each)
  that the classifier assigns to the captioned class (``{stage}/caption_acc_{sampler}``), and the same
  for the held-out half's synthetic captions ("a thick, upright seven ...": ``caption_acc_syn_{sampler}``).
- ``{stage}/nfe_{sampler}``: network evaluations per image (classifier-free guidance counts its conditional and unconditional passes: 2 per solver evaluation).

Data with aspect-ratio buckets (``prepare`` with buckets): the held-out split is compared bucket by bucket:
``{stage}/fd_{sampler}_{bucket}`` and ``fd_ratio_..._{bucket}`` (images generated at the bucket's size for the
captions of its half A, against its half B), ``caption_acc_syn_{sampler}_{bucket}``; ``fd_ratio_{sampler}``
is then the mean of the buckets' ratios (``fd_{sampler}`` and ``fd_real`` the means of theirs). With
``placement=True`` (the demo_buckets data, whose captions say where the digit is) a generated image counts
as adherent when the digit cut from the captioned place is the captioned digit and the ink sits there
(``placement_acc_{sampler}_{bucket}``: the place alone). The grid shows one row per bucket and sampler,
padded to one size. Unless a sampler spec sets ``shift``, images of every size are sampled with the
model's training time shift at that size (flowmatch.time_shift.sampling_shift), as `sample` does.

Sampler names come from the compact specs: "euler25", "euler25:cfg=1.5" -> euler25_cfg1p5, "dopri5".
The noise is seeded, so numbers and pictures are comparable across validations and runs. Fixed-step samplers
run in the run's precision (bf16 autocast in a bf16-mixed run, ~2x faster on CPU), adaptive ones (dopri5) in
float32, whose step-size control bf16 rounding would defeat (flowmatch.callbacks.common.sampling_precision).
"""

from __future__ import annotations

import time

import lightning as L
import torch

from flowmatch.callbacks.common import generate_as_trained, parse_samplers, sampling_precision
from flowmatch.callbacks.plots import image_grid
from flowmatch.data.facts import facts_of
from flowmatch.metrics.directions import arrow
from flowmatch.data.reference import reference_batch, reference_buckets
from flowmatch.tracking import log_image_to_loggers


def digit_captions(num_classes: int = 10) -> list[str]:
    """The demo's label captions "a 0" ... "a 9" (its original captions)."""
    from flowmatch.data.digits import original_caption

    return [original_caption(k) for k in range(num_classes)]


def latent_data(datamodule, user: str = "ImageSampleMetrics"):
    """The latent/caption data module whose held-out split the metrics compare with: the data module itself,
    or, for text couplings (reflow), the latent/caption data the couplings were drawn from (``user``: the callback
    named in the error for other data)."""
    data = getattr(datamodule, "latent_data", datamodule)
    if facts_of(data) is None:
        raise RuntimeError(f"{user} needs latent/caption data (a LatentShardDataModule, or text couplings with "
                           f"their reference data), got {type(datamodule).__name__}")
    return data


def _concat_cond(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a if a[k] is not None and k in b}


def _take(cond: dict, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in cond.items() if v is not None}


class ImageSampleMetrics(L.Callback):
    """Fréchet distance, caption adherence and a sample grid per sampler at each validation / test (see module doc).

    Args:
        samplers: sampler specs SOLVER[STEPS][:cfg=W][:shift=A], evaluated at every validation during fit
            and by `validate`, e.g. ["euler25:cfg=1.5"].
        test_samplers: specs for `test` (default: ``samplers``), e.g. Euler 1/2/5/25 and dopri5, each with
            and without guidance.
        feature_network: checkpoint of the feature network (a classifier for caption adherence), or a
            TorchScript file mapping images to features (then no caption adherence is reported).
        feature_network_config: a `fit` config that trains the feature network when ``feature_network``
            does not exist yet (for the demo: configs/classifier/digits.yaml); None = it must exist.
        class_captions: caption of each class, index = class (default: the demo's "a 0" ... "a 9").
        per_class: images generated per class caption.
        seed: seed of the sampling noise.
        plot: log a grid (one row of real held-out images, then one row per sampler, one column per class caption).
        print_table: print a table of the numbers at the end of `validate` / `test`.
        placement: judge the synthetic captions' placement too (the demo_buckets data; see the module doc).
    """

    def __init__(
        self,
        samplers: list[str] = ["euler25:cfg=1.5"],
        test_samplers: list[str] | None = None,
        feature_network: str = "runs/feature_networks/digits_classifier/last.ckpt",
        feature_network_config: str | None = "configs/classifier/digits.yaml",
        class_captions: list[str] | None = None,
        per_class: int = 10,
        seed: int = 1234,
        plot: bool = True,
        print_table: bool = True,
        placement: bool = False,
    ):
        self.samplers = parse_samplers(samplers)
        self.test_samplers = parse_samplers(test_samplers) if test_samplers else self.samplers
        self.feature_network_path, self.feature_network_config = feature_network, feature_network_config
        self.class_captions = list(class_captions) if class_captions is not None else digit_captions()
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        self.per_class, self.seed, self.plot, self.print_table = per_class, seed, plot, print_table
        self.placement = placement
        self._features = None
        self._reference: dict[str, dict] = {}
        self.last: dict[str, float] = {}  # the latest numbers, for tests and summaries

    # ---- set-up: the feature network, the held-out reference ----
    def setup(self, trainer, pl_module, stage: str) -> None:
        from flowmatch.metrics.frechet import ensure_feature_network, load_feature_network

        path = ensure_feature_network(self.feature_network_path, self.feature_network_config)
        with torch.random.fork_rng(devices=[]):  # building it draws random weights: leave the run's stream as it was
            self._features = load_feature_network(path)

    def _reference_for(self, trainer, split: str) -> dict:
        """The split's halves A / B as images, A's conditions, the label captions' conditions, and FD(A, B)."""
        if split in self._reference:
            return self._reference[split]
        from flowmatch.metrics.frechet import frechet_distance, frechet_metric

        data = latent_data(trainer.datamodule)
        facts = data.facts
        if facts.buckets:
            return self._bucket_references(data, split)
        n = data.num_samples(split)
        batch = reference_batch(data, n or 512, split=split)
        if batch["x0"].shape[0] < 4:
            raise RuntimeError(f"the {split} split has {batch['x0'].shape[0]} samples: too few for a Fréchet distance")
        if "label" not in batch:
            raise RuntimeError(f"the {split} shards carry no labels: caption adherence needs them")
        images = facts.decode(batch["x0"]).float().cpu()
        idx = torch.arange(images.shape[0])
        a, b = idx[0::2][: len(idx[1::2])], idx[1::2]  # equal halves
        label_caps = [cap for cap in self.class_captions for _ in range(self.per_class)]
        ref = {
            "real_a": images[a], "real_b": images[b], "labels_a": batch["label"][a], "synthetic_a": batch["synthetic"][a],
            "cond_a": _take(batch["cond"], a),
            "cond_labels": facts.encode(label_caps),
            "labels_l": torch.arange(len(self.class_captions)).repeat_interleave(self.per_class),
        }
        ref["fd_real"] = frechet_distance(ref["real_a"], ref["real_b"], self._features)
        ref["fd_metric"] = frechet_metric(self._features, reset_real_features=False)  # B's statistics, computed once
        ref["fd_metric"].update(ref["real_b"], real=True)
        self._reference[split] = ref
        return ref

    def _bucket_references(self, data, split: str) -> dict:
        """Per bucket: halves A / B of the split's images, A's conditions and captions, FD(A, B); and the label captions."""
        from flowmatch.metrics.frechet import frechet_distance, frechet_metric

        facts = data.facts
        label_caps = [cap for cap in self.class_captions for _ in range(self.per_class)]
        ref = {"buckets": {}, "cond_labels": facts.encode(label_caps),
               "labels_l": torch.arange(len(self.class_captions)).repeat_interleave(self.per_class)}
        for name, batch in reference_buckets(data, split).items():
            if batch["x0"].shape[0] < 4 or "label" not in batch:
                continue  # too few for a Fréchet distance (or unlabelled): this bucket is left out and said so in the table
            images = facts.decode(batch["x0"]).float().cpu()
            idx = torch.arange(images.shape[0])
            a, b = idx[0::2][: len(idx[1::2])], idx[1::2]
            one = {"real_a": images[a], "real_b": images[b], "labels_a": batch["label"][a], "synthetic_a": batch["synthetic"][a],
                   "captions_a": [batch["caption"][i] for i in a.tolist()], "cond_a": _take(batch["cond"], a),
                   "shape": tuple(batch["x0"].shape[1:])}
            syn = one["synthetic_a"]
            if self._features.num_classes > 0 and bool(syn.any()):  # the judge on real images: the ceiling of the adherence
                real = self._synthetic_adherence(one["real_a"][syn], [c for c, s in zip(one["captions_a"], syn.tolist()) if s],
                                                 one["labels_a"][syn])
                one["real_acc_syn"] = real["caption_acc_syn"]
            one["fd_real"] = frechet_distance(one["real_a"], one["real_b"], self._features)
            one["fd_metric"] = frechet_metric(self._features, reset_real_features=False)
            one["fd_metric"].update(one["real_b"], real=True)
            ref["buckets"][name] = one
        if not ref["buckets"]:
            raise RuntimeError(f"no bucket of the {split} split has 4 labelled samples: too few for a Fréchet distance")
        ref["fd_real"] = sum(r["fd_real"] for r in ref["buckets"].values()) / len(ref["buckets"])
        self._reference[split] = ref
        return ref

    def _generate(self, pl_module, num: int, sampler, cond: dict, shape) -> tuple[torch.Tensor, int]:
        """Images' latents at ``shape`` (the training time shift at that size unless the spec sets one)."""
        return generate_as_trained(pl_module, num, sampler, cond, self.seed, shape)

    def _evaluate_buckets(self, trainer, pl_module, stage: str, samplers, ref: dict) -> None:
        facts = latent_data(trainer.datamodule).facts
        classifies = self._features.num_classes > 0
        values: dict[str, float] = {f"{stage}/fd_real": ref["fd_real"]}
        values.update({f"{stage}/caption_acc_syn_real_{b}": r["real_acc_syn"] for b, r in ref["buckets"].items() if "real_acc_syn" in r})
        table, rows = [], []
        to_device = lambda cond: {k: v.to(pl_module.device) for k, v in cond.items()}  # noqa: E731
        for sampler in samplers:
            start, name = time.time(), sampler.name
            x, nfe = self._generate(pl_module, len(ref["labels_l"]), sampler, to_device(ref["cond_labels"]), pl_module.sample_shape)
            gen_l = facts.decode(x.float()).float().cpu()
            row = {"sampler": name, "nfe": nfe, "buckets": {}}
            if classifies:
                row["caption_acc"] = float((self._predict_digit(gen_l) == ref["labels_l"]).float().mean())
            for bucket, r in ref["buckets"].items():
                x, _ = self._generate(pl_module, r["real_a"].shape[0], sampler, to_device(r["cond_a"]), r["shape"])
                gen_a = facts.decode(x.float()).float().cpu()
                metric = r["fd_metric"]
                metric.reset()
                metric.update(gen_a, real=False)
                fd = float(metric.compute())
                one = {"fd": fd, "fd_ratio": fd / max(r["fd_real"], 1e-12)}
                syn = r["synthetic_a"]
                if classifies and bool(syn.any()):
                    one.update(self._synthetic_adherence(gen_a[syn], [c for c, s in zip(r["captions_a"], syn.tolist()) if s],
                                                         r["labels_a"][syn]))
                row["buckets"][bucket] = one
                for key, value in one.items():
                    values[f"{stage}/{key}_{name}_{bucket}"] = float(value)
                rows.append(gen_a[: len(self.class_captions)])
            per = list(row["buckets"].values())
            row["fd"] = sum(b["fd"] for b in per) / len(per)
            row["fd_ratio"] = sum(b["fd_ratio"] for b in per) / len(per)
            if per and all("caption_acc_syn" in b for b in per):
                row["caption_acc_syn"] = sum(b["caption_acc_syn"] for b in per) / len(per)
            row["seconds"] = time.time() - start
            for key in ("nfe", "fd", "fd_ratio", "caption_acc", "caption_acc_syn"):
                if key in row:
                    values[f"{stage}/{key}_{name}"] = float(row[key])
            table.append(row)
        for key, value in values.items():
            pl_module.log(key, value)
        self.last.update(values)
        if self.plot:
            real = [r["real_b"][: len(self.class_captions)] for r in ref["buckets"].values()]
            grid = image_grid(pad_to_one_size(real + rows).numpy(), ncols=len(self.class_captions))
            log_image_to_loggers(trainer, grid, key="samples" if stage == "val" else f"{stage}_samples", step=trainer.global_step)
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if self.print_table and fn in ("validate", "test") and trainer.is_global_zero:
            real = {b: r["real_acc_syn"] for b, r in ref["buckets"].items() if "real_acc_syn" in r}
            print(format_table(table, ref["fd_real"], stage, weights="EMA" if _uses_ema(trainer) else "trained", real_syn=real))

    def _predict_digit(self, images: torch.Tensor) -> torch.Tensor:
        """The digit each picture shows: with ``placement`` the square where its ink is, cut out at the classifier's size
        (a tall or wide picture is not a digit the classifier knows: on the demo's real 40x24 pictures the whole picture
        is classified right 8% of the time, its digit square 100%); else the whole picture."""
        if not self.placement:
            return self._features.predict(images)
        from flowmatch.data.placed_digits import digit_crop, placement_of_image

        return self._features.predict(digit_crop(images, placement_of_image(images)))

    def _synthetic_adherence(self, images: torch.Tensor, captions: list[str], labels: torch.Tensor) -> dict:
        """Share of images that show the captioned digit (and, with ``placement``, show it where the caption says)."""
        if not self.placement:
            return {"caption_acc_syn": float((self._features.predict(images) == labels).float().mean())}
        from flowmatch.data.placed_digits import digit_crop, placement_of_caption, placement_of_image

        wanted = [placement_of_caption(c) for c in captions]
        right_digit = self._features.predict(digit_crop(images, wanted)) == labels
        right_place = torch.tensor([g == w for g, w in zip(placement_of_image(images), wanted)])
        return {"caption_acc_syn": float((right_digit & right_place).float().mean()), "placement_acc": float(right_place.float().mean())}

    # ---- the evaluation ----
    def _evaluate(self, trainer, pl_module, stage: str, samplers) -> None:
        if trainer.sanity_checking:
            return
        if latent_data(trainer.datamodule).facts.buckets:
            ref = self._reference_for(trainer, "test" if stage == "test" else "val")
            return self._evaluate_buckets(trainer, pl_module, stage, samplers, ref)
        facts = latent_data(trainer.datamodule).facts
        ref = self._reference_for(trainer, "test" if stage == "test" else "val")
        cond = _concat_cond(ref["cond_a"], ref["cond_labels"])
        cond = {k: v.to(pl_module.device) for k, v in cond.items()}
        n_a = ref["real_a"].shape[0]
        classifies = self._features.num_classes > 0
        values: dict[str, float] = {f"{stage}/fd_real": ref["fd_real"]}
        rows, table = [ref["real_b"][: len(self.class_captions)]], []
        for sampler in samplers:
            start = time.time()
            with sampling_precision(trainer, sampler):
                x, nfe = pl_module.generate(cond["pooled"].shape[0], sampler, cond=cond, seed=self.seed)
            images = facts.decode(x.float()).float().cpu()
            gen_a, gen_l = images[:n_a], images[n_a:]
            name = sampler.name
            metric = ref["fd_metric"]
            metric.reset()  # keeps the real half's statistics
            metric.update(gen_a, real=False)
            fd = float(metric.compute())
            row = {"sampler": name, "nfe": nfe, "fd": fd, "fd_ratio": fd / max(ref["fd_real"], 1e-12)}
            if classifies:
                pred_l = self._features.predict(gen_l)
                row["caption_acc"] = float((pred_l == ref["labels_l"]).float().mean())
                syn = ref["synthetic_a"]
                if bool(syn.any()):
                    pred_a = self._features.predict(gen_a)
                    row["caption_acc_syn"] = float((pred_a[syn] == ref["labels_a"][syn]).float().mean())
            row["seconds"] = time.time() - start
            for key in ("nfe", "fd", "fd_ratio", "caption_acc", "caption_acc_syn"):
                if key in row:
                    values[f"{stage}/{key}_{name}"] = float(row[key])
            table.append(row)
            rows.append(gen_l[:: self.per_class])  # the first image of each class caption
        for key, value in values.items():
            pl_module.log(key, value)
        self.last.update(values)
        if self.plot:
            grid = image_grid(torch.cat(rows).numpy(), ncols=len(self.class_captions))
            key = "samples" if stage == "val" else f"{stage}_samples"
            log_image_to_loggers(trainer, grid, key=key, step=trainer.global_step)
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if self.print_table and fn in ("validate", "test") and trainer.is_global_zero:
            print(format_table(table, ref["fd_real"], stage, weights="EMA" if _uses_ema(trainer) else "trained"))

    def on_validation_epoch_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module, "val", self.samplers)

    def on_test_epoch_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module, "test", self.test_samplers)


def _uses_ema(trainer) -> bool:
    from flowmatch.callbacks.ema import EMA

    return any(isinstance(cb, EMA) and cb.use_for_eval for cb in trainer.callbacks)


def format_table(rows: list[dict], fd_real: float, stage: str, weights: str, real_syn: dict[str, float] | None = None) -> str:
    """The numbers of one evaluation as a fixed-width text table (``real_syn``: per bucket, the synthetic-caption
    adherence the judge gives the held-out real images, the ceiling of the generated images')."""
    head = (f"{'sampler':<22}{'NFE':>6}{'FD ' + arrow('fd'):>9}{'FD/real ' + arrow('fd_ratio'):>11}{'caption acc ' + arrow('caption_acc'):>15}"
            f"{'synthetic ' + arrow('caption_acc_syn'):>13}{'seconds':>9}")
    lines = [f"{stage}: sample quality ({weights} weights; FD of real vs real held-out halves = {fd_real:.3f}; "
             "NFE: network evaluations per image, 2 a step with guidance)", head, "-" * len(head)]
    if real_syn:
        lines.append(f"{'real images':<22}{'':>6}{'':>9}{'':>11}{'':>15}{100 * sum(real_syn.values()) / len(real_syn):>12.1f}%")
        lines += [f"{'  ' + b:<22}{'':>6}{'':>9}{'':>11}{'':>15}{100 * v:>12.1f}%" for b, v in real_syn.items()]
    for r in rows:
        acc = f"{100 * r['caption_acc']:.1f}%" if "caption_acc" in r else "-"
        syn = f"{100 * r['caption_acc_syn']:.1f}%" if "caption_acc_syn" in r else "-"
        lines.append(f"{r['sampler']:<22}{r['nfe']:>6}{r['fd']:>9.3f}{r['fd_ratio']:>11.2f}{acc:>15}{syn:>13}{r['seconds']:>9.1f}")
        for bucket, b in r.get("buckets", {}).items():  # data with aspect-ratio buckets: each bucket under its sampler
            syn = f"{100 * b['caption_acc_syn']:.1f}%" if "caption_acc_syn" in b else "-"
            lines.append(f"{'  ' + bucket:<22}{'':>6}{b['fd']:>9.3f}{b['fd_ratio']:>11.2f}{'':>15}{syn:>13}")
    return "\n".join(lines)


def pad_to_one_size(groups: list[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
    """Image batches of different sizes (one per bucket) centred on canvases of the largest height and width (grey
    by default), concatenated: one grid can then show every aspect ratio."""
    h = max(g.shape[-2] for g in groups)
    w = max(g.shape[-1] for g in groups)
    out = []
    for g in groups:
        canvas = torch.full((*g.shape[:-2], h, w), fill, dtype=g.dtype)
        top, left = (h - g.shape[-2]) // 2, (w - g.shape[-1]) // 2
        canvas[..., top : top + g.shape[-2], left : left + g.shape[-1]] = g
        out.append(canvas)
    return torch.cat(out)


__all__ = ["ImageSampleMetrics", "digit_captions", "format_table"]
