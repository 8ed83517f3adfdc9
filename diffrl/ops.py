"""Numerical building blocks shared by every policy and loss.

All log-probabilities in diffrl go through :func:`gaussian_logprob`. The convention (DESIGN.md)
is the **element mean**: the Gaussian log-density of a latent averaged over its C*h*w elements,
as in DDPO. Summing instead makes exp(log-ratio) overflow for realistic latent sizes, which is why
DDPO-style PPO clip ranges are ~1e-4 (they assume ``reduction="mean"``).
"""

from __future__ import annotations

import math

import torch

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_logprob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Diagonal Gaussian log-density log N(x; mean, std^2), reduced over all non-batch dims.

    Args:
        x: the point, ``[B, ...]``; treated as data (callers detach actions).
        mean: ``[B, ...]``, same shape as ``x``.
        std: positive standard deviation broadcastable to ``x`` (e.g. ``[B, 1, 1, 1]``).
        reduction: ``"mean"`` (diffrl's convention) or ``"sum"`` over the non-batch elements.

    Returns:
        ``[B]`` float32, computed in float32 whatever the input dtype.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if x.shape != mean.shape:
        raise ValueError(f"x {tuple(x.shape)} and mean {tuple(mean.shape)} must have the same shape")
    x, mean, std = x.float(), mean.float(), std.float()
    elementwise = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    elementwise = elementwise.flatten(1)
    return elementwise.mean(dim=1) if reduction == "mean" else elementwise.sum(dim=1)
