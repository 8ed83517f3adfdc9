"""Numerical building blocks shared by every policy and loss, and the kernel dispatch.

All log-probabilities in diffrl go through :func:`gaussian_logprob` (or the fused affine step
:func:`fused_affine_step_logprob`, which serves the DDIM, LCM and flow steps alike). The convention (DESIGN.md) is the **element mean**: the Gaussian
log-density of a latent averaged over its C*h*w elements, as in DDPO. Summing instead makes
exp(log-ratio) overflow for realistic latent sizes, which is why DDPO-style PPO clip ranges are
~1e-4 (they assume ``reduction="mean"``).

Dispatch: the torch code here is the specification; the fused Triton kernels in
``triton_kernels/`` are used when ``DIFFRL_KERNELS`` is ``auto`` (default) and the tensors are on
CUDA with triton importable, or ``TRITON_INTERPRET=1`` is set (CPU interpreter, for tests).
``DIFFRL_KERNELS=torch`` always uses the reference; ``DIFFRL_KERNELS=triton`` always uses the
kernels and raises where they cannot run, never falling back silently.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
KERNEL_MODES = ("auto", "torch", "triton")


def kernel_mode() -> str:
    """The ``DIFFRL_KERNELS`` setting, checked."""
    mode = os.environ.get("DIFFRL_KERNELS", "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"DIFFRL_KERNELS={mode!r}: must be one of {', '.join(KERNEL_MODES)}")
    return mode


def use_triton(*tensors: torch.Tensor, op: str = "op") -> bool:
    """Whether ``op`` on ``tensors`` runs the fused kernel (see module doc); raises when forced
    to triton where it cannot run."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    on_cuda = all(t.is_cuda for t in tensors)
    importable = importlib.util.find_spec("triton") is not None
    if importable and (on_cuda or interpret):
        return True
    if mode == "triton":
        why = (
            "triton is not installed"
            if not importable
            else (
                f"the tensors are on {tensors[0].device}, not CUDA (set TRITON_INTERPRET=1 before importing triton "
                "to run the kernels on CPU)"
            )
        )
        raise RuntimeError(f"DIFFRL_KERNELS=triton but the fused {op} cannot run: {why}")
    return False


def _one_per_sample(std: torch.Tensor, batch: int) -> bool:
    return std.numel() in (1, batch) and (std.ndim == 0 or std.shape[0] in (1, batch))


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
        ``[B]`` float32, computed in float32 whatever the input dtype. The fused kernel serves
        a std with one value per sample.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if x.shape != mean.shape:
        raise ValueError(f"x {tuple(x.shape)} and mean {tuple(mean.shape)} must have the same shape")
    per_sample = _one_per_sample(std, x.shape[0])
    if (per_sample or kernel_mode() == "triton") and use_triton(x, mean, op="gaussian_logprob"):
        if not per_sample:
            raise ValueError(
                f"DIFFRL_KERNELS=triton: the fused gaussian_logprob takes one std per sample, got {tuple(std.shape)}"
            )
        from triton_kernels.gaussian_logprob import gaussian_logprob as fused

        out = fused(x, mean, std)
        return out if reduction == "mean" else out * x[0].numel()
    x, mean, std = x.float(), mean.float(), std.float()
    if per_sample:  # reduce the squares first: three passes over the latents, the rest on [B]
        sigma = std.reshape(-1)
        squares = (x - mean).square().mean(dim=tuple(range(1, x.ndim)))
        out = torch.addcdiv(-torch.log(sigma) - _HALF_LOG_2PI, squares, sigma.square(), value=-0.5)
        return out if reduction == "mean" else out * x[0].numel()
    elementwise = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    elementwise = elementwise.flatten(1)
    return elementwise.mean(dim=1) if reduction == "mean" else elementwise.sum(dim=1)


def gaussian_kl(
    mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean_p, std_p^2) || N(mean_q, std_q^2)) of diagonal Gaussians, per element
    log(s_q / s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2, then the mean over the non-batch
    elements (the element-mean convention of :func:`gaussian_logprob`).

    Args:
        mean_p, mean_q: ``[B, ...]``; std_p, std_q: positive, broadcastable to them.

    Returns:
        ``[B]`` float32 (differentiable in every input).
    """
    mean_p, mean_q, std_p, std_q = mean_p.float(), mean_q.float(), std_p.float(), std_q.float()
    elementwise = torch.log(std_q / std_p) + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5
    return elementwise.expand_as(mean_p).flatten(1).mean(dim=1)


def eps_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over non-batch elements, ``[B, ...]`` x2 -> ``[B]`` float32
    (the diffusion loss term of Diffusion-DPO / SePPO)."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    if use_triton(pred, target, op="eps_mse"):
        from triton_kernels.eps_mse import eps_mse as fused

        return fused(pred, target)
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def fused_affine_step_logprob(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    std: torch.Tensor,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused affine Gaussian step (``triton_kernels.ddim_step_logprob``): mean = a x + b model_output.

    Every sampler step of diffrl is affine in (x_t, model output) with one (a, b, std) per sample:
    the DDIM policy (:func:`diffrl.policies.ddim.ddim_step_with_logprob`, when x_0 is neither
    clipped nor thresholded), the consistency step (:mod:`diffrl.policies.lcm`) and the flow SDE
    and CPS steps (:func:`diffrl.policies.flow.flow_step_with_logprob`) call this when
    :func:`use_triton` allows; their torch code is the reference. Shapes: ``sample``, ``model_output``, ``noise``/``prev_sample`` ``[B, ...]``;
    ``a``, ``b``, ``std`` one value per sample. Returns ``(mean float32, prev_sample in sample's
    dtype, log_prob [B] float32)``; gradients flow to ``model_output`` through ``log_prob``.
    """
    from triton_kernels.ddim_step_logprob import ddim_step_logprob

    return ddim_step_logprob(sample, model_output, a, b, std, noise=noise, prev_sample=prev_sample)
