"""Shared launch helpers for the row-reduction kernels.

Every op here works on tensors viewed as ``[B, N]`` (batch rows, N = elements per sample). The
forward kernels run on a 2-D grid (row, chunk of ``BLOCK`` elements) and write one float32 partial
sum per program; the partials are summed in torch, so results are deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton

BLOCK = 1024
"""Elements per program: a multiple of 32 lanes, small enough for registers, large enough that
launch overhead stays negligible at Stable Diffusion sizes (N = 16,384 -> 16 programs per row)."""


def rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` as a contiguous ``[B, N]`` view (copies only when it is not contiguous)."""
    return t.reshape(batch, -1).contiguous()


def per_row(t: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-sample scalar (``[B]``, ``[B, 1, ..]`` or a 0-dim tensor) as a float32 ``[B]`` vector."""
    t = torch.as_tensor(t)
    if t.numel() == 1:
        return t.reshape(1).float().expand(batch).contiguous()
    if t.numel() != batch:
        raise ValueError(f"expected one value per sample ({batch}), got shape {tuple(t.shape)}")
    return t.reshape(batch).float().contiguous()


def grid(batch: int, n: int) -> tuple[int, int]:
    """(rows, chunks) launch grid."""
    return batch, triton.cdiv(n, BLOCK)
