"""Shared pieces of the row-reduction kernels: launch helpers and the two kernels that
``gaussian_logprob`` and ``eps_mse`` both reduce to (sum of squared differences per row, and a
per-row scaled difference for their backward passes).

Every op here works on tensors viewed as ``[B, N]`` (batch rows, N = elements per sample). The
forward kernels run on a 2-D grid (row, chunk of ``BLOCK`` elements) and write one float32 partial
sum per program; the partials are summed in torch, so results are deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


# ---------------------------------------------------------------------------- shared kernels


@triton.jit
def _squared_distance_kernel(x_ptr, mean_ptr, partial_ptr, n, chunks, BLOCK: tl.constexpr):
    row, chunk = tl.program_id(0), tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mean_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    d = x - m
    tl.store(partial_ptr + row * chunks + chunk, tl.sum(d * d, axis=0))


@triton.jit
def _scaled_difference_kernel(x_ptr, mean_ptr, scale_ptr, grad_ptr, n, BLOCK: tl.constexpr):
    """out = scale[row] * (x - mean): the backward of both reductions."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mean_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + row)
    tl.store(grad_ptr + row * n + offsets, (scale * (x - m)).to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers


def squared_distance(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """S = sum over non-batch elements of (x - mean)^2, ``[B]`` float32 (fused, deterministic)."""
    batch = x.shape[0]
    xr, mr = rows(x, batch), rows(mean, batch)
    n = xr.shape[1]
    g = grid(batch, n)
    partial = torch.empty(g, device=xr.device, dtype=torch.float32)
    _squared_distance_kernel[g](xr, mr, partial, n, g[1], BLOCK=BLOCK)
    return partial.sum(dim=1)


def scaled_difference(
    x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``scale[b] * (x - mean)`` in ``dtype``, shaped like ``mean``."""
    batch = x.shape[0]
    xr, mr = rows(x, batch), rows(mean, batch)
    out = torch.empty(mr.shape, device=mr.device, dtype=dtype)
    _scaled_difference_kernel[grid(batch, xr.shape[1])](
        xr, mr, scale.contiguous(), out, xr.shape[1], BLOCK=BLOCK
    )
    return out.view(mean.shape)
