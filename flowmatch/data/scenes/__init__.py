"""Procedural scenes: coloured shapes on light backgrounds, with captions a program can check (issue #16).

The second built-in data set. Each image has a scene graph, so both of its captions, and any prompt, can be
checked against what a deterministic detector reads from an image: a GenEval-style evaluation whose judge
makes no mistakes on the data itself (docs/scenes.md).

- flowmatch.data.scenes.graph: the vocabulary (shapes, colours, sizes, relations) and the scene graph (JSON)
- flowmatch.data.scenes.render: random scenes and their anti-aliased images
- flowmatch.data.scenes.captions: the original and synthetic captions, and parse_prompt (caption -> claims)
- flowmatch.data.scenes.detector: image -> objects (colour segmentation, measurement, a shape reader)
- flowmatch.data.scenes.shape_classifier: the small learned shape reader, trained on rendered shapes
- flowmatch.data.scenes.geneval: the evaluation prompts and their scoring
- flowmatch.data.scenes.report: the measurements of docs/scenes.md (``python -m flowmatch.data.scenes.report``)
- flowmatch.data.scenes.source: the scenes as a data source (``prepare --source scenes``) and as images for the autoencoder
"""

from flowmatch.data.scenes.captions import Claims, original_caption, parse_prompt, synthetic_caption
from flowmatch.data.scenes.detector import DetectedObject, detect
from flowmatch.data.scenes.geneval import evaluation_prompts, scene_for_prompt, score
from flowmatch.data.scenes.graph import COLOURS, SHAPES, SIZES, Scene, SceneObject
from flowmatch.data.scenes.render import make_scenes, random_scene, render

__all__ = ["COLOURS", "SHAPES", "SIZES", "Claims", "DetectedObject", "Scene", "SceneObject", "detect", "evaluation_prompts",
           "make_scenes", "original_caption", "parse_prompt", "random_scene", "render", "scene_for_prompt", "score",
           "synthetic_caption"]
