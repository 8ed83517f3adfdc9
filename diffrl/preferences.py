"""Offline preference data for Diffusion-DPO and SePPO (``dpo.data``): JSONL files of image pairs,
or ``datasets`` datasets in the Pick-a-Pic layout, read and checked before any model loads."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffrl.errors import ConfigError, InputFileError
from diffrl.files import read_jsonl


@dataclass
class Preference:
    """One preference: a prompt, the preferred image and (Diffusion-DPO) the other one; each image
    a file path or encoded bytes."""

    prompt: str
    winner: Path | bytes
    loser: Path | bytes | None


def load_preferences(source: str, need_loser: bool) -> list[Preference]:
    """Read ``dpo.data``: a JSONL of ``{"prompt", "winner", "loser"}`` (image paths relative to
    the file), a folder holding ``pairs.jsonl``, or a ``datasets`` dataset in the Pick-a-Pic
    layout (``hf:NAME[:SPLIT]`` or a ``save_to_disk`` folder; ties dropped). Every image file is
    checked to exist; errors name the file and record."""
    if not source:
        raise ConfigError(
            "dpo.data: no preference data given (a JSONL file, a folder with pairs.jsonl, or hf:NAME)"
        )
    path = Path(source).expanduser()
    if source.startswith("hf:") or (path / "dataset_info.json").is_file():
        return _pickapic(source, path)
    if path.is_dir():
        path = path / "pairs.jsonl"
    if not path.is_file():
        raise InputFileError(f"dpo.data: {path}: no such file")
    records, keys = (
        read_jsonl(path, strict=True),
        ("prompt", "winner", "loser") if need_loser else ("prompt", "winner"),
    )
    pairs = []
    for number, record in enumerate(records, start=1):
        missing = [k for k in keys if not isinstance(record.get(k), str)]
        if missing:
            raise InputFileError(f"{path}: record {number}: needs string fields {', '.join(missing)}")
        images = [path.parent / record[k] for k in keys[1:]]
        for image in images:
            if not image.is_file():
                raise InputFileError(f"{path}: record {number}: image {image} not found")
        pairs.append(Preference(record["prompt"], images[0], images[1] if need_loser else None))
    if not pairs:
        raise InputFileError(f"{path}: no preference records")
    return pairs


def _pickapic(source: str, path: Path) -> list[Preference]:
    """Pick-a-Pic v2 rows (caption, jpg_0, jpg_1, label_0 = 1 when image 0 is preferred, 0.5 tie)."""
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(
            f"dpo.data={source}: reading a datasets dataset needs `pip install datasets`"
        ) from err
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        rows = datasets.load_dataset(name, split=split or "train")
    else:
        rows = datasets.load_from_disk(str(path))
    return pickapic_rows(rows)


def pickapic_rows(rows) -> list[Preference]:
    """Preferences from rows in the Pick-a-Pic column layout; ties (label_0 = 0.5) are dropped."""
    pairs = []
    for row in rows:
        if row["label_0"] == 0.5:
            continue
        first, second = row["jpg_0"], row["jpg_1"]
        winner, loser = (first, second) if row["label_0"] > 0.5 else (second, first)
        pairs.append(Preference(row["caption"], winner, loser))
    return pairs


def load_images(items: list[Path | bytes], resolution: int) -> torch.Tensor:
    """Decode, convert to RGB, resize to ``resolution``² : ``[B, 3, H, W]`` float32 in [−1, 1]."""
    arrays = []
    for item in items:
        image = Image.open(io.BytesIO(item) if isinstance(item, bytes) else item).convert("RGB")
        arrays.append(np.asarray(image.resize((resolution, resolution), Image.BICUBIC), dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1
