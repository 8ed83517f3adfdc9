"""JPEG (in)compressibility rewards (DDPO, Black et al. 2024, Sec. 6.1).

The reward is the size in kB (bytes / 1000) of the image saved as a quality-95 JPEG:
``jpeg_compressibility`` returns -size (smaller files are better), ``jpeg_incompressibility`` +size.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images ``[B, 3, H, W]`` in [0, 1] -> uint8 array ``[B, H, W, 3]`` (rounded)."""
    return (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image as a JPEG of the given quality; ``[B, 3, H, W]`` -> ``[B]`` float32."""
    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(quality: int = 95):
    """Reward factory: -(JPEG size in kB). Returns ``(images, prompts, metadata) -> [B]``."""

    def reward(images, prompts, metadata):
        return -jpeg_size_kb(images, quality)

    return reward


def jpeg_incompressibility(quality: int = 95):
    """Reward factory: +(JPEG size in kB). Returns ``(images, prompts, metadata) -> [B]``."""

    def reward(images, prompts, metadata):
        return jpeg_size_kb(images, quality)

    return reward
