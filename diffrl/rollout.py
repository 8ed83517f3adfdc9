"""Rollouts: run the stochastic sampler on a diffusers pipeline and record the MDP trajectory.

State s_t = (x_t, t, prompt), action a_t = x_{t-1}, policy = the DDIM Gaussian step
(:func:`diffrl.policies.ddim.ddim_step_with_logprob`), reward = a score of the decoded image.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffrl.policies.ddim import ddim_step_with_logprob
from diffrl.types import Trajectory


def encode_prompts(
    pipe, prompts: list[str], negative_prompt: str | None, guided: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings of ``prompts`` and, when ``guided``, of the negative prompt.

    Returns ``([B, L, D], [B, L, D] | None)`` in the text encoder's dtype.
    """
    embeds, negative = pipe.encode_prompt(
        prompts,
        device=pipe._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=guided,
        negative_prompt=[negative_prompt or ""] * len(prompts) if guided else None,
    )
    return embeds, negative


def guided_noise_pred(
    unet,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    guidance_scale: float,
    **unet_kwargs,
) -> torch.Tensor:
    """The classifier-free-guided noise prediction eps_u + w (eps_c - eps_u) in one UNet call.

    Args:
        latents: ``[B, C, h, w]``; timesteps: ``[B]`` or a scalar tensor.
        prompt_embeds, negative_prompt_embeds: ``[B, L, D]``; without the negative (or with
            ``guidance_scale <= 1``) the UNet runs once on the conditional input only.

    Latents are cast to the embeddings' dtype (the model dtype) for the call.

    Returns:
        ``[B, C, h, w]`` float32.
    """
    latents = latents.to(prompt_embeds.dtype)
    if negative_prompt_embeds is None or guidance_scale <= 1.0:
        return unet(latents, timesteps, encoder_hidden_states=prompt_embeds, **unet_kwargs).sample.float()
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
    out = unet(
        torch.cat([latents, latents]),
        torch.cat([timesteps, timesteps]),
        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
        **unet_kwargs,
    ).sample
    uncond, cond = out.float().chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode final latents ``[B, C, h, w]`` to float32 images ``[B, 3, H, W]`` in [0, 1]."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_trajectories(
    pipe,
    prompts: list[str],
    *,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str = "",
    latents: torch.Tensor | None = None,
) -> Trajectory:
    """Sample one denoising chain per prompt with log-probabilities (DDPO Alg. 1, sampling phase).

    Args:
        pipe: a ``StableDiffusionPipeline``-like pipeline with a ``DDIMScheduler``.
        prompts: B prompts.
        num_steps: T, DDIM steps; eta: DDIM stochasticity (0 gives a deterministic chain
            without log-probabilities).
        guidance_scale: classifier-free guidance weight w (<= 1 disables guidance).
        generator: RNG for the initial noise and every step's noise.
        height, width: image size in pixels (default: the UNet's native size).
        latents: optional initial noise x_T ``[B, C, h, w]`` (else drawn from ``generator``).

    Returns:
        :class:`Trajectory`; no autograd graph is kept.
    """
    device = pipe._execution_device
    scale = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    if height % scale or width % scale:
        raise ValueError(f"height and width must be multiples of {scale}, got {height}x{width}")
    guided = guidance_scale > 1.0
    prompt_embeds, negative_embeds = encode_prompts(pipe, prompts, negative_prompt, guided)

    shape = (len(prompts), pipe.unet.config.in_channels, height // scale, width // scale)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents shape {tuple(latents.shape)}, expected {shape}")
    # states and actions are kept in float32 whatever the model dtype (DESIGN.md: log-probs in fp32)
    latents = latents.to(device, torch.float32) * pipe.scheduler.init_noise_sigma

    pipe.scheduler.set_timesteps(num_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    states, log_probs = [latents], []
    for t in timesteps:
        model_input = pipe.scheduler.scale_model_input(latents, t)
        noise_pred = guided_noise_pred(
            pipe.unet, model_input, t, prompt_embeds, negative_embeds, guidance_scale
        )
        step = ddim_step_with_logprob(
            pipe.scheduler, noise_pred, t, latents, eta=eta, generator=generator, with_logprob=eta > 0
        )
        latents = step.prev_sample
        states.append(latents)
        log_probs.append(step.log_prob)

    return Trajectory(
        prompts=list(prompts),
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        latents=torch.stack(states, dim=1),
        timesteps=timesteps.clone(),
        log_probs=torch.stack(log_probs, dim=1) if eta > 0 else None,
        images=decode_latents(pipe, latents),
    )
