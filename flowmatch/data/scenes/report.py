"""The measurements behind docs/scenes.md: how well the detector reads rendered scenes, and the ends of the GenEval scale.

    python -m flowmatch.data.scenes.report [--scenes 1000] [--classifier PATH]

- :func:`detector_accuracy`: renders held-out scenes and compares ``detect`` with their graphs, per attribute:
  ``count`` (scenes where the number of objects is right), ``shape`` / ``colour`` / ``size`` (objects, each
  true object matched to the nearest detected centre) and ``position`` (every ordered pair of objects and each
  of the four relations, read with the dead zone from the graph and from the detections: do they agree?).
- :func:`evaluation_bounds`: the GenEval-style score (flowmatch.data.scenes.geneval) of the ceiling (a render of a
  scene made for each prompt), the floors (Gaussian noise, blank backgrounds) and chance (renders of random
  scenes, which ignore the prompt: what a model that draws good scenes but ignores the text gets).
- :func:`robustness`: the ceiling again, with the renders blurred and noised (flowmatch.data.scenes.render.degrade)
  as a generator's images may be, judged with the learned shape classifier and with the closed-form rule.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import numpy as np

from flowmatch.data.scenes.detector import ShapeReader, detect
from flowmatch.data.scenes.geneval import CATEGORIES, evaluation_prompts, scene_for_prompt, score
from flowmatch.data.scenes.graph import BACKGROUNDS, DEAD_ZONE, RELATIONS, relation_holds
from flowmatch.data.scenes.render import degrade, make_scenes, render

#: the seed of the held-out scenes (the shape classifier trains on the stream (seed, 1), i.e. seed + 2**32)
HELD_OUT_SEED = 4242


def detector_accuracy(n: int = 500, seed: int = HELD_OUT_SEED, size: int = 32, classifier: ShapeReader | None = None) -> dict[str, float]:
    """Per-attribute accuracy of ``detect`` on ``n`` rendered scenes (see the module docstring), with the counts
    of ``scenes``, ``objects`` and ``relations`` compared."""
    right = dict.fromkeys(("count", "shape", "colour", "size", "position"), 0)
    objects = relations = 0
    for image, scene in make_scenes(n, seed, size):
        found = detect(image, classifier)
        right["count"] += len(found) == len(scene.objects)
        matched = [min(found, key=lambda d: (d.x - o.x) ** 2 + (d.y - o.y) ** 2) if found else None for o in scene.objects]
        for truth, seen in zip(scene.objects, matched):
            objects += 1
            for attribute in ("shape", "colour", "size"):
                right[attribute] += seen is not None and getattr(seen, attribute) == getattr(truth, attribute)
        pairs = [(i, j) for i in range(len(scene.objects)) for j in range(len(scene.objects)) if i != j]
        for i, j in pairs:
            for rel in RELATIONS:
                relations += 1
                truth = relation_holds(scene.objects[i], scene.objects[j], rel, DEAD_ZONE)
                seen_i, seen_j = matched[i], matched[j]
                right["position"] += (seen_i is not None and seen_j is not None and seen_i is not seen_j
                                      and relation_holds(seen_i, seen_j, rel, DEAD_ZONE) == truth)
    totals = {"count": n, "shape": objects, "colour": objects, "size": objects, "position": relations}
    result = {k: right[k] / max(totals[k], 1) for k in right}
    return {**result, "scenes": n, "objects": objects, "relations": relations}


def gaussian_noise(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` uint8 images of Gaussian noise (mean 127.5, standard deviation 64 levels, clipped)."""
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(127.5, 64.0, (size, size, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


def blank_backgrounds(n: int, size: int) -> list[np.ndarray]:
    """``n`` images of a plain background (the backgrounds in turn), no objects."""
    colours = list(BACKGROUNDS.values())
    return [np.full((size, size, 3), colours[i % len(colours)], np.uint8) for i in range(n)]


def evaluation_bounds(size: int = 32, classifier: ShapeReader | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """GenEval-style scores of the ceiling (``real``), the floors (``noise``, ``blank``) and ``chance``, by category."""
    prompts = evaluation_prompts()
    rng = np.random.default_rng(seed)
    real = [render(scene_for_prompt(p.claims, rng, size), size) for p in prompts]
    chance = [image for image, _ in make_scenes(len(prompts), seed + 1, size)]
    return {"real": score(real, prompts, classifier), "noise": score(gaussian_noise(len(prompts), size, seed), prompts, classifier),
            "blank": score(blank_backgrounds(len(prompts), size), prompts, classifier), "chance": score(chance, prompts, classifier)}


#: (blur in pixels at 32x32, noise in levels) of the robustness probe
DEGRADATIONS = ((0.0, 0.0), (0.0, 16.0), (0.0, 24.0), (0.5, 0.0), (0.75, 0.0), (1.0, 0.0), (1.5, 0.0), (0.75, 8.0))


def robustness(size: int = 32, classifier: ShapeReader | None = None, seed: int = 0) -> list[tuple[float, float, float, float]]:
    """(blur, noise, overall score with ``classifier``, overall score with the closed-form rule) per :data:`DEGRADATIONS`."""
    prompts = evaluation_prompts()
    rng = np.random.default_rng(seed)
    real = [render(scene_for_prompt(p.claims, rng, size), size) for p in prompts]
    rows = []
    for blur, noise in DEGRADATIONS:
        images = [degrade(image, rng, blur * size / 32, noise) for image in real]
        rows.append((blur, noise, score(images, prompts, classifier)["overall"], score(images, prompts, None)["overall"]))
    return rows


def main(argv: list[str] | None = None) -> None:
    from flowmatch.data.scenes.shape_classifier import train_shape_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1000, help="held-out scenes per image size")
    parser.add_argument("--classifier", default=None, help="where to cache the shape classifier (default: a temporary file)")
    args = parser.parse_args(argv)
    path = args.classifier or str(Path(tempfile.mkdtemp()) / "shape_classifier.safetensors")
    start = time.perf_counter()
    classifier = train_shape_classifier(0, path)
    print(f"# scenes report, {datetime.date.today()}\n\nshape classifier (seed 0): held-out accuracy {classifier.held_out_accuracy:.4f}, "
          f"closed-form rule on the same crops {classifier.rule_accuracy:.4f} ({time.perf_counter() - start:.1f} s)\n")
    print("| size | reader | scenes | objects | relations | count | shape | colour | size | position |\n|---|---|---|---|---|---|---|---|---|---|")
    for size in (32, 64):
        for name, reader in (("classifier", classifier), ("rule", None)):
            acc = detector_accuracy(args.scenes, HELD_OUT_SEED, size, reader)
            print(f"| {size} | {name} | {acc['scenes']} | {acc['objects']} | {acc['relations']} | "
                  + " | ".join(f"{acc[k]:.4f}" for k in ("count", "shape", "colour", "size", "position")) + " |")
    print("\n| size | images | " + " | ".join(CATEGORIES) + " | overall |\n|---|---|" + "---|" * (len(CATEGORIES) + 1))
    for size in (32, 64):
        for kind, scores in evaluation_bounds(size, classifier).items():
            print(f"| {size} | {kind} | " + " | ".join(f"{scores[c]:.3f}" for c in (*CATEGORIES, "overall")) + " |")
    print("\n| size | blur (px at 32) | noise (levels) | overall, classifier | overall, rule |\n|---|---|---|---|---|")
    for size in (32, 64):
        for blur, noise, learned, rule in robustness(size, classifier):
            print(f"| {size} | {blur} | {noise:g} | {learned:.3f} | {rule:.3f} |")


if __name__ == "__main__":
    main()
