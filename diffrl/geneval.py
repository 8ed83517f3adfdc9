"""GenEval's prompt layout and scoring rule (Ghosh et al., NeurIPS 2023 D&B), detector-agnostic.

A GenEval prompt file is JSON lines, one row per prompt::

    {"tag": "position", "prompt": "a photo of a circle left of a square",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["left of", 0]}]}

``tag`` is one of :data:`TAGS`; each ``include`` item asks for at least ``count`` objects of
``class``, optionally of a ``color``, optionally in a ``position`` relation to the objects matched
for an earlier include item (its index); ``exclude`` items ask for fewer than ``count``
(counting rows exclude ``n + 1``, so exactly n). An image is turned into :class:`Detection` s by
a detector (the toy world's is :func:`diffrl.rewards.shapes.detect`; a real one, e.g. GenEval's
Mask2Former with CLIP colour classification, can feed the same rule), then :func:`correct`
applies GenEval's rule, :func:`partial_credit` flow_grpo's training reward, and
:func:`summarize` the per-task accuracies whose mean is GenEval's Overall score.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from diffrl.errors import InputFileError
from diffrl.files import atomic_write_bytes

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six tasks, in the order of its table (Single / Two / Counting / Colors / Position /
Attribution)."""
TABLE_NAMES = ("Single", "Two", "Counting", "Colors", "Position", "Attribution")
RELATIONS = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1
"""A relation ignores centre offsets up to this fraction of the two boxes' summed sides."""
MAX_PER_CLASS = 16


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` is ``(x0, y0, x1, y1)`` in pixels, ``score`` the detector's
    confidence in [0, 1], ``color`` a colour name (None when the detector gives none)."""

    cls: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None


# ---------------------------------------------------------------------------- the file layout


def check_row(row, where: str) -> None:
    """Raise :class:`InputFileError` (``where``: file and line) unless ``row`` has GenEval's layout."""

    def bad(problem: str):
        raise InputFileError(f"{where}: {problem}")

    if not isinstance(row, dict):
        bad(f"expected a JSON object, got {type(row).__name__}")
    if row.get("tag") not in TAGS:
        bad(f"'tag' must be one of {list(TAGS)}, got {row.get('tag')!r}")
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        bad("'prompt' must be a non-empty string")
    include = row.get("include")
    if not isinstance(include, list) or not include:
        bad("'include' must be a non-empty list")
    for i, item in enumerate(include):
        if not isinstance(item, dict) or not isinstance(item.get("class"), str):
            bad(f"include[{i}] needs a string 'class'")
        count = item.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            bad(f"include[{i}].count must be an integer >= 1, got {count!r}")
        if "color" in item and not isinstance(item["color"], str):
            bad(f"include[{i}].color must be a string")
        if "position" in item:
            position = item["position"]
            ok = isinstance(position, list) and len(position) == 2 and position[0] in RELATIONS
            if not ok or not isinstance(position[1], int) or not 0 <= position[1] < i:
                bad(f"include[{i}].position must be [one of {list(RELATIONS)}, an earlier include index]")
    for i, item in enumerate(row.get("exclude", [])):
        count = item.get("count") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("class"), str) or not isinstance(count, int):
            bad(f"exclude[{i}] needs a string 'class' and an integer 'count'")


def read_suite(path: str | Path) -> list[dict]:
    """The rows of a GenEval-layout JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such GenEval prompt file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputFileError(f"{path}:{number}: {err.msg}") from err
        check_row(row, f"{path}:{number}")
        rows.append(row)
    if not rows:
        raise InputFileError(f"{path}: holds no prompts")
    return rows


def write_suite(path: str | Path, rows: list[dict]) -> None:
    """Write rows as GenEval-layout JSONL (atomically)."""
    for i, row in enumerate(rows):
        check_row(row, f"row {i}")
    atomic_write_bytes(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


# ---------------------------------------------------------------------------- the rule


def select(
    detections: list[Detection], tag: str, thresholds: tuple[float, float]
) -> dict[str, list[Detection]]:
    """Per class, the detections above the task's confidence threshold (``thresholds`` =
    (counting, other tasks); GenEval's are (0.9, 0.3) for Mask2Former), most confident first, at
    most :data:`MAX_PER_CLASS`."""
    low = thresholds[0] if tag == "counting" else thresholds[1]
    by_class: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score >= low and len(by_class.setdefault(d.cls, [])) < MAX_PER_CLASS:
            by_class[d.cls].append(d)
    return by_class


def relations(a: Detection, b: Detection) -> set[str]:
    """The relations of ``a`` to ``b`` from their boxes: the centre offset, shrunk towards zero by
    :data:`POSITION_THRESHOLD` times the summed box sides, then normalised by the offset's length;
    a component beyond ±0.5 names the relation ("left of" when a is left of b, y grows downwards)."""
    centre = lambda d: ((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2)  # noqa: E731
    side = lambda d: (d.box[2] - d.box[0], d.box[3] - d.box[1])  # noqa: E731
    (ax, ay), (bx, by) = centre(a), centre(b)
    offset = (ax - bx, ay - by)
    length = math.hypot(*offset)
    revised = [
        math.copysign(max(abs(o) - POSITION_THRESHOLD * (sa + sb), 0.0), o)
        for o, sa, sb in zip(offset, side(a), side(b))
    ]
    if length == 0 or all(abs(r) < 1e-3 for r in revised):
        return set()
    dx, dy = revised[0] / length, revised[1] / length
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def correct(by_class: dict[str, list[Detection]], row: dict) -> tuple[bool, list[str]]:
    """GenEval's rule on :func:`select` ed detections: every include item finds at least ``count``
    of its class; its colour and position are checked on its ``count`` most confident ones (each
    against every object matched for the target item); every exclude item finds fewer than
    ``count``. Returns ``(correct, reasons it is not)``."""
    reasons, matched = [], []
    for item in row["include"]:
        cls, n = item["class"], item["count"]
        found = by_class.get(cls, [])[:n]
        ok = len(found) >= n
        if not ok:
            reasons.append(f"expected {cls} >= {n}, found {len(found)}")
        if ok and "color" in item:
            right = sum(d.color == item["color"] for d in found)
            if right < n:
                ok = False
                reasons.append(f"expected {item['color']} {cls} >= {n}, found {right}")
        if ok and "position" in item:
            relation, target = item["position"]
            if matched[target] is None:
                ok = False
                reasons.append(f"no target for {cls} to be {relation}")
            elif not all(relation in relations(d, t) for d in found for t in matched[target]):
                ok = False
                reasons.append(f"expected {cls} {relation} target")
        matched.append(found if ok else None)
    for item in row.get("exclude", []):
        count = len(by_class.get(item["class"], []))
        if count >= item["count"]:
            reasons.append(f"expected {item['class']} < {item['count']}, found {count}")
    return not reasons, reasons


def partial_credit(by_class: dict[str, list[Detection]], row: dict) -> float:
    """flow_grpo's GenEval training reward, in [0, 1]: the mean over include items of a count credit
    ``1 - |n - k| / n`` (k detected, at least 0), and where stated a colour credit (the share of
    the n most confident with the colour) and a position credit (the share of (object, target)
    pairs in the relation; 0 without a matched target)."""
    credits, matched = [], []
    for item in row["include"]:
        cls, n = item["class"], item["count"]
        found = by_class.get(cls, [])
        credits.append(max(0.0, 1 - abs(n - len(found)) / n))
        top = found[:n]
        if "color" in item:
            credits.append(sum(d.color == item["color"] for d in top) / n)
        if "position" in item:
            relation, target = item["position"]
            targets = matched[target] if target < len(matched) else []
            pairs = [(d, t) for d in top for t in targets]
            credits.append(sum(relation in relations(d, t) for d, t in pairs) / len(pairs) if pairs else 0.0)
        matched.append(top)
    return sum(credits) / len(credits)


def summarize(tags: list[str], correct_flags: list[bool]) -> dict:
    """Per task: accuracy, its standard error and the image count; ``overall`` = the mean of the
    task accuracies present (GenEval's Overall when all six are)."""
    table = {}
    for tag in TAGS:
        flags = [float(c) for t, c in zip(tags, correct_flags) if t == tag]
        if flags:
            p = sum(flags) / len(flags)
            table[tag] = {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / len(flags)), "images": len(flags)}
    accuracies = [v["accuracy"] for v in table.values()]
    table["overall"] = {"accuracy": sum(accuracies) / len(accuracies), "images": len(tags)}
    return table


def markdown(results: dict[str, dict]) -> str:
    """GenEval's table: one row per model, Overall then the six tasks (accuracy ± s.e.)."""
    header = "| model | Overall | " + " | ".join(TABLE_NAMES) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_NAMES) + 2)]
    for model, table in results.items():
        cells = [f"{table['overall']['accuracy']:.3f}"]
        for tag in TAGS:
            cells.append(
                f"{table[tag]['accuracy']:.3f} ± {table[tag]['stderr']:.3f}" if tag in table else "—"
            )
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
