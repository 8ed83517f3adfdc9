"""Reward registry. A reward is a plain callable ``(images, prompts, metadata) -> Tensor[B]``.

``images`` are float ``[B, 3, H, W]`` in [0, 1], ``prompts`` a list of B strings, ``metadata`` a
list of B dicts (may be empty dicts). Built-ins are named (``jpeg_compressibility``, ``aesthetic``,
...); a custom reward is named by its import path ``package.module:function``. With keyword
arguments the imported object is treated as a factory and called with them to make the reward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from diffrl.rewards.clip import aesthetic, clip_score
from diffrl.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility
from diffrl.rewards.shapes import shapes_alignment

RewardFn = Callable[[torch.Tensor, list, list], torch.Tensor]

REGISTRY: dict[str, Callable[..., RewardFn]] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "aesthetic": aesthetic,
    "clip_score": clip_score,
    "shapes_alignment": shapes_alignment,
}
"""Built-in reward factories by name."""


class RewardError(ValueError):
    """A reward returned something that is not a finite float tensor of shape ``[B]``."""


def check_rewards(name: str, values, batch_size: int) -> torch.Tensor:
    """Validate a reward's output; returns it as float32 ``[B]`` on CPU or raises :class:`RewardError`."""
    if not isinstance(values, torch.Tensor):
        raise RewardError(
            f"reward {name!r} returned {type(values).__name__}, expected a torch.Tensor of shape [{batch_size}]"
        )
    if tuple(values.shape) != (batch_size,):
        raise RewardError(f"reward {name!r} returned shape {tuple(values.shape)}, expected ({batch_size},)")
    values = values.detach().float().cpu()
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"reward {name!r} returned non-finite values at sample indices {bad}")
    return values


def _import(path: str):
    module_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"reward {path!r}: cannot import {attr!r} from module {module_name!r} ({err})"
        ) from err


def get(name: str, **kwargs) -> RewardFn:
    """The reward named ``name`` (a built-in or ``package.module:function``), with output checks.

    The returned callable raises :class:`RewardError` naming the reward when the output is not a
    finite ``[B]`` tensor.
    """
    if name in REGISTRY:
        fn = REGISTRY[name](**kwargs)
    elif ":" in name:
        fn = _import(name)
        fn = fn(**kwargs) if kwargs else fn
    else:
        raise ValueError(
            f"unknown reward {name!r}; built-ins: {', '.join(REGISTRY)}; or give 'package.module:function'"
        )
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")

    def checked(images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        return check_rewards(name, fn(images, prompts, metadata), images.shape[0])

    checked.__name__ = name
    return checked


__all__ = [
    "REGISTRY",
    "RewardError",
    "RewardFn",
    "check_rewards",
    "get",
    "aesthetic",
    "clip_score",
    "jpeg_compressibility",
    "jpeg_incompressibility",
]
