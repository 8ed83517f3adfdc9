"""OCR accuracy (Flow-GRPO's text-rendering reward, Liu et al. 2025, Sec. 5.1): how well the text an
OCR engine reads in the image matches the text quoted in the prompt.

For the prompt ``a sign that says "Open Late"`` the target is ``openlate`` (the first quoted span,
spaces removed, lower case); the image's text is everything the engine reads, joined the same way:

    r = 1 − min(d, |target|) / |target|,   d = 0 if the target occurs in the read text,
                                           else the Levenshtein distance between them

The default engine is RapidOCR (PaddleOCR's models on ONNX Runtime, weights inside the wheel:
``pip install "diffrl[ocr]"``); any ``read(image uint8 [H, W, 3]) -> str`` can replace it.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from diffrl.errors import RewardError

_QUOTED = re.compile(r"[\"“”'‘’]([^\"“”'‘’]+)[\"“”'‘’]")


def target_text(prompt: str) -> str | None:
    """The first quoted span of ``prompt``, spaces removed, lower case; None without quotes."""
    match = _QUOTED.search(prompt)
    return re.sub(r"\s+", "", match.group(1)).lower() if match else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1) between ``a`` and ``b``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_accuracy(read: str, target: str) -> float:
    """``1 − min(d, |target|) / |target|`` for the text ``read`` (joined, no spaces, lower case)."""
    read = re.sub(r"\s+", "", read).lower()
    distance = 0 if target in read else min(levenshtein(read, target), len(target))
    return 1.0 - distance / len(target)


def rapidocr_reader():
    """``read(image) -> str`` with RapidOCR: every recognised line's text, in reading order."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as err:
        raise RewardError(
            "reward 'ocr' needs an OCR engine: pip install \"diffrl[ocr]\" (rapidocr-onnxruntime), "
            "or pass read=<callable image -> text>"
        ) from err
    engine = RapidOCR()

    def read(image: np.ndarray) -> str:
        lines, _ = engine(image)
        return "".join(text for _, text, _ in lines or [])

    return read


def ocr(read=None):
    """Reward factory: OCR accuracy of each image against its prompt's quoted text.

    Args:
        read: ``read(image uint8 [H, W, 3] numpy) -> str``; default RapidOCR (:func:`rapidocr_reader`).

    Returns ``(images [B, 3, H, W] in [0, 1], prompts, metadata) -> [B]`` float32 in [0, 1];
    a prompt without quoted text is refused before any image is read.
    """
    read = read or rapidocr_reader()

    def reward(images, prompts, metadata):
        targets = [target_text(p) for p in prompts]
        missing = [i for i, t in enumerate(targets) if not t]
        if missing:
            raise RewardError(
                f"reward 'ocr': prompt {missing[0]} ({prompts[missing[0]]!r}) quotes no text to render"
            )
        pixels = (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return torch.tensor([ocr_accuracy(read(p), t) for p, t in zip(pixels, targets)])

    return reward


__all__ = ["levenshtein", "ocr", "ocr_accuracy", "rapidocr_reader", "target_text"]
