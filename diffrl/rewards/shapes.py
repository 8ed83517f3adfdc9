"""A verifier reward for the toy world (:mod:`diffrl.toyworld`): which stated attributes does an
image satisfy? Measured from pixels, robust to the blur and colour shifts of a small VAE.

Foreground = saturated pixels (max - min channel > 0.25; the background is grey). Each foreground
pixel takes the nearest of the four reference colours. Single objects: the dominant colour's
pixels form the object; colour, position (centroid), size (bounding extent) and shape (best IoU
against ideal circle / square / triangle masks of the same box) are checked. Pairs: each stated
object is found by its colour; its presence, its shape and the relation between the centroids are
checked. The reward is the fraction of checks passed, in [0, 1]; ``exact`` is 1 when all pass.
An image with no object, or whose "object" covers most of it (noise), passes no check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffrl import geneval
from diffrl import toyworld as tw
from diffrl.geneval import Detection

_REFERENCE = np.array(list(tw.COLORS.values()), np.float32) / 255  # [4, 3]
_COLOR_NAMES = list(tw.COLORS)
SATURATION = 0.25
MIN_AREA, MAX_FRACTION = 5, 0.5
SINGLE_ATTRIBUTES = ("color", "shape", "size", "position")
PAIR_ATTRIBUTES = ("color", "shape", "relation")


@dataclass
class ShapesScore:
    """Verifier output for a batch.

    Attributes:
        score: fraction of stated checks satisfied, ``[B]`` float32 in [0, 1].
        exact: 1.0 where every check passed, ``[B]`` float32.
        attributes: per attribute name, the fraction of that attribute's checks passed, ``[B]``
            float32, NaN where the prompt states no such attribute.
    """

    score: torch.Tensor
    exact: torch.Tensor
    attributes: dict[str, torch.Tensor]


def _segment(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[H, W, 3]`` floats -> (foreground mask ``[H, W]``, colour index ``[H, W]``)."""
    saturation = image.max(-1) - image.min(-1)
    distance = ((image[:, :, None, :] - _REFERENCE[None, None]) ** 2).sum(-1)
    return saturation > SATURATION, distance.argmin(-1)


def _ideal_mask(shape: str, x0: int, x1: int, y0: int, y1: int) -> np.ndarray:
    """Ideal ``[SIZE, SIZE]`` mask of ``shape`` filling the box [x0, x1) x [y0, y1)."""
    ys, xs = np.mgrid[0 : tw.SIZE, 0 : tw.SIZE] + 0.5
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "circle":
        return ((xs - cx) / hx) ** 2 + ((ys - cy) / hy) ** 2 <= 1
    inside = (np.abs(xs - cx) <= hx) & (np.abs(ys - cy) <= hy)
    if shape == "square":
        return inside
    return inside & (np.abs(xs - cx) <= (ys - y0) / (2 * hy) * hx + 0.5)  # apex up, base down


