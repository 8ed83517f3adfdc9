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
    """Captions of a split (``train`` | ``heldout``) and kind (``single`` | ``pair`` | ``all``)."""
    if split not in ("train", "heldout") or kind not in ("single", "pair", "all"):
        raise ValueError(f"split must be train|heldout and kind single|pair|all, got {split!r}, {kind!r}")
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
    """Render a caption as a uint8 ``[SIZE, SIZE, 3]`` image (positions jittered by ``seed``)."""
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
