"""The caption language of the scenes: two captions per scene, and a reader that turns a caption back into claims.

Every caption is built from object phrases, total phrases and relation phrases, with a few filler words:

===============  ==========================================  ===================================================
phrase           form                                         claim
===============  ==========================================  ===================================================
object           a / an [size] [colour] shape                 at least one object of that description
object, counted  one..four [size] [colour] shapes             exactly that many objects of that description
reference        the [size] [colour] shape                    (no claim: names an object for a relation)
total            one..four shape(s)                           exactly that many objects in the image
relation         OBJECT [is] RELATION OBJECT                  some object matching the first is RELATION some
                                                              object matching the second
===============  ==========================================  ===================================================

RELATION is "to the left of", "to the right of", "above" or "below", read from the objects' centres with the
dead zone of flowmatch.data.scenes.graph (A is to the left of B when B's centre is more than DEAD_ZONE of the
image side to the right of A's). A description names the attributes it gives and nothing else: "a circle"
matches a circle of any colour and size.

The two captions of a scene mirror SD3's pair (docs/spec.md §7):

- :func:`original_caption`, a short and partial alt text: one object, always its shape, its colour 60% of the
  time and its size 30% of the time: "a red circle", "a triangle", "a large square".
- :func:`synthetic_caption`, a detailed and complete description, as a captioning model would write it: every
  object, with its size and colour, objects of one description counted together with a number word or "a"
  ("two small red circles and a large blue square"), the groups in random order, in one of several
  templates ("three shapes: ...", "a picture of ...", "... on a plain background"). A two-object scene is
  described by one of its relations ("a small red circle to the left of a large blue square"; two boxes are
  always far enough apart on some axis for one), and half of the 3-4 object scenes get one relation
  clause between two objects whose descriptions are unique in the scene ("...; the small red circle is above
  the large blue square"). A relation is stated only when it holds with STATED_MARGIN beyond the dead zone.

Every claim a caption makes is true of its scene. :func:`parse_prompt` reads the claims of any text in this
language (the captions, and the evaluation prompts of flowmatch.data.scenes.geneval) and raises a ValueError
that names any word it does not know, as an unknown colour or shape when the word stands where one should.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flowmatch.data.scenes.graph import COLOURS, DEAD_ZONE, RELATIONS, SHAPES, SIZES, STATED_MARGIN, Scene, relation_holds

#: counts as words (parse_prompt reads up to ten; a scene has at most four objects)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
#: relation -> the words captions use for it; parse_prompt also reads "left of" and "right of"
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
#: words that carry no claim
FILLER = frozenset({"a", "an", "and", "are", "background", "image", "is", "of", "on", "photo", "picture", "plain",
                    "showing", "sits", "there", "with"})
#: chances that the original caption names the object's colour / size
ORIGINAL_COLOUR_ODDS, ORIGINAL_SIZE_ODDS = 0.6, 0.3
#: chance that a 3-4 object synthetic caption gets a relation clause
RELATION_CLAUSE_ODDS = 0.5

# synthetic caption templates: {list} the objects, {total} "three shapes"; with a relation {A} / {B} are the two
# objects with their article ("a small red circle"), {a} / {b} without it, and {rel} the relation's words
LIST_TEMPLATES = ("{list}", "{total}: {list}", "a picture of {list}", "{list} on a plain background",
                  "an image with {total}: {list}", "{total} on a plain background: {list}")
PAIR_TEMPLATES = ("{A} {rel} {B}", "{A} is {rel} {B}", "two shapes: {A} {rel} {B}", "{A} and {B}; the {a} is {rel} the {b}",
                  "a picture of {A} {rel} {B}")
CLAUSE_TEMPLATES = ("{listing}; the {a} is {rel} the {b}", "{listing}, with the {a} {rel} the {b}")

_PLURALS = {f"{s}s": s for s in SHAPES}
_TOTAL_NOUNS = ("shape", "shapes", "object", "objects")
_RELATION_TOKENS = sorted(((tuple(words.split()), rel) for rel, words in
                           [*RELATION_WORDS.items(), ("left of", "left of"), ("right of", "right of")]),
                          key=lambda item: -len(item[0]))


# ---------------------------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """A description: a shape, and optionally a colour and a size (None: any)."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def matches(self, obj) -> bool:
        """Whether ``obj`` (anything with shape, colour and size) fits the description."""
        return (obj.shape == self.shape and (self.colour is None or obj.colour == self.colour)
                and (self.size is None or obj.size == self.size))

    def words(self, plural: bool = False) -> str:
        """"small red circle" (plural: "small red circles")."""
        return " ".join(w for w in (self.size, self.colour, self.shape + ("s" if plural else "")) if w)


@dataclass(frozen=True)
class CountClaim:
    """``count`` objects fit ``spec``: exactly (``exact``, from a number word) or at least ("a", "an")."""

    spec: ObjectSpec
    count: int
    exact: bool

    def holds(self, objects: Sequence) -> bool:
        found = sum(self.spec.matches(o) for o in objects)
        return found == self.count if self.exact else found >= self.count

    def __str__(self) -> str:
        return f"{'exactly' if self.exact else 'at least'} {self.count} {self.spec.words(self.count != 1)}"


