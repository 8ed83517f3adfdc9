"""Files a user keeps: written atomically (temp file + rename) so a crash never leaves half a file."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from diffrl.errors import InputFileError
from diffrl.rewards.jpeg import to_uint8


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_line(record: dict) -> str:
    """``record`` as strict JSON (no ``NaN``/``Infinity`` tokens, which JSON does not have): each
    non-finite float becomes null and its key is listed under ``"nonfinite"``."""
    flagged = []

    def clean(value, key: str):
        if isinstance(value, float) and not math.isfinite(value):
            flagged.append(key)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(record, "")
    if flagged:
        cleaned["nonfinite"] = sorted(set(cleaned.get("nonfinite") or []) | set(flagged))
    return json.dumps(cleaned, allow_nan=False)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one strict JSON line (:func:`json_line`; append-only log, flushed to disk)."""
    line = json_line(record) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def image_grid(images: torch.Tensor, captions: list[str], columns: int = 4, scale: int = 4) -> Image.Image:
    """A PIL grid of ``[B, 3, H, W]`` images in [0, 1], each upscaled ``scale``x with a caption below."""
    arrays = to_uint8(images)
    count, (h, w) = len(arrays), arrays.shape[1:3]
    cell_w, cell_h, text_h = w * scale, h * scale, 40
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (array, caption) in enumerate(zip(arrays, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + text_h)
        grid.paste(Image.fromarray(array).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        lines = [wrapped for part in caption.split("\n") for wrapped in textwrap.wrap(part, cell_w // 6)]
        for line_no, line in enumerate(lines[:3]):
            draw.text((x + 2, y + cell_h + 2 + 12 * line_no), line, fill="black")
    return grid


def save_png(image: Image.Image, path: str | Path) -> None:
    """Save a PIL image as PNG atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def read_jsonl(path: str | Path, strict: bool = False) -> list[dict]:
    """Records of a JSON-lines file (empty when missing).

    A torn last line (an append cut off by a crash: no newline at its end) is skipped. Any other
    line that is not a JSON object is skipped too, unless ``strict``, which raises
    :class:`InputFileError` naming the file and line number (for files a user supplies or edits).
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            record, problem = None, err.msg
        else:
            problem = (
                None if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"
            )
        if problem is None:
            records.append(record)
        elif strict and number < len(lines):  # the last element has no newline after it: a torn append
            raise InputFileError(f"{path}:{number}: {problem}")
    return records


def truncate_metrics(path: str | Path, last_epoch: int) -> None:
    """Keep only records with ``epoch <= last_epoch`` (atomic rewrite), so a resumed run does not
    duplicate the epochs it repeats."""
    kept = [r for r in read_jsonl(path) if r.get("epoch", -1) <= last_epoch]
    atomic_write_bytes(path, "".join(json_line(r) + "\n" for r in kept).encode())


CHART_COLOURS = ("blue", "red", "green", "orange", "purple", "brown")


def line_chart(
    values: list[float] | dict[str, list[float]], title: str, size: tuple[int, int] = (480, 320)
) -> Image.Image:
    """A minimal PIL line chart against the index (x: epoch): one series ``values``, or several
    ``{label: values}`` on one scale with a legend in their colours. Null or non-finite values
    are left out."""
    series = values if isinstance(values, dict) else {"": values}
    series = {
        label: [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in vals]
        for label, vals in series.items()
    }
    width, height = size
    margin = 40
    chart = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(chart)
    draw.rectangle([margin, margin // 2, width - 10, height - margin], outline="black")
    draw.text((margin, 4), title, fill="black")
    known = [v for vals in series.values() for v in vals if v is not None]
    if not known:
        return chart
    low, high = min(known), max(known)
    span = (high - low) or 1.0
    length = max(len(vals) for vals in series.values())
    x_step = (width - 10 - margin) / max(1, length - 1)
    for k, (label, vals) in enumerate(series.items()):
        colour = CHART_COLOURS[k % len(CHART_COLOURS)]
        points = [
            (margin + i * x_step, height - margin - (v - low) / span * (height - 1.5 * margin))
            for i, v in enumerate(vals)
            if v is not None
        ]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        if label:
            draw.text((margin + 6, margin // 2 + 4 + 12 * k), label, fill=colour)
    draw.text((2, margin // 2), f"{high:.3g}", fill="black")
    draw.text((2, height - margin - 10), f"{low:.3g}", fill="black")
    draw.text((width // 2, height - margin + 8), f"epoch 0..{length - 1}", fill="black")
    return chart
