"""A GenEval-style evaluation of text-to-image models on the scenes (Ghosh et al. 2023, "GenEval"; docs/spec.md §12).

GenEval asks a model for images of short compositional prompts and checks each image with an object
detector. Here the prompts are in the scenes' caption language (flowmatch.data.scenes.captions) and the
detector is flowmatch.data.scenes.detector, exact on rendered scenes, so the scale runs from 0 (noise, blank
backgrounds) to about 1 (the renders of the prompts themselves: :func:`scene_for_prompt`).

Six categories, as GenEval's, each :data:`PROMPTS_PER_CATEGORY` prompts drawn once from the seed
:data:`EVALUATION_SEED` (small categories repeat prompts: each repeat is one more image of that prompt, as
GenEval draws four images a prompt):

==============  ===========================  ==================================================================
category        prompt                       an image passes when the detector finds
==============  ===========================  ==================================================================
single_object   "a [size] triangle"          at least one such object
two_objects     "a circle and a square"      at least one of each (two different shapes)
counting        "three squares"              exactly three squares (2-4; other shapes do not count)
colors          "a blue circle"              at least one circle of that colour
position        "a circle to the left of     a circle and a square whose centres are in that relation, more
                a square"                    than the dead zone apart on its axis (flowmatch.data.scenes.graph)
color_attr      "a red circle and a blue     at least one red circle and one blue square (two different
                square"                      shapes, two different colours)
==============  ===========================  ==================================================================

An image passes only if every claim of its prompt holds in ``detect(image, classifier)``; a category's score is the share
of its images that pass and ``overall`` is the mean of the categories' scores, as in GenEval. A prompt is
held out in the sense that its seed is not one the data's scenes are drawn from; every combination of the
vocabulary can still occur in training scenes. Prompts with unknown colours or shapes raise a ValueError
naming them (flowmatch.data.scenes.captions.parse_prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flowmatch.data.scenes.captions import NUMBER_WORDS, RELATION_WORDS, Claims, ObjectSpec, parse_prompt
from flowmatch.data.scenes.detector import ShapeReader, detect
from flowmatch.data.scenes.graph import (BACKGROUNDS, COLOURS, DEAD_ZONE, RELATIONS, SHAPES, SIZES, STATED_MARGIN, Scene,
                                         SceneObject)
from flowmatch.data.scenes.render import MAX_OBJECTS, check_image_size, place_objects

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
#: the seed of the fixed prompt set (GenEval's year)
EVALUATION_SEED = 2023
PROMPTS_PER_CATEGORY = 64
#: scene_for_prompt: draws of attributes and positions tried before giving up
SCENE_TRIES = 200


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: its category, text and claims."""

    category: str
    text: str
    claims: Claims

    @classmethod
    def from_text(cls, category: str, text: str) -> "EvalPrompt":
        """Parse ``text``; a ValueError names an unknown category, colour or shape."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; categories: {', '.join(CATEGORIES)}")
        return cls(category, text, parse_prompt(text))


def _pick(rng: np.random.Generator, names: Sequence[str], k: int = 1) -> list[str]:
    return [names[i] for i in rng.choice(len(names), size=k, replace=False)]


def _prompt_text(category: str, rng: np.random.Generator) -> str:
    if category == "single_object":
        size = ([None] + list(SIZES))[rng.integers(len(SIZES) + 1)]
        return f"a {ObjectSpec(_pick(rng, SHAPES)[0], None, size).words()}"
    if category == "two_objects":
        first, second = _pick(rng, SHAPES, 2)
        return f"a {first} and a {second}"
    if category == "counting":
        return f"{NUMBER_WORDS[rng.integers(2, MAX_OBJECTS + 1)]} {_pick(rng, SHAPES)[0]}s"
    if category == "colors":
        return f"a {_pick(rng, list(COLOURS))[0]} {_pick(rng, SHAPES)[0]}"
    if category == "position":
        first, second = _pick(rng, SHAPES, 2)
        return f"a {first} {RELATION_WORDS[_pick(rng, list(RELATIONS))[0]]} a {second}"
    (c1, c2), (s1, s2) = _pick(rng, list(COLOURS), 2), _pick(rng, SHAPES, 2)
    return f"a {c1} {s1} and a {c2} {s2}"


def evaluation_prompts(seed: int = EVALUATION_SEED, per_category: int = PROMPTS_PER_CATEGORY) -> list[EvalPrompt]:
    """The prompt set: ``per_category`` prompts of each category (in the order of :data:`CATEGORIES`)."""
    rng = np.random.default_rng(seed)
    return [EvalPrompt.from_text(category, _prompt_text(category, rng)) for category in CATEGORIES for _ in range(per_category)]


def _needed(claims: Claims) -> list[ObjectSpec]:
    """The objects a scene must have for ``claims``: every count's objects, then any relation side not yet among them."""
    specs = [c.spec for c in claims.counts for _ in range(c.count)]
    for relation in claims.relations:
        for side in (relation.subject, relation.reference):
            if side not in specs or (relation.subject == relation.reference and specs.count(side) < 2):
                specs.append(side)
    return specs