@dataclass(frozen=True)
class RelationClaim:
    """Some object fitting ``subject`` is ``relation`` some other object fitting ``reference``."""

    subject: ObjectSpec
    relation: str
    reference: ObjectSpec

    def holds(self, objects: Sequence, margin: float = DEAD_ZONE) -> bool:
        return any(a is not b and relation_holds(a, b, self.relation, margin)
                   for a in objects if self.subject.matches(a) for b in objects if self.reference.matches(b))

    def __str__(self) -> str:
        return f"a {self.subject.words()} {RELATION_WORDS[self.relation]} a {self.reference.words()}"


@dataclass(frozen=True)
class Claims:
    """What a caption says: count claims, relation claims and, optionally, the total number of objects."""

    counts: tuple[CountClaim, ...] = ()
    relations: tuple[RelationClaim, ...] = ()
    total: int | None = None

    def failures(self, objects: Sequence, margin: float = DEAD_ZONE) -> list[str]:
        """The claims that do not hold for ``objects`` (SceneObjects or DetectedObjects), as sentences; [] if all hold."""
        failed = [f"expected {c}, found {sum(c.spec.matches(o) for o in objects)}" for c in self.counts if not c.holds(objects)]
        failed += [f"expected {r}" for r in self.relations if not r.holds(objects, margin)]
        if self.total is not None and len(objects) != self.total:
            failed.append(f"expected {self.total} objects in all, found {len(objects)}")
        return failed

    def holds(self, objects: Sequence, margin: float = DEAD_ZONE) -> bool:
        return not self.failures(objects, margin)


# ---------------------------------------------------------------------------------------------
# Writing captions
# ---------------------------------------------------------------------------------------------


def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


def _counted(spec: ObjectSpec, count: int, rng: np.random.Generator) -> str:
    """"a small red circle" / "one small red circle" / "two small red circles"."""
    if count == 1:
        return f"one {spec.words()}" if rng.random() < 0.2 else f"{_article(spec.words())} {spec.words()}"
    return f"{NUMBER_WORDS[count]} {spec.words(plural=True)}"


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _total(n: int) -> str:
    return f"{NUMBER_WORDS[n]} shape{'s' if n != 1 else ''}"


def _full(obj) -> ObjectSpec:
    return ObjectSpec(obj.shape, obj.colour, obj.size)


def stated_relations(scene: Scene) -> list[tuple[int, str, int]]:
    """(i, relation, j) for the pairs of objects with unique full descriptions where object i is ``relation`` object j
    with STATED_MARGIN to spare: the relations a caption may state."""
    objects = scene.objects
    counts = Counter(_full(o) for o in objects)
    unique = [i for i, o in enumerate(objects) if counts[_full(o)] == 1]
    return [(i, rel, j) for i in unique for j in unique if i != j for rel in RELATIONS
            if relation_holds(objects[i], objects[j], rel, DEAD_ZONE + STATED_MARGIN)]


def original_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A short, partial caption naming one object: "a red circle", "a triangle", "a large square"."""
    obj = scene.objects[rng.integers(len(scene.objects))]
    spec = ObjectSpec(obj.shape, obj.colour if rng.random() < ORIGINAL_COLOUR_ODDS else None,
                      obj.size if rng.random() < ORIGINAL_SIZE_ODDS else None)
    return f"{_article(spec.words())} {spec.words()}"


def synthetic_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A detailed, complete caption of every object, with a relation when one can be stated (see the module docstring)."""
    groups = Counter(_full(o) for o in scene.objects)
    relations = stated_relations(scene)
    if len(scene.objects) == 2 and len(groups) == 2 and relations:
        i, rel, j = relations[rng.integers(len(relations))]
        template = PAIR_TEMPLATES[rng.integers(len(PAIR_TEMPLATES))]
        a, b = _full(scene.objects[i]).words(), _full(scene.objects[j]).words()
        return template.format(A=f"{_article(a)} {a}", B=f"{_article(b)} {b}", a=a, b=b, rel=RELATION_WORDS[rel])
    specs = list(groups)
    parts = [_counted(specs[k], groups[specs[k]], rng) for k in rng.permutation(len(specs))]
    template = LIST_TEMPLATES[rng.integers(len(LIST_TEMPLATES))]
    listing = template.format(list=_listing(parts), total=_total(len(scene.objects)))
    if len(scene.objects) >= 3 and relations and rng.random() < RELATION_CLAUSE_ODDS:
        i, rel, j = relations[rng.integers(len(relations))]
        clause = CLAUSE_TEMPLATES[rng.integers(len(CLAUSE_TEMPLATES))]
        listing = clause.format(listing=listing, a=_full(scene.objects[i]).words(), b=_full(scene.objects[j]).words(),
                                rel=RELATION_WORDS[rel])
    return listing


