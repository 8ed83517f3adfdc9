"""The DDIM sampler step as a Gaussian policy (DDPO, D3PO, B2-DiffuRL).

Paper symbols (Song et al., "Denoising Diffusion Implicit Models", 2021) against code names:

=====================  =========================================================
alpha_t (DDIM) = ᾱ_t   ``alpha_prod_t`` = ``scheduler.alphas_cumprod[t]``
alpha_{t-1}            ``alpha_prod_prev`` (``final_alpha_cumprod`` past the end)
x_0 prediction         ``pred_x0``  (Eq. 12, "predicted x_0")
epsilon_theta          ``pred_eps``
sigma_t(eta)           ``std`` (Eq. 16; eta = 1 is the DDPM posterior)
x_{t-1}                ``prev_sample``
=====================  =========================================================

The policy is pi(x_{t-1} | x_t) = N(mu, sigma_t^2 I) with mu the deterministic part of Eq. 12.
Unlike ``DDIMScheduler.step`` it accepts one timestep per sample and returns the std and log-prob.
"""

from __future__ import annotations

import weakref

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffrl.ops import fused_affine_step_logprob, gaussian_logprob, use_triton
from diffrl.types import StepOutput


def _per_sample(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``values[index]`` (``index`` ``[B]``) and shape it ``[B, 1, ..., 1]`` for broadcasting."""
    return values.to(index.device)[index].view(-1, *([1] * (ndim - 1)))


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    noise_pred: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    with_logprob: bool = True,
) -> StepOutput:
    """One DDIM step x_t -> x_{t-1} with the log-probability of the action.

    Args:
        scheduler: a ``DDIMScheduler`` on which ``set_timesteps`` was called.
        noise_pred: model output (epsilon, v or x_0 per ``prediction_type``), ``[B, C, h, w]``.
        timestep: the current timestep t, an int or a ``[B]`` tensor (one per sample).
        sample: the state x_t, ``[B, C, h, w]``.
        eta: the DDIM stochasticity; must be > 0 when ``with_logprob`` (sigma_t = 0 has no
            density); ``eta=0`` with ``with_logprob=False`` is the deterministic DDIM step.
        prev_sample: an action x_{t-1} ``[B, C, h, w]`` to score instead of sampling one.
        generator: RNG for the sampled noise (ignored when ``prev_sample`` is given).
        with_logprob: compute ``log_prob`` (else it is None).

    Returns:
        :class:`StepOutput` with ``prev_sample`` ``[B, C, h, w]``, ``log_prob`` ``[B]`` float32
        (element mean, see :mod:`diffrl.ops`) or None, ``mean`` and ``std`` ``[B, 1, 1, 1]``.
        ``log_prob`` carries gradient to ``noise_pred``; the action itself is detached.
    """
    if with_logprob and eta <= 0:
        raise ValueError(
            f"eta={eta}: the DDIM policy needs eta > 0 to have a log-probability (sigma_t = 0 at eta=0)"
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before ddim_step_with_logprob")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} differs from sample shape {tuple(sample.shape)}"
        )
    config = scheduler.config
    batch, ndim = sample.shape[0], sample.ndim

    # 1.-3. alpha_t, alpha_{t-1}, sigma_t(eta) and the affine a, b of each sample's timestep
    t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1).expand(batch)
    shape = (batch, *([1] * (ndim - 1)))
    alpha_prod_t, alpha_prod_prev, std, a, b = (
        column.view(shape) for column in step_coefficients(scheduler, eta, sample.device)[t].unbind(1)
    )
    noise = None
    if prev_sample is None and eta > 0:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)

    # 4. the mean of x_{t-1} (Eq. 12). Without clipping it is affine in (x_t, model output),
    #    mean = a x_t + b model_output (affine_coefficients): two tensor operations, or one fused
    #    kernel pass with the log-prob; a clipped or thresholded x_0 needs x_0 itself
    if config.thresholding or config.clip_sample:
        mean = _clipped_mean(scheduler, sample, noise_pred, alpha_prod_t, alpha_prod_prev, std)
    else:
        if with_logprob and use_triton(sample, noise_pred, op="ddim step"):
            mean, prev, log_prob = fused_affine_step_logprob(
                sample,
                noise_pred,
                a,
                b,
                std,
                noise=noise,
                prev_sample=None if prev_sample is None else prev_sample.detach(),
            )
            return StepOutput(prev_sample=prev.detach(), log_prob=log_prob, mean=mean, std=std)
        mean = a * sample + b * noise_pred

    # 5. the action x_{t-1} = mean + sigma_t z (stored in the sample dtype and scored as stored),
    #    the deterministic mean at eta = 0, or the given one
    if prev_sample is None:
        prev_sample = mean.to(sample.dtype) if noise is None else (mean + std * noise).to(sample.dtype)
    prev_sample = prev_sample.detach()

    # 6. log pi(x_{t-1} | x_t), element mean
    log_prob = gaussian_logprob(prev_sample, mean, std) if with_logprob else None
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


_coefficient_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_coefficients(scheduler: DDIMScheduler, eta: float, device) -> torch.Tensor:
    """The per-timestep numbers of the DDIM step for every training timestep t (the row index):
    ``[num_train_timesteps, 5]`` float32 columns (ᾱ_t, ᾱ_{t-1}, sigma_t(eta), a, b) with a, b of
    :func:`affine_coefficients`. They depend on the schedule only, so they are computed once per
    (``set_timesteps``, eta, device) and kept for the scheduler: a step then gathers one row per
    sample instead of running some thirty small tensor operations."""
    config = scheduler.config
    key = (
        scheduler.num_inference_steps,
        eta,
        device,
        id(scheduler.alphas_cumprod),
        id(scheduler.final_alpha_cumprod),
        config.prediction_type,
    )
    cached = _coefficient_tables.get(scheduler)
    if cached is not None and cached[0] == key:
        return cached[1]

    # 1. every timestep t and its previous one t - 1000/T
    t = torch.arange(config.num_train_timesteps, device=device)
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps

    # 2. alpha_t and alpha_{t-1} (DDIM's alpha is the cumulative product ᾱ)
    alphas_cumprod = scheduler.alphas_cumprod.to(device, torch.float32)
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_prev = torch.where(
        prev_t >= 0,
        alphas_cumprod[prev_t.clamp(min=0)],
        torch.as_tensor(float(scheduler.final_alpha_cumprod), device=device),
    )

    # 3. sigma_t(eta) (Eq. 16)
    variance = (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
    std = eta * variance.sqrt()
    a, b = affine_coefficients(config.prediction_type, alpha_prod_t, alpha_prod_prev, std)
    table = torch.stack([alpha_prod_t, alpha_prod_prev, std, a, b], dim=1)
    _coefficient_tables[scheduler] = (key, table)
    return table


def _clipped_mean(scheduler, sample, model_output, alpha_prod_t, alpha_prod_prev, std) -> torch.Tensor:
    """The DDIM mean (Eq. 12) with x̂_0 clipped or thresholded as the scheduler is configured to:
    ``[B, C, h, w]`` from the state, the model output and per-sample ``[B, 1, 1, 1]`` coefficients."""
    config = scheduler.config
    # predicted x_0 and epsilon from the model output (Eq. 12, "predicted x_0"), x_0 clipped
    pred_x0, pred_eps = _x0_and_eps(config.prediction_type, sample, model_output, alpha_prod_t)
    if config.thresholding:
        pred_x0 = scheduler._threshold_sample(pred_x0)
    else:
        pred_x0 = pred_x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    # "direction pointing to x_t" and the mean
    direction = (1 - alpha_prod_prev - std**2).clamp(min=0).sqrt() * pred_eps
    return alpha_prod_prev.sqrt() * pred_x0 + direction


def _x0_and_eps(
    prediction_type: str, sample, model_output, alpha_prod_t
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) implied by the model output at a state with cumulative alpha ``alpha_prod_t``
    (DDIM Eq. 12's "predicted x_0"; Tweedie's estimate E[x_0 | x_t] for an epsilon model)."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt(), model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_prod_t.sqrt() * model_output) / beta_prod_t.sqrt()
    if prediction_type == "v_prediction":
        return (
            alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output,
            alpha_prod_t.sqrt() * model_output + beta_prod_t.sqrt() * sample,
        )
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")


def predicted_x0(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """The posterior-mean (Tweedie) estimate x̂_0(x_t) from the model output at ``timestep``
    (an int or ``[B]``); ``[B, C, h, w]`` -> ``[B, C, h, w]`` float32, unclipped."""
    t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1).expand(sample.shape[0])
    alphas_cumprod = scheduler.alphas_cumprod.to(sample.device, torch.float32)
    alpha_prod_t = _per_sample(alphas_cumprod, t, sample.ndim)
    return _x0_and_eps(scheduler.config.prediction_type, sample.float(), model_output.float(), alpha_prod_t)[
        0
    ]


def affine_coefficients(
    prediction_type: str, alpha_prod_t: torch.Tensor, alpha_prod_prev: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with mean = a x_t + b model_output, the unclipped DDIM mean (Eq. 12) written out.

    With c = sqrt(1 - ᾱ_{t-1} - sigma_t^2) and x_0, eps expressed through the model output:
      epsilon:      a = sqrt(ᾱ_{t-1} / ᾱ_t),                   b = c - sqrt(ᾱ_{t-1} (1 - ᾱ_t) / ᾱ_t)
      v_prediction: a = sqrt(ᾱ_{t-1} ᾱ_t) + c sqrt(1 - ᾱ_t),   b = c sqrt(ᾱ_t) - sqrt(ᾱ_{t-1} (1 - ᾱ_t))
      sample:       a = c / sqrt(1 - ᾱ_t),                     b = sqrt(ᾱ_{t-1}) - c sqrt(ᾱ_t / (1 - ᾱ_t))
    All tensors ``[B, 1, ..., 1]``; returns the same shape.
    """
    c = (1 - alpha_prod_prev - std**2).clamp(min=0).sqrt()
    sa_t, sb_t, sa_prev = alpha_prod_t.sqrt(), (1 - alpha_prod_t).sqrt(), alpha_prod_prev.sqrt()
    if prediction_type == "epsilon":
        return sa_prev / sa_t, c - sa_prev * sb_t / sa_t
    if prediction_type == "v_prediction":
        return sa_prev * sa_t + c * sb_t, c * sa_t - sa_prev * sb_t
    if prediction_type == "sample":
        return c / sb_t, sa_prev - c * sa_t / sb_t
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")
