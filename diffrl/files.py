"""Files a user keeps: written atomically (temp file + rename) so a crash never leaves half a file."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

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


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (append-only log, flushed to disk)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def image_grid(images: torch.Tensor, captions: list[str], columns: int = 4, scale: int = 4) -> Image.Image:
    """A PIL grid of ``[B, 3, H, W]`` images in [0, 1], each upscaled ``scale``x with a caption below."""
    arrays = to_uint8(images)
    count, (h, w) = len(arrays), arrays.shape[1:3]
    cell_w, cell_h, text_h = w * scale, h * scale, 28
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (array, caption) in enumerate(zip(arrays, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + text_h)
        grid.paste(Image.fromarray(array).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        for line_no, line in enumerate(caption.split("\n")[:2]):
            draw.text((x + 2, y + cell_h + 2 + 12 * line_no), line[: cell_w // 6], fill="black")
    return grid


def save_png(image: Image.Image, path: str | Path) -> None:
    """Save a PIL image as PNG atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