# ---------------------------------------------------------------------------------------------
# Reading captions
# ---------------------------------------------------------------------------------------------


def _unknown(words: list[str], shape_found: bool, text: str) -> ValueError:
    """The error for unknown words in an object phrase: before a known shape they stand for colours (or sizes);
    without one, the last stands for the shape."""
    colours = words if shape_found else words[:-1]
    named = [f"colour {w!r}" for w in colours] + ([] if shape_found else [f"shape {words[-1]!r}"])
    return ValueError(f"unknown {' and '.join(named)} in prompt {text!r}; known colours: {', '.join(COLOURS)}; "
                      f"known shapes: {', '.join(SHAPES)}; known sizes: {', '.join(SIZES)}")


def _object_phrase(tokens: list[str], start: int, text: str):
    """Read [size] [colour] shape from ``start``: (ObjectSpec or None, next index). Unknown words raise; None when
    no modifier and no shape stands there (the determiner before it was a filler, as in "a picture")."""
    size = colour = None
    unknown: list[str] = []
    i = start
    while i < len(tokens):
        word = tokens[i]
        if word in SHAPES or word in _PLURALS:
            if unknown:
                raise _unknown(unknown, True, text)
            return ObjectSpec(_PLURALS.get(word, word), colour, size), i + 1
        if word in SIZES and size is None:
            size = word
        elif word in COLOURS and colour is None:
            colour = word
        elif word in SIZES or word in COLOURS:
            raise ValueError(f"prompt {text!r} gives an object two {'sizes' if word in SIZES else 'colours'} ({word!r})")
        elif _is_known(word, tokens, i):
            break
        else:
            unknown.append(word)
        i += 1
    if unknown:
        raise _unknown(unknown, False, text)
    if size or colour:
        raise ValueError(f"prompt {text!r}: {' '.join(w for w in (size, colour) if w)!r} names no shape; "
                         f"known shapes: {', '.join(SHAPES)}")
    return None, start


def _relation_at(tokens: list[str], i: int) -> tuple[str | None, int]:
    for words, rel in _RELATION_TOKENS:
        if tuple(tokens[i:i + len(words)]) == words:
            return rel, i + len(words)
    return None, i


def _is_known(word: str, tokens: list[str], i: int) -> bool:
    return (word in FILLER or word in NUMBER_WORDS or word == "the" or word in _TOTAL_NOUNS
            or _relation_at(tokens, i)[0] is not None)


def parse_prompt(text: str) -> Claims:
    """The claims of a caption or prompt (see the module docstring); a ValueError names any word it does not know."""
    tokens = re.findall(r"[a-z]+", text.lower())
    items: list[tuple] = []  # ("object", spec, determiner) | ("relation", name) | ("total", n)
    i = 0
    while i < len(tokens):
        relation, after = _relation_at(tokens, i)
        if relation is not None:
            items.append(("relation", relation))
            i = after
            continue
        word = tokens[i]
        if word in NUMBER_WORDS and i + 1 < len(tokens) and tokens[i + 1] in _TOTAL_NOUNS:
            items.append(("total", NUMBER_WORDS.index(word)))
            i += 2
            continue
        determiner = word if word in ("a", "an", "the") or word in NUMBER_WORDS else None
        spec, after = _object_phrase(tokens, i + 1 if determiner else i, text)
        if spec is not None:
            items.append(("object", spec, determiner))
            i = after
        elif _is_known(word, tokens, i):
            i += 1
        else:
            raise _unknown([word], False, text)
    return _claims(items, text)


def _claims(items: list[tuple], text: str) -> Claims:
    counts, relations, totals = [], [], []
    for k, item in enumerate(items):
        if item[0] == "object" and item[2] != "the":
            determiner = item[2]
            exact = determiner in NUMBER_WORDS
            counts.append(CountClaim(item[1], NUMBER_WORDS.index(determiner) if exact else 1, exact))
        elif item[0] == "total":
            totals.append(item[1])
        elif item[0] == "relation":
            before = [it for it in items[:k] if it[0] == "object"]
            after = [it for it in items[k + 1:] if it[0] == "object"]
            if not before or not after:
                raise ValueError(f"prompt {text!r}: {RELATION_WORDS[item[1]]!r} needs an object on each side")
            relations.append(RelationClaim(before[-1][1], item[1], after[0][1]))
    if len(set(totals)) > 1:
        raise ValueError(f"prompt {text!r} gives two different totals: {sorted(set(totals))}")
    return Claims(tuple(counts), tuple(relations), totals[0] if totals else None)


__all__ = ["CLAUSE_TEMPLATES", "Claims", "CountClaim", "FILLER", "LIST_TEMPLATES", "NUMBER_WORDS", "ObjectSpec",
           "PAIR_TEMPLATES", "RELATION_WORDS", "RelationClaim", "original_caption", "parse_prompt", "stated_relations",
           "synthetic_caption"]