def scene_for_prompt(claims: Claims, rng: np.random.Generator, image_size: int = 32) -> Scene:
    """A random scene of which every claim holds, relations with STATED_MARGIN to spare (the ceiling of the scale:
    render it and score it). Attributes a claim leaves open are drawn at random; a ValueError if no scene can do."""
    specs = _needed(claims)
    total = claims.total if claims.total is not None else len(specs)
    if not specs or len(specs) > MAX_OBJECTS or total < len(specs) or total > MAX_OBJECTS:
        raise ValueError(f"no scene of at most {MAX_OBJECTS} objects has {total} objects and needs {len(specs)}: {claims}")
    check_image_size(image_size, total)
    colours, sizes = list(COLOURS), list(SIZES)
    for _ in range(SCENE_TRIES):
        drawn = [(s.shape, s.colour or colours[rng.integers(len(colours))], s.size or sizes[rng.integers(len(sizes))]) for s in specs]
        drawn += [(SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))], sizes[rng.integers(len(sizes))])
                  for _ in range(total - len(specs))]
        objects = place_objects(rng, drawn, image_size, tries=20)
        if objects is not None and claims.holds(objects, margin=DEAD_ZONE + STATED_MARGIN):
            background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            return Scene(tuple(objects), background, int(rng.integers(2**31)))
    raise ValueError(f"no scene found for {claims} after {SCENE_TRIES} tries")


def judge(image, prompt: EvalPrompt, classifier: ShapeReader | None = None) -> list[str]:
    """Why ``image`` fails ``prompt`` (the claims that do not hold in its detections); [] if it passes."""
    return prompt.claims.failures(detect(image, classifier))


def score(images: Sequence, prompts: Sequence[EvalPrompt | tuple[str, str]], classifier: ShapeReader | None) -> dict[str, float]:
    """Per-category accuracy of ``images`` (one per prompt, in order; uint8 (H, W, 3) or float (3, H, W) in [-1, 1])
    against their ``prompts`` (EvalPrompts or (category, text) pairs), and ``overall``, the mean over the categories
    present. ``classifier`` is the detector's shape reader, given explicitly so every score says which it used: the
    trained ShapeClassifier (flowmatch.data.scenes.shape_classifier) for generated images, or None for the closed-form
    rule, which needs no training and agrees with it on clean renders."""
    prompts = [p if isinstance(p, EvalPrompt) else EvalPrompt.from_text(*p) for p in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts: score needs one image per prompt")
    passed: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts):
        passed.setdefault(prompt.category, []).append(not judge(image, prompt, classifier))
    result = {c: float(np.mean(passed[c])) for c in CATEGORIES if c in passed}
    result["overall"] = float(np.mean(list(result.values()))) if result else float("nan")
    return result


__all__ = ["CATEGORIES", "EVALUATION_SEED", "EvalPrompt", "PROMPTS_PER_CATEGORY", "evaluation_prompts", "judge",
           "scene_for_prompt", "score"]
