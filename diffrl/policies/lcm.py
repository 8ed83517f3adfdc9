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

from diffrl.ops import fused_affine_step_logprob, gaussian_logprob, use_triton
from diffrl.policies.ddim import predicted_x0
from diffrl.types import StepOutput


def guidance_embedding(
    pipe, guidance_scale: float, batch: int, device=None, dtype=None
) -> torch.Tensor | None:
    """``timestep_cond`` for an LCM UNet: the embedding of w − 1 (LCM's convention), ``[B, d]`` on
    ``device`` in ``dtype`` (default the pipeline's execution device and the UNet's dtype, which
    diffusers finds by walking every module); None when the UNet has no guidance embedding."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.full((batch,), guidance_scale - 1.0)
    return pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(
        device or pipe._execution_device, dtype or pipe.unet.dtype
    )


def next_timestep(scheduler: LCMScheduler, timestep: int) -> int | None:
    """The timestep after ``timestep`` in the scheduler's current schedule; None after the last."""
    steps = scheduler.timesteps.tolist()
    index = steps.index(int(timestep))
    return steps[index + 1] if index + 1 < len(steps) else None


def boundary_scalings(scheduler: LCMScheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) of LCM Eq. 9 (σ_d = 0.5, t scaled by ``timestep_scaling``) for integer
    timesteps ``t [B]``, each ``[B, 1, 1, 1]`` float32; equal to the scheduler's
    ``get_scalings_for_boundary_condition_discrete``."""
    scaled = t.float().view(-1, 1, 1, 1) * scheduler.config.timestep_scaling
    sigma2 = 0.5**2
    return sigma2 / (scaled**2 + sigma2), scaled / (scaled**2 + sigma2).sqrt()


def lcm_step_with_logprob(
    scheduler: LCMScheduler,
    noise_pred: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One consistency-sampler step x_t -> x_t' with the log-probability of the action.

    Args:
        scheduler: an ``LCMScheduler`` on which ``set_timesteps(H)`` was called.
        noise_pred: the UNet output at (x_t, t) with its guidance embedding, ``[B, C, h, w]``.
        timestep: t, an int in ``scheduler.timesteps`` or a ``[B]`` tensor of them (one per
            sample, as in training); either all or none of them the schedule's last.
        sample: x_t ``[B, C, h, w]``; prev_sample: an action to score instead of sampling one.

    Returns:
        :class:`StepOutput`: ``prev_sample`` x_t' (or f on the last step), ``log_prob`` ``[B]``
        element-mean (None on the last step), ``mean`` √ᾱ_t'·f and ``std`` √(1 − ᾱ_t') ``[B,1,1,1]``.
        ``log_prob`` carries gradient to ``noise_pred``; the action is detached.
    """
    batch, device = sample.shape[0], sample.device
    t = torch.as_tensor(timestep, device=device).long().reshape(-1).expand(batch)
    following = [next_timestep(scheduler, v) for v in t.tolist()]
    c_skip, c_out = boundary_scalings(scheduler, t)
    if all(n is None for n in following):  # the last step: the consistency output f, no action
        f = c_skip * sample.float() + c_out * predicted_x0(scheduler, noise_pred, t, sample)
        return StepOutput(prev_sample=f.detach(), log_prob=None, mean=f, std=torch.zeros_like(c_skip))
    if None in following:
        raise ValueError(f"timesteps {t.tolist()} mix the schedule's last step with earlier ones")
    alphas = scheduler.alphas_cumprod.to(device, torch.float32)
    alpha_t = alphas[t].view(-1, 1, 1, 1)
    alpha_next = alphas[torch.tensor(following, device=device)].view(-1, 1, 1, 1)
    std = (1 - alpha_next).sqrt()
    noise = None
    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=device, dtype=torch.float32)
    if scheduler.config.prediction_type == "epsilon" and use_triton(sample, noise_pred, op="lcm step"):
        # mean = √ᾱ_t'·(c_skip·x + c_out·(x − √(1−ᾱ_t)·ε̂)/√ᾱ_t) is affine in (x, ε̂): the fused kernel
        a = alpha_next.sqrt() * (c_skip + c_out / alpha_t.sqrt())
        b = -alpha_next.sqrt() * c_out * (1 - alpha_t).sqrt() / alpha_t.sqrt()
        mean, prev, log_prob = fused_affine_step_logprob(
            sample.float(),
            noise_pred,
            a,
            b,
            std,
            noise=noise,
            prev_sample=None if prev_sample is None else prev_sample.detach().float(),
        )
        return StepOutput(prev_sample=prev.detach(), log_prob=log_prob, mean=mean, std=std)
    f = c_skip * sample.float() + c_out * predicted_x0(scheduler, noise_pred, t, sample)
    mean = alpha_next.sqrt() * f
    if prev_sample is None:
        prev_sample = mean + std * noise
    prev_sample = prev_sample.detach().float()
    return StepOutput(
        prev_sample=prev_sample, log_prob=gaussian_logprob(prev_sample, mean, std), mean=mean, std=std
    )
