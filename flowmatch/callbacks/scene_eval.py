"""The GenEval-style score of a text-to-image model on the procedural scenes, at every validation and test (issue #16).

At the end of each validation / test epoch the model draws one image (``per_prompt`` images) for every prompt of the
fixed evaluation set (flowmatch.data.scenes.geneval.evaluation_prompts: 64 prompts in each of six categories,
the same for every run), with every sampler setting; the images are decoded to pixels and judged by the scenes'
detector with the learned shape reader (flowmatch.data.scenes.geneval.score). The prompts reach the model exactly as
its training captions did: encoded by the data's own text encoders (the manifest's MiniLM, 64 tokens), through
:meth:`flowmatch.data.facts.LatentDataFacts.encode`, as ImageSampleMetrics encodes its label captions.

Logged (``pl_module.log``; higher is better, flowmatch.metrics.directions):

- ``{stage}/geneval_{sampler}``: the overall score, the mean of the six categories' pass rates (0 to 1);
- ``{stage}/geneval_{category}_{sampler}``: the share of the category's images that pass every claim of its prompt;
- ``{stage}/geneval_real`` (and ``geneval_real_{category}``): the ceiling, the score of renders of
  :func:`~flowmatch.data.scenes.geneval.scene_for_prompt` for the same prompts after the round trip through the data's
  latent space (autoencoder encode, float16 as prepare stores latents, the normalisation, decode): what a perfect
  generator of this latent space would score (1.000 with the lossless space-to-depth latents; below 1 if the
  autoencoder loses what the detector reads). It has no direction: it is a property of the data, not of the model.

A grid (MLflow image ``geneval``, ``test_geneval`` for `test`) shows the first prompts of each category, one cell a
prompt: the ceiling's image, then each sampler's, each framed green if it passes and red if it fails. At the end of
`validate` / `test` a table of the numbers is printed. Sampler specs are those of ImageSampleMetrics ("euler25:cfg=2"
-> euler25_cfg2); the noise is seeded, so numbers and pictures repeat across validations and runs. The shape reader is
trained on first use (~6 s on one core, flowmatch.data.scenes.shape_classifier) and cached at ``classifier``, under a
file lock so concurrent fits train it once.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from flowmatch.callbacks.common import generate_as_trained, parse_samplers
from flowmatch.callbacks.image_metrics import _uses_ema, latent_data
from flowmatch.callbacks.plots import labelled_grid
from flowmatch.data.scenes.geneval import CATEGORIES, EvalPrompt, evaluation_prompts, judge, scene_for_prompt, score
from flowmatch.data.scenes.render import render
from flowmatch.data.scenes.source import to_float, to_uint8
from flowmatch.metrics.directions import arrow
from flowmatch.tracking import log_image_to_loggers

#: where the shape reader is cached unless the config says otherwise (relative to the working directory)
DEFAULT_CLASSIFIER = "runs/feature_networks/scenes_shapes/shape_classifier.safetensors"
_PASS, _FAIL = (40, 170, 60), (215, 40, 40)


def ensure_shape_classifier(path: str | Path, seed: int = 0):
    """The scenes' shape reader cached at ``path``, trained there first if it is missing (or was trained with other
    settings) by flowmatch.data.scenes.shape_classifier.train_shape_classifier. A file lock beside ``path`` makes
    concurrent callers (fits of a study run side by side) train it once; the others wait and load it."""
    from flowmatch.data.scenes.shape_classifier import train_shape_classifier

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not out.is_file():
                print(f"shape classifier {out} not found: training it (seed {seed}, a few seconds)", flush=True)
            with torch.random.fork_rng(devices=[]):  # the run's random stream stays as it was
                return train_shape_classifier(seed, out)  # loads the cached file when its settings match
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def encode_images(facts, images: np.ndarray) -> torch.Tensor:
    """uint8 RGB images (n, H, W, 3) -> the normalised latents (n, C, h, w) the data module would serve for them: the
    data's autoencoder, float16 as prepare stores latents, then (z - shift) * scale."""
    ae = facts.autoencoder.to("cpu")
    with torch.no_grad():
        z = ae.encode(torch.from_numpy(to_float(np.asarray(images)))).float()
    return (z.half().float() - facts.shift) * facts.scale


