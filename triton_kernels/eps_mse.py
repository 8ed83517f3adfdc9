"""Per-sample mean squared error ``mean((pred - target)^2)`` over all non-batch elements.

Diffusion-DPO and SePPO (Wallace et al. 2024, Eq. 8-9) evaluate four of these per preference pair
(policy and reference, winner and loser). Fused: one read of ``pred`` and ``target`` forward
(the shared squared-distance kernel), one read + one write backward (grad = 2 g (pred - target) / N),
accumulating in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch

from triton_kernels._common import scaled_difference, squared_distance

# ---------------------------------------------------------------------------- reference


def eps_mse_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` x2 -> ``[B]`` float32: mean over non-batch elements of (pred - target)^2."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------- autograd


class EpsMSE(torch.autograd.Function):
    """Fused per-sample MSE with gradients for both inputs."""

    @staticmethod
    def forward(ctx, pred, target):
        ctx.save_for_backward(pred, target)
        ctx.n = pred[0].numel()
        return squared_distance(pred, target) / ctx.n

    @staticmethod
    def backward(ctx, grad_out):
        pred, target = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None
        grad = scaled_difference(pred, target, 2 * grad_out.float() / ctx.n, pred.dtype)
        grad_pred = grad if ctx.needs_input_grad[0] else None
        grad_target = (-grad).to(target.dtype) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_target


def eps_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fused :func:`eps_mse_reference`: ``[B, ...]`` x2 -> ``[B]`` float32."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    return EpsMSE.apply(pred, target)
