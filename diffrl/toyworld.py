"""A toy text-to-image world: procedural 32x32 scenes of coloured shapes, their captions, and fixed
train / held-out prompt splits.

Single objects: "a {size} {color} {shape} {position}", e.g. "a small red circle on the left".
Pairs: "a {color} {shape} {relation} a {color} {shape}", e.g. "a red circle to the left of a blue
square" (two different colours, so each object can be found by its colour). Held-out prompts are
attribute combinations never rendered in training: single objects whose (color, shape, position)
triple is held out (with both sizes), and pairs whose ordered (color, shape, color, shape) tuple is
held out (with every relation). Every single attribute value still appears in training.
"""

from __future__ import annotations

import copy
import functools
import itertools
import random
import re
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32
"""Image side in pixels."""

BACKGROUND = (245, 245, 245)
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 4.0, "large": 8.0}
"""Half-extent in pixels of a shape of each size (pairs use 5)."""
PAIR_HALF_EXTENT = 5.0
POSITIONS = {"left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24), "center": (16, 16)}
"""(x, y) centre of each named position."""
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATIONS = ("to the left of", "to the right of", "above", "below")

HELDOUT_FRACTION = 0.2
_SPLIT_SEED = 20241128


@dataclass(frozen=True)
class ObjectSpec:
    """One object: colour, shape, and either a named size and position or a pair slot."""

    color: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Scene:
    """A parsed caption: one object (with size and position) or two objects and a relation."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


# ---------------------------------------------------------------------------- captions


def caption(scene: Scene) -> str:
    """The canonical caption of a scene."""
    if scene.relation is None:
        (o,) = scene.objects
        return f"a {o.size} {o.color} {o.shape} {POSITION_PHRASES[o.position]}"
    a, b = scene.objects
    return f"a {a.color} {a.shape} {scene.relation} a {b.color} {b.shape}"


_COLOR, _SHAPE = "|".join(COLORS), "|".join(SHAPES)
_SINGLE = re.compile(rf"^a (small|large) ({_COLOR}) ({_SHAPE}) ({'|'.join(POSITION_PHRASES.values())})$")
_PAIR = re.compile(rf"^a ({_COLOR}) ({_SHAPE}) ({'|'.join(RELATIONS)}) a ({_COLOR}) ({_SHAPE})$")
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def parse(prompt: str) -> Scene:
    """Parse a toy-world caption; raises ``ValueError`` naming the prompt if it is not one."""
    text = " ".join(prompt.lower().split())
    if m := _SINGLE.match(text):
        size, color, shape, phrase = m.groups()
        return Scene((ObjectSpec(color, shape, size, _PHRASE_TO_POSITION[phrase]),))
    if m := _PAIR.match(text):
        c1, s1, relation, c2, s2 = m.groups()
        if c1 == c2:
            raise ValueError(f"toy-world pair {prompt!r}: the two objects must have different colours")
        return Scene((ObjectSpec(c1, s1), ObjectSpec(c2, s2)), relation)
    raise ValueError(f"not a toy-world caption: {prompt!r}")


# ---------------------------------------------------------------------------- prompt splits


def _all_singles() -> list[Scene]:
    return [
        Scene((ObjectSpec(c, s, z, p),)) for z in SIZES for c in COLORS for s in SHAPES for p in POSITIONS
    ]


def _all_pairs() -> list[Scene]:
    objects = [(c, s) for c in COLORS for s in SHAPES]
    return [
        Scene((ObjectSpec(*a), ObjectSpec(*b)), r)
        for a, b in itertools.permutations(objects, 2)
        if a[0] != b[0]
        for r in RELATIONS
    ]


def _heldout_keys() -> tuple[set, set]:
    rng = random.Random(_SPLIT_SEED)
    triples = sorted(itertools.product(COLORS, SHAPES, POSITIONS))
    tuples = sorted({(a.color, a.shape, b.color, b.shape) for a, b in (s.objects for s in _all_pairs())})
    return (
        set(rng.sample(triples, round(HELDOUT_FRACTION * len(triples)))),
        set(rng.sample(tuples, round(HELDOUT_FRACTION * len(tuples)))),
    )


def _is_heldout(scene: Scene, keys: tuple[set, set]) -> bool:
    if scene.relation is None:
        o = scene.objects[0]
        return (o.color, o.shape, o.position) in keys[0]
    a, b = scene.objects
    return (a.color, a.shape, b.color, b.shape) in keys[1]


def prompts(split: str = "train", kind: str = "single") -> list[str]:
    """Captions of a split (``train`` | ``heldout``) and kind (``single`` | ``pair`` | ``all``
    (single and pair) | ``geneval`` (GenEval's six tasks, :func:`geneval_rows`))."""
    if split not in ("train", "heldout") or kind not in ("single", "pair", "all", "geneval"):
        raise ValueError(
            f"split must be train|heldout and kind single|pair|all|geneval, got {split!r}, {kind!r}"
        )
    if kind == "geneval":
        return [row["prompt"] for row in geneval_rows(split)]
    scenes = {"single": _all_singles(), "pair": _all_pairs(), "all": _all_singles() + _all_pairs()}[kind]
    keys = _heldout_keys()
    return [caption(s) for s in scenes if _is_heldout(s, keys) == (split == "heldout")]


# ---------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    """Boolean ``[SIZE, SIZE]`` mask of a shape centred at (cx, cy) with half-extent ``half``."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    # upward isosceles triangle: apex at the top centre, base at the bottom
    top, bottom = cy - half, cy + half
    frac = (ys - top) / (2 * half)
    return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= frac * half)


def _pair_centres(relation: str, rng: random.Random) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of the first and second object so that ``relation`` holds (jittered)."""
    near, far, mid = 9.0, 23.0, 16.0
    j = lambda: rng.uniform(-2, 2)
    if relation == "to the left of":
        return (near + j(), mid + j()), (far + j(), mid + j())
    if relation == "to the right of":
        return (far + j(), mid + j()), (near + j(), mid + j())
    if relation == "above":
        return (mid + j(), near + j()), (mid + j(), far + j())
    return (mid + j(), far + j()), (mid + j(), near + j())


def render(prompt: str, seed: int = 0) -> np.ndarray:
    """Render a caption (or a GenEval prompt, :func:`render_row`) as a uint8 ``[SIZE, SIZE, 3]``
    image (positions jittered by ``seed``)."""
    if prompt.startswith("a photo of"):
        return render_row(geneval_row(prompt), seed)
    scene, rng = parse(prompt), random.Random(seed)
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = BACKGROUND
    if scene.relation is None:
        o = scene.objects[0]
        x, y = POSITIONS[o.position]
        half = SIZES[o.size] * rng.uniform(0.9, 1.1)
        image[_shape_mask(o.shape, x + rng.uniform(-1.5, 1.5), y + rng.uniform(-1.5, 1.5), half)] = COLORS[
            o.color
        ]
    else:
        for o, (x, y) in zip(scene.objects, _pair_centres(scene.relation, rng)):
            image[_shape_mask(o.shape, x, y, PAIR_HALF_EXTENT * rng.uniform(0.9, 1.1))] = COLORS[o.color]
    return image


def render_batch(prompts_: list[str], seed: int = 0) -> torch.Tensor:
    """Float images ``[B, 3, SIZE, SIZE]`` in [0, 1], image i rendered with seed ``seed + i``."""
    arrays = np.stack([render(p, seed + i) for i, p in enumerate(prompts_)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------------------- GenEval's six tasks
#
# Prompts follow GenEval's templates; each row carries GenEval's metadata (diffrl.geneval) and is
# rendered from it. The image stays 32 px: four objects of 7-9 px fit a 2 x 2 grid of 16 px cells
# with gaps between them (so a connected-component detector separates them), the ×4 VAE keeps
# each of them 2 x 2 latent cells, and the CPU pretraining budget (pixels per step) and the
# shipped model's size stay what they are; 48 or 64 px would cost 2.25-4x both.

NUMBERS = ("one", "two", "three", "four")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
CELLS = ((8, 8), (24, 8), (8, 24), (24, 24))
"""Centres of the 2 x 2 grid of cells that multi-object scenes place objects in."""
_GENEVAL_SEED = 20261202


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _geneval_all() -> dict[str, list[dict]]:
    """Every GenEval-style row of the toy world, by task (``tag``)."""
    pairs = list(itertools.permutations(SHAPES, 2))
    rows = {
        "single_object": [
            {"prompt": f"a photo of a {s}", "include": [{"class": s, "count": 1}]} for s in SHAPES
        ],
        "two_object": [
            {
                "prompt": f"a photo of a {a} and a {b}",
                "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            }
            for a, b in itertools.combinations(SHAPES, 2)
        ],
        "counting": [
            {
                "prompt": f"a photo of {NUMBERS[n - 1]} {_plural(s, n)}",
                "include": [{"class": s, "count": n}],
                "exclude": [{"class": s, "count": n + 1}],
            }
            for s in SHAPES
            for n in range(1, 5)
        ],
        "colors": [
            {"prompt": f"a photo of a {c} {s}", "include": [{"class": s, "count": 1, "color": c}]}
            for c in COLORS
            for s in SHAPES
        ],
        "position": [
            {
                "prompt": f"a photo of a {a} {r} a {b}",
                "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [r, 0]}],
            }
            for a, b in pairs
            for r in GENEVAL_RELATIONS
        ],
        "color_attr": [
            {
                "prompt": f"a photo of a {ca} {a} and a {cb} {b}",
                "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            }
            for a, b in pairs
            for ca, cb in itertools.permutations(COLORS, 2)
        ],
    }
    return {tag: [{"tag": tag, **row} for row in task] for tag, task in rows.items()}


def _values(row: dict) -> set:
    """The single attribute values a row states (each must still be seen in training)."""
    values = set()
    for item in row["include"]:
        values |= {("class", item["class"]), ("count", item["count"]), ("color", item.get("color"))}
        if "position" in item:
            values.add(("relation", item["position"][0]))
    return values


def _geneval_heldout() -> set[str]:
    """Held-out prompts: a fixed HELDOUT_FRACTION of the combinations of counting (shape, number),
    colors (colour, shape), position (shape, relation, shape) and color_attr rows, drawn so that
    every single value still occurs in training. single_object and two_object have no combination
    beyond the shapes themselves, so they hold none out."""
    rng, heldout = random.Random(_GENEVAL_SEED), set()
    for tag, rows in _geneval_all().items():
        if tag in ("single_object", "two_object"):
            continue
        while True:
            chosen = rng.sample(rows, round(HELDOUT_FRACTION * len(rows)))
            train_values = set().union(*(_values(r) for r in rows if r not in chosen))
            if set().union(*(_values(r) for r in rows)) <= train_values:
                break
        heldout |= {r["prompt"] for r in chosen}
    return heldout


def geneval_rows(split: str = "heldout") -> list[dict]:
    """GenEval-layout rows of a split, all six tasks: ``train`` (rendered in pretraining) or
    ``heldout`` (the combinations never rendered, plus single_object and two_object, which have
    none); ``all`` is both."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train|heldout|all, got {split!r}")
    heldout = _geneval_heldout()
    rows = [row for task in _geneval_all().values() for row in task]
    if split == "all":
        return rows
    keep_all = ("single_object", "two_object")
    return [r for r in rows if r["tag"] in keep_all or ((r["prompt"] in heldout) == (split == "heldout"))]


def geneval_row(prompt: str) -> dict:
    """The GenEval row of a toy-world GenEval prompt; raises ``ValueError`` naming it otherwise."""
    row = _rows_by_prompt().get(" ".join(prompt.lower().split()))
    if row is None:
        raise ValueError(f"not a toy-world GenEval prompt: {prompt!r}")
    return copy.deepcopy(row)


@functools.cache
def _rows_by_prompt() -> dict[str, dict]:
    return {r["prompt"]: r for task in _geneval_all().values() for r in task}


def render_row(row: dict, seed: int = 0) -> np.ndarray:
    """Render a GenEval row of the toy world as a uint8 ``[SIZE, SIZE, 3]`` image: single-object
    scenes one large object near the centre; the others their objects in distinct cells of the
    2 x 2 grid (jittered), a position row's object on the stated side of its target. Colours not
    stated are drawn at random."""
    rng = random.Random(seed)
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = BACKGROUND
    objects = [(item, k) for item in row["include"] for k in range(item["count"])]
    if row["tag"] in ("single_object", "colors"):
        (item, _), half = objects[0], rng.uniform(5.5, 7.0)
        centres = [(16 + rng.uniform(-3, 3), 16 + rng.uniform(-3, 3))]
    elif row["tag"] == "position":
        relation = row["include"][1]["position"][0]
        mover, target = _pair_centres(
            {"left of": "to the left of", "right of": "to the right of"}.get(relation, relation), rng
        )
        centres, half = [target, mover], None
    else:
        cells = rng.sample(CELLS, len(objects))
        centres, half = [(x + rng.uniform(-1.5, 1.5), y + rng.uniform(-1.5, 1.5)) for x, y in cells], None
    for (item, _), (x, y) in zip(objects, centres):
        color = item.get("color") or rng.choice(list(COLORS))
        extent = half or rng.uniform(4.5, 5.2)
        image[_shape_mask(item["class"], x, y, extent)] = COLORS[color]
    return image