def decode_images(facts, latents: torch.Tensor) -> np.ndarray:
    """Normalised latents -> uint8 RGB images (n, H, W, 3): the data's decode (as ImageSampleMetrics' grid), rounded."""
    return to_uint8(facts.decode(latents.float()).float().cpu())


def parse_prompts(prompts, categories, per_category) -> list[EvalPrompt]:
    """The evaluation prompts: ``prompts`` ([category, text] pairs) or the fixed set, the first ``per_category`` of each
    category, only ``categories``; a ValueError names an unknown category, colour or shape."""
    if categories is not None:
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown or not categories:
            what = f"unknown category {unknown[0]!r}" if unknown else "no category given"
            raise ValueError(f"categories {list(categories)}: {what}; the categories are {', '.join(CATEGORIES)}")
    if prompts is None:
        chosen = evaluation_prompts()
    else:
        chosen = []
        for item in prompts:
            if isinstance(item, EvalPrompt):
                chosen.append(item)
                continue
            if isinstance(item, str) or len(item) != 2:
                raise ValueError(f"prompt {item!r}: give [category, text] pairs, e.g. ['colors', 'a red circle']")
            try:
                chosen.append(EvalPrompt.from_text(*item))
            except ValueError as err:
                raise ValueError(f"evaluation prompt {list(item)!r}: {err}") from None
    if categories is not None:
        chosen = [p for p in chosen if p.category in categories]
    if per_category is not None:
        if per_category < 1:
            raise ValueError(f"per_category must be >= 1 or null (all), got {per_category}")
        kept, seen = [], dict.fromkeys(CATEGORIES, 0)
        for p in chosen:
            if seen[p.category] < per_category:
                kept.append(p)
                seen[p.category] += 1
        chosen = kept
    if not chosen:
        raise ValueError("no evaluation prompt is left (check categories and prompts)")
    return chosen