def _shape_ious(mask: np.ndarray) -> tuple[dict[str, float], tuple[int, int, int, int]]:
    """IoU of ``mask`` with the ideal mask of each shape filling its box, and the box
    ``(x0, x1, y0, y1)``."""
    ys, xs = np.nonzero(mask)
    box = (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1)
    ious = {}
    for shape in tw.SHAPES:
        ideal = _ideal_mask(shape, *box)
        ious[shape] = float((ideal & mask).sum() / max(1, (ideal | mask).sum()))
    return ious, box


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(best-matching shape, extent in pixels) by IoU against ideal masks filling the same box."""
    ious, box = _shape_ious(mask)
    return max(ious, key=ious.get), float(max(box[1] - box[0], box[3] - box[2]))


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return xs.mean() + 0.5, ys.mean() + 0.5


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - tw.SIZE / 2, cy - tw.SIZE / 2
    if max(abs(dx), abs(dy)) < 4:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _check_single(obj: tw.ObjectSpec, fg: np.ndarray, colors: np.ndarray) -> dict[str, float]:
    if fg.sum() < MIN_AREA or fg.mean() > MAX_FRACTION:
        return dict.fromkeys(SINGLE_ATTRIBUTES, 0.0)
    dominant = np.bincount(colors[fg], minlength=len(_COLOR_NAMES)).argmax()
    mask = fg & (colors == dominant)
    shape, extent = _classify_shape(mask)
    size = "small" if extent < (tw.SIZES["small"] + tw.SIZES["large"]) else "large"
    return {
        "color": float(_COLOR_NAMES[dominant] == obj.color),
        "shape": float(shape == obj.shape),
        "size": float(size == obj.size),
        "position": float(_position(*_centroid(mask)) == obj.position),
    }


def _relation_holds(relation: str, first: tuple[float, float], second: tuple[float, float]) -> bool:
    margin = 2.0
    (x1, y1), (x2, y2) = first, second
    return {
        "to the left of": x1 < x2 - margin,
        "to the right of": x1 > x2 + margin,
        "above": y1 < y2 - margin,
        "below": y1 > y2 + margin,
    }[relation]


def _check_pair(scene: tw.Scene, fg: np.ndarray, colors: np.ndarray) -> dict[str, float]:
    if fg.sum() < MIN_AREA or fg.mean() > MAX_FRACTION:
        return dict.fromkeys(PAIR_ATTRIBUTES, 0.0)
    present, shapes, centres = [], [], []
    for obj in scene.objects:
        mask = fg & (colors == _COLOR_NAMES.index(obj.color))
        found = mask.sum() >= MIN_AREA
        present.append(found)
        shapes.append(found and _classify_shape(mask)[0] == obj.shape)
        centres.append(_centroid(mask) if found else None)
    relation = all(present) and _relation_holds(scene.relation, centres[0], centres[1])
    return {"color": float(np.mean(present)), "shape": float(np.mean(shapes)), "relation": float(relation)}


def _checks_per_attribute(scene: tw.Scene) -> dict[str, int]:
    return (
        dict.fromkeys(SINGLE_ATTRIBUTES, 1)
        if scene.relation is None
        else {"color": 2, "shape": 2, "relation": 1}
    )


def score_shapes(images: torch.Tensor, prompts: list[str]) -> ShapesScore:
    """Verify ``[B, 3, H, W]`` images in [0, 1] against toy-world captions (see module doc)."""
    if images.shape[-2:] != (tw.SIZE, tw.SIZE):
        images = torch.nn.functional.interpolate(images.float(), size=(tw.SIZE, tw.SIZE), mode="area")
    arrays = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    names = sorted(set(SINGLE_ATTRIBUTES) | set(PAIR_ATTRIBUTES))
    attributes = {n: torch.full((len(prompts),), float("nan")) for n in names}
    score, exact = torch.zeros(len(prompts)), torch.zeros(len(prompts))
    for i, (array, prompt) in enumerate(zip(arrays, prompts)):
        scene = tw.parse(prompt)
        fg, colors = _segment(array)
        checks = (
            _check_single(scene.objects[0], fg, colors)
            if scene.relation is None
            else _check_pair(scene, fg, colors)
        )
        weights = _checks_per_attribute(scene)
        for name, value in checks.items():
            attributes[name][i] = value
        passed = sum(checks[n] * weights[n] for n in checks)
        score[i] = passed / sum(weights.values())
        exact[i] = float(score[i] == 1.0)
    return ShapesScore(score=score, exact=exact, attributes=attributes)


# ---------------------------------------------------------------------------- GenEval on the toy world

TOY_THRESHOLDS = (0.6, 0.45)
"""Confidence thresholds of the toy detector (counting, other tasks), the roles of GenEval's
(0.9, 0.3) for Mask2Former: clean renders score 0.75-1.0 (see tests/test_geneval.py)."""


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean ``[H, W]`` mask, as boolean masks."""
    seen, found = np.zeros_like(mask), []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        part, stack = np.zeros_like(mask), [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            part[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        found.append(part)
    return found


def detect(image: np.ndarray) -> list[Detection]:
    """The toy world's object detector on a float ``[SIZE, SIZE, 3]`` image in [0, 1]: each
    8-connected component of foreground pixels of one reference colour (at least MIN_AREA
    pixels) is an object; its class is the shape whose ideal mask fills its box best, its
    ``score`` that IoU, its colour the reference colour. An image that is mostly foreground
    (noise) has no objects."""
    fg, colors = _segment(image)
    if fg.mean() > MAX_FRACTION:
        return []
    detections = []
    for index, name in enumerate(_COLOR_NAMES):
        for part in components(fg & (colors == index)):
            if part.sum() < MIN_AREA:
                continue
            ious, (x0, x1, y0, y1) = _shape_ious(part)
            shape = max(ious, key=ious.get)
            detections.append(
                Detection(shape, ious[shape], (float(x0), float(y0), float(x1), float(y1)), name)
            )
    return detections


def detect_batch(images: torch.Tensor, rows=None) -> list[list[Detection]]:
    """:func:`detect` on each of ``[B, 3, H, W]`` images in [0, 1] (resized to the world's size).
    ``rows`` (the images' GenEval rows, which an open-vocabulary detector is asked for) is not
    needed: the toy detector finds every object."""
    if images.shape[-2:] != (tw.SIZE, tw.SIZE):
        images = torch.nn.functional.interpolate(images.float(), size=(tw.SIZE, tw.SIZE), mode="area")
    arrays = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [detect(array) for array in arrays]


def toy_geneval(strict: bool = False):
    """Reward factory: flow_grpo's GenEval partial credit (:func:`diffrl.geneval.partial_credit`)
    of toy-world GenEval prompts (``a photo of three triangles``), from :func:`detect`; with
    ``strict``, GenEval's own 0/1 verdict instead (a sparse reward). Writes ``geneval_correct``
    (the strict verdict) into each sample's metadata."""

    def reward(images, prompts, metadata):
        values = torch.zeros(len(prompts))
        for i, (detections, prompt) in enumerate(zip(detect_batch(images), prompts)):
            row = tw.geneval_row(prompt)
            by_class = geneval.select(detections, row["tag"], TOY_THRESHOLDS)
            metadata[i]["geneval_correct"] = float(geneval.correct(by_class, row)[0])
            values[i] = metadata[i]["geneval_correct"] if strict else geneval.partial_credit(by_class, row)
        return values

    reward.min_size = tw.SIZE
    return reward


def shapes_alignment():
    """Reward factory: the toy-world verifier score in [0, 1].

    The returned reward also writes ``exact_match`` and each checked attribute into every
    sample's metadata dict, so callers (the trainer, ``diffrl eval``) can report them.
    """

    def reward(images, prompts, metadata):
        result = score_shapes(images, prompts)
        for i, meta in enumerate(metadata):
            meta["exact_match"] = result.exact[i].item()
            meta.update({k: v[i].item() for k, v in result.attributes.items() if not torch.isnan(v[i])})
        return result.score

    reward.min_size = tw.SIZE  # the verifier reads shapes and colours at the world's size
    return reward
