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


def initial_noise(pipe, batch: int, height, width, generator, latents) -> torch.Tensor:
    """x_T ``[B, C, h, w]`` float32: the given ``latents`` or fresh noise, times the scheduler's
    initial sigma. ``height``/``width`` default to the UNet's native size."""
    device = pipe._execution_device
    scale = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    if height % scale or width % scale:
        raise ValueError(f"height and width must be multiples of {scale}, got {height}x{width}")
    shape = (batch, pipe.unet.config.in_channels, height // scale, width // scale)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents shape {tuple(latents.shape)}, expected {shape}")
    # states and actions are kept in float32 whatever the model dtype (DESIGN.md: log-probs in fp32)
    return latents.to(device, torch.float32) * pipe.scheduler.init_noise_sigma


def _denoise(pipe, latents, timesteps, prompt_embeds, negative_embeds, guidance_scale, eta, generator):
    """Run the DDIM policy over ``timesteps`` from ``latents`` ``[B, C, h, w]``.

    Returns (the states after each step, a list of ``len(timesteps)`` tensors ``[B, C, h, w]``;
    their log-probs, a list of ``[B]``, or Nones when eta = 0).
    """
    states, log_probs = [], []
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
    return states, log_probs


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
    return sample_branches(
        pipe,
        prompts,
        branch_step=0,
        num_branches=1,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        generator=generator,
        height=height,
        width=width,
        negative_prompt=negative_prompt,
        latents=latents,
    )


@torch.no_grad()
def sample_branches(
    pipe,
    prompts: list[str],
    *,
    branch_step: int,
    num_branches: int,
    num_steps: int = 50,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str = "",
    latents: torch.Tensor | None = None,
) -> Trajectory:
    """Branch sampling (B²-DiffuRL, Hu et al. 2025, Sec. 4.2): each of the B chains runs its first
    ``branch_step`` = b steps once (the trunk); then ``num_branches`` = K branches continue from
    x_b with independent noise to x_0. The trunk's UNet calls are made once, not once per branch:
    B·b + B·K·(N − b) sample evaluations (twice that with guidance, which batches both branches).

    Args as :func:`sample_trajectories`, plus ``branch_step`` in [0, N] and ``num_branches`` >= 1.
    With b = 0 and K = 1 this is plain sampling, draw for draw.

    Returns:
        :class:`Trajectory` of B·K chains ordered trunk-major (chain i·K + k is branch k of trunk
        i), with ``parents [B·K]`` = i; the shared prefix ``latents[:, :b+1]`` and its log-probs
        are copied into every branch.
    """
    if not 0 <= branch_step <= num_steps or num_branches < 1:
        raise ValueError(
            f"branch_step must be in [0, {num_steps}] and num_branches >= 1, got {branch_step}, {num_branches}"
        )
    guided = guidance_scale > 1.0
    prompt_embeds, negative_embeds = encode_prompts(pipe, prompts, negative_prompt, guided)
    x = initial_noise(pipe, len(prompts), height, width, generator, latents)
    pipe.scheduler.set_timesteps(num_steps, device=pipe._execution_device)
    timesteps = pipe.scheduler.timesteps
    args = (guidance_scale, eta, generator)
    trunk, trunk_log_probs = _denoise(pipe, x, timesteps[:branch_step], prompt_embeds, negative_embeds, *args)

    def fan_out(tensor):
        return None if tensor is None else tensor.repeat_interleave(num_branches, dim=0)

    prompt_embeds, negative_embeds = fan_out(prompt_embeds), fan_out(negative_embeds)
    start = fan_out(trunk[-1] if trunk else x)
    branches, branch_log_probs = _denoise(
        pipe, start, timesteps[branch_step:], prompt_embeds, negative_embeds, *args
    )
    states = [fan_out(s) for s in [x, *trunk]] + branches
    log_probs = [fan_out(lp) for lp in trunk_log_probs] + branch_log_probs
    return Trajectory(
        prompts=[p for p in prompts for _ in range(num_branches)],
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        latents=torch.stack(states, dim=1),
        timesteps=timesteps.clone(),
        log_probs=torch.stack(log_probs, dim=1) if eta > 0 else None,
        images=decode_latents(pipe, states[-1]),
        parents=None if num_branches == 1 else torch.arange(len(prompts)).repeat_interleave(num_branches),
    )
