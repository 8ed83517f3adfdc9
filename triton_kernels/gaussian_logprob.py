"""Element-mean Gaussian log-density with one standard deviation per sample (diffrl's log-prob
convention, DESIGN.md; DDPO, Black et al. 2024, Sec. 4.2).

    log p = mean_i [ -(x_i - mu_i)^2 / (2 sigma^2) - log sigma - log(2 pi) / 2 ]
          = -S / (2 sigma^2 N) - log sigma - log(2 pi) / 2,   S = sum_i (x_i - mu_i)^2

The shared row kernels of ``_common`` compute S in one read of ``x`` and ``mean``; the rest is
[B]-sized torch arithmetic.
Backward: d/d mu_i = g (x_i - mu_i) / (sigma^2 N) (one more pass), d/d sigma = g (S / (sigma^3 N)
- 1 / sigma) from the saved S, d/d x = -d/d mu.
"""

from __future__ import annotations

import math

import torch

from triton_kernels._common import per_row, scaled_difference, squared_distance

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# ---------------------------------------------------------------------------- reference


def gaussian_logprob_reference(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``x``, ``mean`` ``[B, ...]``, ``std`` one value per sample -> ``[B]`` float32 element-mean log-density."""
    x, mean = x.float(), mean.float()
    std = std.float().reshape(-1, *([1] * (x.ndim - 1)))
    return (-((x - mean) ** 2) / (2 * std**2) - torch.log(std) - HALF_LOG_2PI).flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------- autograd


class GaussianLogProb(torch.autograd.Function):
    """Fused element-mean Gaussian log-density; gradients for x, mean and std."""

    @staticmethod
    def forward(ctx, x, mean, std):
        batch = x.shape[0]
        n = x[0].numel()
        sigma = per_row(std, batch)
        total = squared_distance(x, mean)
        ctx.save_for_backward(x, mean, sigma, total)
        ctx.n, ctx.std_shape = n, std.shape
        return -total / (2 * sigma**2 * n) - torch.log(sigma) - HALF_LOG_2PI

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, sigma, total = ctx.saved_tensors
        grad_out = grad_out.float()
        grad_x = grad_mean = grad_std = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g = scaled_difference(x, mean, grad_out / (sigma**2 * ctx.n), mean.dtype)
            grad_mean = g if ctx.needs_input_grad[1] else None
            grad_x = (-g).to(x.dtype) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[2]:
            grad_std = (grad_out * (total / (sigma**3 * ctx.n) - 1 / sigma)).reshape(ctx.std_shape)
        return grad_x, grad_mean, grad_std


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Fused :func:`gaussian_logprob_reference`: ``[B, ...]`` -> ``[B]`` float32."""
    if x.shape != mean.shape:
        raise ValueError(f"x {tuple(x.shape)} and mean {tuple(mean.shape)} must have the same shape")
    return GaussianLogProb.apply(x, mean, std)