class SceneGenEval(L.Callback):
    """The GenEval-style score per sampler and category at each validation / test (see the module docstring).

    Args:
        samplers: sampler specs SOLVER[STEPS][:cfg=W][:shift=A] for validations during fit and `validate`.
        test_samplers: specs for `test` (default: ``samplers``).
        per_prompt: images drawn for each prompt (GenEval draws 4; the fixed set already repeats its small
            categories' prompts).
        categories: the categories evaluated (default: all six, flowmatch.data.scenes.geneval.CATEGORIES).
        per_category: only the first this many prompts of each category (default: all 64); a quicker, noisier score.
        prompts: [category, text] pairs replacing the fixed set (the numbers then do not compare with other runs').
        classifier: the shape reader's safetensors file, trained there on first use.
        classifier_seed: the seed it is trained with.
        seed: seed of the sampling noise.
        ceiling_seed: seed of the scenes drawn for the ceiling (``geneval_real``).
        plot: log the grid of prompts and images to MLflow.
        grid_prompts: prompts of each category shown in the grid.
        print_table: print the numbers at the end of `validate` / `test`.
    """

    def __init__(
        self,
        samplers: list[str] = ["euler25:cfg=2"],
        test_samplers: list[str] | None = None,
        per_prompt: int = 1,
        categories: list[str] | None = None,
        per_category: int | None = None,
        prompts: list[list[str]] | None = None,
        classifier: str = DEFAULT_CLASSIFIER,
        classifier_seed: int = 0,
        seed: int = 1234,
        ceiling_seed: int = 0,
        plot: bool = True,
        grid_prompts: int = 4,
        print_table: bool = True,
    ):
        self.samplers = parse_samplers(samplers)
        self.test_samplers = parse_samplers(test_samplers) if test_samplers else self.samplers
        if per_prompt < 1:
            raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
        self.prompts = [p for p in parse_prompts(prompts, categories, per_category) for _ in range(per_prompt)]
        self.categories = [c for c in CATEGORIES if any(p.category == c for p in self.prompts)]
        self.per_prompt, self.seed, self.ceiling_seed = per_prompt, seed, ceiling_seed
        self.classifier_path, self.classifier_seed = classifier, classifier_seed
        self.plot, self.grid_prompts, self.print_table = plot, grid_prompts, print_table
        self.classifier = None
        self._cond: dict[str, dict] = {}  # per data set (its manifest's location): computed once
        self._ceiling: dict[str, dict] = {}
        self.last: dict[str, float] = {}  # the latest numbers, for tests and summaries

    # ---- set-up: the shape reader, the prompts' conditions, the ceiling ----
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.classifier is None:
            self.classifier = ensure_shape_classifier(self.classifier_path, self.classifier_seed)

    def _facts(self, trainer):
        facts = latent_data(trainer.datamodule, "SceneGenEval").facts
        shape = facts.image_shape
        if not shape or shape[0] != 3 or min(shape[1:]) < 32 or shape[1] != shape[2]:
            raise RuntimeError(f"SceneGenEval judges square RGB scenes of at least 32x32 (prepare --source scenes); the data at "
                               f"{facts.location} has images of shape {shape}")
        return facts

    def condition(self, facts) -> dict:
        """The prompts' condition dict, as the model's captions: the data's text encoders (each distinct prompt once)."""
        if facts.location not in self._cond:
            texts = list(dict.fromkeys(p.text for p in self.prompts))
            encoded = facts.encode(texts)
            index = {t: i for i, t in enumerate(texts)}
            where = torch.tensor([index[p.text] for p in self.prompts])
            self._cond[facts.location] = {k: v[where] for k, v in encoded.items() if v is not None}
        return self._cond[facts.location]

    def ceiling(self, facts) -> dict:
        """Renders of scene_for_prompt for each prompt through the latent round trip, and their score (computed once)."""
        if facts.location not in self._ceiling:
            size = facts.image_shape[1]
            rng = np.random.default_rng(self.ceiling_seed)
            renders = np.stack([render(scene_for_prompt(p.claims, rng, size), size) for p in self.prompts])
            images = decode_images(facts, encode_images(facts, renders))
            self._ceiling[facts.location] = {"images": images, "scores": score(list(images), self.prompts, self.classifier)}
        return self._ceiling[facts.location]

    # ---- the evaluation ----
    def generate(self, trainer, pl_module, sampler, cond: dict) -> tuple[torch.Tensor, int]:
        """Latents for every prompt (the model's training time shift at its size unless the spec sets one)."""
        return generate_as_trained(pl_module, len(self.prompts), sampler, cond, self.seed, pl_module.sample_shape)

    def _evaluate(self, trainer, pl_module, stage: str, samplers) -> None:
        if trainer.sanity_checking:
            return
        facts = self._facts(trainer)
        if self.classifier is None:  # (a callback used without Lightning's setup)
            self.classifier = ensure_shape_classifier(self.classifier_path, self.classifier_seed)
        cond = {k: v.to(pl_module.device) for k, v in self.condition(facts).items()}
        ceiling = self.ceiling(facts)
        values = {f"{stage}/geneval_real": ceiling["scores"]["overall"]}
        values.update({f"{stage}/geneval_real_{c}": ceiling["scores"][c] for c in self.categories})
        rows, generated = [], {}
        for sampler in samplers:
            start, name = time.time(), sampler.name
            x, nfe = self.generate(trainer, pl_module, sampler, cond)
            if x.shape[0] != len(self.prompts):
                raise RuntimeError(f"SceneGenEval: the model returned {x.shape[0]} samples for {len(self.prompts)} prompts")
            images = decode_images(facts, x)
            scores = score(list(images), self.prompts, self.classifier)
            values[f"{stage}/geneval_{name}"] = scores["overall"]
            values.update({f"{stage}/geneval_{c}_{name}": scores[c] for c in self.categories})
            generated[name] = images
            rows.append({"sampler": name, "nfe": nfe, "scores": scores, "seconds": time.time() - start})
        for key, value in values.items():
            pl_module.log(key, float(value))
        self.last.update(values)
        if self.plot:
            grid = self.grid(ceiling["images"], generated, f"{stage}, step {trainer.global_step}")
            log_image_to_loggers(trainer, grid, key="geneval" if stage == "val" else f"{stage}_geneval", step=trainer.global_step)
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if self.print_table and fn in ("validate", "test") and trainer.is_global_zero:
            print(self.table(rows, ceiling["scores"], stage, "EMA" if _uses_ema(trainer) else "trained"))

    def grid(self, real: np.ndarray, generated: dict[str, np.ndarray], title: str) -> np.ndarray:
        """The first ``grid_prompts`` distinct prompts of each category: per prompt the ceiling's image, then each
        sampler's, framed green (passes) or red (fails)."""
        cells, titles = [], []
        for category in self.categories:
            picked, texts = [], set()
            for i, p in enumerate(self.prompts):
                if p.category == category and p.text not in texts and len(picked) < self.grid_prompts:
                    picked.append(i)
                    texts.add(p.text)
            cells.append([_strip([real[i], *(g[i] for g in generated.values())], self.prompts[i], self.classifier) for i in picked])
            titles.append([self.prompts[i].text for i in picked])
        caption = (f"GenEval-style prompts ({title}): in each cell the ceiling (a render of the prompt through the latent space), "
                   f"then {', '.join(generated)}; green frame = passes, red = fails")
        return labelled_grid(cells, titles, caption, row_labels=self.categories)

    def table(self, rows: list[dict], real: dict, stage: str, weights: str) -> str:
        """The numbers of one evaluation as a fixed-width text table."""
        cols = [*self.categories, "overall"]
        widths = [max(len(c), 7) + 2 for c in cols]
        head = f"{'sampler':<22}{'NFE':>6}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths)) + f"{'seconds':>9}"
        lines = [f"{stage}: GenEval-style score {arrow('geneval')} ({weights} weights; {len(self.prompts)} images, {self.per_prompt} a prompt; "
                 "NFE: network evaluations per image, 2 a step with guidance)", head, "-" * len(head),
                 f"{'real (ceiling)':<22}{'':>6}" + "".join(f"{real[c]:>{w}.3f}" for c, w in zip(cols, widths))]
        for r in rows:
            lines.append(f"{r['sampler']:<22}{r['nfe']:>6}" + "".join(f"{r['scores'][c]:>{w}.3f}" for c, w in zip(cols, widths))
                         + f"{r['seconds']:>9.1f}")
        return "\n".join(lines)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module, "val", self.samplers)

    def on_test_epoch_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module, "test", self.test_samplers)


def _strip(images: list[np.ndarray], prompt: EvalPrompt, classifier, frame: int = 2, gap: int = 3) -> np.ndarray:
    """Images side by side, each in a frame green if it passes ``prompt`` and red if it fails, white between them."""
    h, w = images[0].shape[:2]
    out = np.full((h + 2 * frame, len(images) * (w + 2 * frame + gap) - gap, 3), 255, np.uint8)
    for k, image in enumerate(images):
        left = k * (w + 2 * frame + gap)
        out[:, left : left + w + 2 * frame] = _PASS if not judge(image, prompt, classifier) else _FAIL
        out[frame : frame + h, left + frame : left + frame + w] = image
    return out


__all__ = ["DEFAULT_CLASSIFIER", "SceneGenEval", "decode_images", "encode_images", "ensure_shape_classifier", "parse_prompts"]
