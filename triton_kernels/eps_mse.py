"""Per-sample mean squared error ``mean((pred - target)^2)`` over all non-batch elements.

Diffusion-DPO and SePPO (Wallace et al. 2024, Eq. 8-9) evaluate four of these per preference pair
(policy and reference, winner and loser). Fused: one read of ``pred`` and ``target`` forward, and
one read + one write per input backward, accumulating in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._common import BLOCK, grid, rows

# ---------------------------------------------------------------------------- reference


def eps_mse_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` x2 -> ``[B]`` float32: mean over non-batch elements of (pred - target)^2."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _forward_kernel(pred_ptr, target_ptr, partial_ptr, n, chunks, BLOCK: tl.constexpr):
    row, chunk = tl.program_id(0), tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    p = tl.load(pred_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    d = p - t
    tl.store(partial_ptr + row * chunks + chunk, tl.sum(d * d, axis=0))


@triton.jit
def _backward_kernel(pred_ptr, target_ptr, grad_out_ptr, grad_pred_ptr, n, BLOCK: tl.constexpr):
    row, chunk = tl.program_id(0), tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    p = tl.load(pred_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_out_ptr + row)
    grad = 2.0 * g * (p - t) / n
    tl.store(grad_pred_ptr + row * n + offsets, grad.to(grad_pred_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers


def _forward(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    batch = pred.shape[0]
    p, t = rows(pred, batch), rows(target, batch)
    n = p.shape[1]
    g = grid(batch, n)
    partial = torch.empty(g, device=p.device, dtype=torch.float32)
    _forward_kernel[g](p, t, partial, n, g[1], BLOCK=BLOCK)
    return partial.sum(dim=1) / n


def _backward(pred: torch.Tensor, target: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    batch = pred.shape[0]
    p, t = rows(pred, batch), rows(target, batch)
    n = p.shape[1]
    grad_pred = torch.empty_like(p)
    _backward_kernel[grid(batch, n)](p, t, grad_out.float().contiguous(), grad_pred, n, BLOCK=BLOCK)
    return grad_pred.view(pred.shape)


# ---------------------------------------------------------------------------- autograd


class EpsMSE(torch.autograd.Function):
    """Fused per-sample MSE with gradients for both inputs."""

    @staticmethod
    def forward(ctx, pred, target):
        ctx.save_for_backward(pred, target)
        return _forward(pred, target)

    @staticmethod
    def backward(ctx, grad_out):
        pred, target = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None
        grad = _backward(pred, target, grad_out)
        grad_pred = grad.to(pred.dtype) if ctx.needs_input_grad[0] else None
        grad_target = (-grad).to(target.dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target


def eps_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fused :func:`eps_mse_reference`: ``[B, ...]`` x2 -> ``[B]`` float32."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    return EpsMSE.apply(pred, target)
