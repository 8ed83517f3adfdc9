"""The multi-step latent consistency sampler as a Gaussian policy (RLCM; Oertell et al., "RL for
Consistency Models", 2024, Sec. 4; the sampler is Luo et al., "Latent Consistency Models", Alg. 1).

Code names and paper symbols, for step k of H with timestep t = τ_k and next timestep t' = τ_{k+1}:

    x̂_0  = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t                 the model's x_0 estimate (epsilon models)
    f     = c_skip(t)·x_t + c_out(t)·x̂_0                  the consistency function (LCM Eq. 9, the
            c_skip = σ_d² / ((10t)² + σ_d²), c_out = 10t / √((10t)² + σ_d²), σ_d = 0.5   boundary condition)
    x_t'  ~ N(√ᾱ_t'·f, (1 − ᾱ_t')·I)                       the stochastic action (RLCM's policy)

On the last step the state is f itself (deterministic: no action, no log-probability). Guidance
enters through the UNet's guidance embedding (``timestep_cond``), not classifier-free doubling.
The mean equals diffusers' ``LCMScheduler.step`` denoised output mapped forward by √ᾱ_t'.
"""

from __future__ import annotations

import torch
from diffusers import LCMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffrl.ops import gaussian_logprob
from diffrl.policies.ddim import predicted_x0
from diffrl.types import StepOutput


def guidance_embedding(pipe, guidance_scale: float, batch: int) -> torch.Tensor | None:
    """``timestep_cond`` for an LCM UNet: the embedding of w − 1 (LCM's convention), ``[B, d]``;
    None when the UNet has no guidance embedding."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.full((batch,), guidance_scale - 1.0)
    return pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(pipe._execution_device, pipe.unet.dtype)


def next_timestep(scheduler: LCMScheduler, timestep: int) -> int | None:
    """The timestep after ``timestep`` in the scheduler's current schedule; None after the last."""
    steps = scheduler.timesteps.tolist()
    index = steps.index(int(timestep))
    return steps[index + 1] if index + 1 < len(steps) else None


def lcm_step_with_logprob(
    scheduler: LCMScheduler,
    noise_pred: torch.Tensor,
    timestep: int,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One consistency-sampler step x_t -> x_t' with the log-probability of the action.

    Args:
        scheduler: an ``LCMScheduler`` on which ``set_timesteps(H)`` was called.
        noise_pred: the UNet output at (x_t, t) with its guidance embedding, ``[B, C, h, w]``.
        timestep: t, an int in ``scheduler.timesteps``.
        sample: x_t ``[B, C, h, w]``; prev_sample: an action to score instead of sampling one.

    Returns:
        :class:`StepOutput`: ``prev_sample`` x_t' (or f on the last step), ``log_prob`` ``[B]``
        element-mean (None on the last step), ``mean`` √ᾱ_t'·f and ``std`` √(1 − ᾱ_t') ``[B,1,1,1]``.
    """
    t = int(timestep)
    x0 = predicted_x0(scheduler, noise_pred, t, sample)
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    f = c_skip * sample.float() + c_out * x0
    t_next = next_timestep(scheduler, t)
    if t_next is None:
        ones = torch.ones(sample.shape[0], *([1] * (sample.ndim - 1)), device=sample.device)
        return StepOutput(prev_sample=f.detach(), log_prob=None, mean=f, std=0 * ones)
    alpha_next = scheduler.alphas_cumprod[t_next].to(sample.device, torch.float32)
    mean = alpha_next.sqrt() * f
    std = (1 - alpha_next).sqrt() * torch.ones(
        sample.shape[0], *([1] * (sample.ndim - 1)), device=sample.device
    )
    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.detach().float()
    return StepOutput(
        prev_sample=prev_sample, log_prob=gaussian_logprob(prev_sample, mean, std), mean=mean, std=std
    )
