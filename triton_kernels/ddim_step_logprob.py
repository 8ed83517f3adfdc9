"""One stochastic sampler step whose mean is affine in the state and the model output, with its
log-probability, fused (the DDIM step of DDPO / D3PO / B2-DiffuRL; Song et al. 2021, Eq. 12, 16).

Without clipping or thresholding of x_0, the DDIM mean is affine per sample:

    mu = a * x_t + b * model_output        (a, b from alpha_t, alpha_{t-1}, sigma_t; see
                                             diffrl.policies.ddim.affine_coefficients)
    x_{t-1} = mu + sigma_t * z             (sampling)   or a given x_{t-1} (scoring)
    log pi = -S / (2 sigma^2 N) - log sigma - log(2 pi) / 2,   S = sum (x_{t-1} - mu)^2

One pass reads x_t, the model output and z (or x_{t-1}) and writes mu, x_{t-1} and per-chunk
partial sums of S. Backward (w.r.t. the model output only: the state and the action are data)
recomputes mu instead of storing it: grad = g * b * (x_{t-1} - mu) / (sigma^2 N).

The consistency-model step of RLCM has the same form (mu = sqrt(alpha_{t'}) (c_skip x + c_out x_0),
x_0 affine in x and eps, std sqrt(1 - alpha_{t'})), so its fused version is this kernel with its own
(a, b, sigma): the hook for ``lcm_step_logprob`` is a coefficient function, not a new kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from triton_kernels._common import BLOCK, grid, per_row, rows

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# ---------------------------------------------------------------------------- reference


def ddim_step_logprob_reference(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    std: torch.Tensor,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, prev_sample, log_prob)``: mean ``[B, ...]`` float32, log_prob ``[B]`` float32.

    Exactly one of ``noise`` (sample x_{t-1} = mean + std * noise, stored in ``sample``'s dtype and
    scored as stored) and ``prev_sample`` (score it). ``a``, ``b``, ``std``: one value per sample.
    """
    shape = (-1, *([1] * (sample.ndim - 1)))
    a, b, std = (per_row(v, sample.shape[0]).to(sample.device).view(shape) for v in (a, b, std))
    mean = a * sample.float() + b * model_output.float()
    prev = (mean + std * noise.float()).to(sample.dtype) if prev_sample is None else prev_sample
    d = prev.float() - mean
    log_prob = (-(d**2) / (2 * std**2) - torch.log(std) - HALF_LOG_2PI).flatten(1).mean(dim=1)
    return mean, prev, log_prob


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _forward_kernel(
    x_ptr,
    e_ptr,
    z_or_prev_ptr,
    a_ptr,
    b_ptr,
    std_ptr,
    mean_ptr,
    prev_ptr,
    partial_ptr,
    n,
    chunks,
    SAMPLING: tl.constexpr,
    WRITE_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, chunk = tl.program_id(0), tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a, b, std = tl.load(a_ptr + row), tl.load(b_ptr + row), tl.load(std_ptr + row)
    x = tl.load(x_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    mean = a * x + b * e
    if WRITE_MEAN:
        tl.store(mean_ptr + row * n + offsets, mean, mask=mask)
    v = tl.load(z_or_prev_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    if SAMPLING:
        prev = (mean + std * v).to(prev_ptr.dtype.element_ty)
        tl.store(prev_ptr + row * n + offsets, prev, mask=mask)
        d = prev.to(tl.float32) - mean
    else:
        d = v - mean
    d = tl.where(mask, d, 0.0)
    tl.store(partial_ptr + row * chunks + chunk, tl.sum(d * d, axis=0))


@triton.jit
def _backward_kernel(x_ptr, e_ptr, prev_ptr, a_ptr, b_ptr, scale_ptr, grad_ptr, n, BLOCK: tl.constexpr):
    """grad_e = scale[row] * b[row] * (prev - (a x + b e)), scale = g / (sigma^2 N)."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a, b, scale = tl.load(a_ptr + row), tl.load(b_ptr + row), tl.load(scale_ptr + row)
    x = tl.load(x_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    prev = tl.load(prev_ptr + row * n + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = scale * b * (prev - (a * x + b * e))
    tl.store(grad_ptr + row * n + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launcher + autograd


class DDIMStepLogProb(torch.autograd.Function):
    """Fused affine Gaussian step; gradient w.r.t. ``model_output`` only."""

    @staticmethod
    def forward(ctx, sample, model_output, a, b, std, noise, prev_sample, write_mean):
        batch, shape = sample.shape[0], sample.shape
        x, e = rows(sample, batch), rows(model_output, batch)
        n = x.shape[1]
        a, b, sigma = (per_row(v, batch).to(x.device) for v in (a, b, std))
        sampling = prev_sample is None
        source = rows(noise if sampling else prev_sample, batch)
        mean = torch.empty(x.shape, device=x.device, dtype=torch.float32) if write_mean else x
        prev = torch.empty_like(x) if sampling else source
        g = grid(batch, n)
        partial = torch.empty(g, device=x.device, dtype=torch.float32)
        _forward_kernel[g](
            x,
            e,
            source,
            a,
            b,
            sigma,
            mean,
            prev,
            partial,
            n,
            g[1],
            SAMPLING=sampling,
            WRITE_MEAN=write_mean,
            BLOCK=BLOCK,
        )
        log_prob = -partial.sum(dim=1) / (2 * sigma**2 * n) - torch.log(sigma) - HALF_LOG_2PI
        ctx.save_for_backward(x, e, prev, a, b, sigma)
        ctx.n, ctx.shape = n, shape
        mean_out, prev_out = (mean.view(shape) if write_mean else None), prev.view(shape)
        ctx.mark_non_differentiable(*(t for t in (mean_out, prev_out) if t is not None))
        ctx.set_materialize_grads(False)
        return mean_out, prev_out, log_prob

    @staticmethod
    def backward(ctx, grad_mean, grad_prev, grad_log_prob):
        if grad_log_prob is None or not ctx.needs_input_grad[1]:
            return (None,) * 8
        x, e, prev, a, b, sigma = ctx.saved_tensors
        scale = (grad_log_prob.float() / (sigma**2 * ctx.n)).contiguous()
        grad = torch.empty_like(e)
        _backward_kernel[grid(x.shape[0], ctx.n)](x, e, prev, a, b, scale, grad, ctx.n, BLOCK=BLOCK)
        return None, grad.view(ctx.shape), None, None, None, None, None, None


def ddim_step_logprob(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    std: torch.Tensor,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    write_mean: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Fused :func:`ddim_step_logprob_reference`; ``prev_sample`` comes back in ``sample``'s dtype
    when sampled, ``mean`` in float32 (None unless ``write_mean``)."""
    if (noise is None) == (prev_sample is None):
        raise ValueError("give exactly one of noise (to sample) and prev_sample (to score)")
    other = noise if prev_sample is None else prev_sample
    if not (sample.shape == model_output.shape == other.shape):
        raise ValueError(
            f"sample {tuple(sample.shape)}, model_output {tuple(model_output.shape)} and "
            f"noise/prev_sample {tuple(other.shape)} must have the same shape"
        )
    return DDIMStepLogProb.apply(sample, model_output, a, b, std, noise, prev_sample, write_mean)
