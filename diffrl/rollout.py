"""Rollouts: run the stochastic sampler on a diffusers pipeline and record the MDP trajectory.

State s_t = (x_t, t, prompt), action a_t = x_{t-1}, policy = the sampler's Gaussian step
(:class:`Transition`: the DDIM step of :mod:`diffrl.policies.ddim` for Stable Diffusion, the
consistency step of :mod:`diffrl.policies.lcm` for a latent consistency model), reward = a score of
the decoded image. An LCM with H steps has T = H − 1 actions; its last step is deterministic.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers import LCMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffrl.policies.ddim import ddim_step_with_logprob
from diffrl.policies.lcm import guidance_embedding, lcm_step_with_logprob
from diffrl.types import SamplerSettings, StepOutput, Trajectory

PROMPT_CACHE_SIZE = 256
"""Prompt embeddings kept per text encoder (least recently used dropped): 77 x 768 floats each for SD 1.5."""

PLAIN = SamplerSettings()
"""The default sampler: 50 DDIM steps, eta 1, guidance 5, the model's native size."""

_prompt_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prompt_cache(text_encoder: torch.nn.Module) -> OrderedDict:
    """The embedding cache of ``text_encoder``, emptied whenever its parameters changed: a
    parameter added, removed, replaced or modified in place (a LoRA loaded, weights fused or loaded;
    each in-place write bumps the tensor's version counter)."""
    state = tuple((id(p), p._version, p.dtype, p.device) for p in text_encoder.parameters())
    entry = _prompt_caches.get(text_encoder)
    if entry is None or entry[0] != state:
        entry = (state, OrderedDict())
        _prompt_caches[text_encoder] = entry
    return entry[1]


def encode_prompts(
    pipe, prompts: list[str], negative_prompt: str | None, guided: bool, device=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings of ``prompts`` and, when ``guided``, of the negative prompt, on ``device``
    (default the pipeline's execution device).

    Each distinct text is encoded once with ``pipe.encode_prompt`` and cached for the text encoder
    (:data:`PROMPT_CACHE_SIZE` entries, dropped when its parameters change): a training run
    re-draws the same prompts and the same negative prompt every batch. The negative prompt is
    encoded as a prompt, which is what ``encode_prompt`` does for it (same tokenizer padding, same
    encoder call). A LoRA scale changed without touching parameters (``set_adapters``) is not
    seen; diffrl never trains the text encoder.

    Returns ``([B, L, D], [B, L, D] | None)`` in the text encoder's dtype.
    """
    device = torch.device(device or pipe._execution_device)
    texts = list(prompts) + [negative_prompt or ""] if guided else list(prompts)
    cache = _prompt_cache(pipe.text_encoder)
    missing = list(dict.fromkeys(t for t in texts if (t, device) not in cache))
    if missing:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(
                missing, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        cache.update({(t, device): e for t, e in zip(missing, embeds)})
    rows = []
    for t in texts:
        cache.move_to_end((t, device))
        rows.append(cache[(t, device)])
    while len(cache) > PROMPT_CACHE_SIZE:
        cache.popitem(last=False)
    embeds = torch.stack(rows[: len(prompts)])
    return embeds, rows[-1].expand_as(embeds).contiguous() if guided else None


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
    timesteps = torch.as_tensor(timesteps, device=latents.device)
    if timesteps.ndim:  # one per sample (a scalar is broadcast by the UNet itself)
        timesteps = torch.cat([timesteps, timesteps])
    out = unet(
        torch.cat([latents, latents]),
        timesteps,
        encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
        **unet_kwargs,
    ).sample
    uncond, cond = out.float().chunk(2)
    return torch.lerp(uncond, cond, guidance_scale)  # uncond + w (cond - uncond)


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode final latents ``[B, C, h, w]`` to float32 images ``[B, 3, H, W]`` in [0, 1]."""
    vae = pipe.vae
    dtype = next(vae.parameters()).dtype  # vae.dtype walks every module for offloading hooks
    images = vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def initial_noise(pipe, batch: int, height, width, generator, latents, device) -> torch.Tensor:
    """x_T ``[B, C, h, w]`` float32 on ``device``: the given ``latents`` or fresh noise, times the
    scheduler's initial sigma. ``height``/``width`` default to the UNet's native size."""
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


@dataclass
class Transition:
    """The pipeline's stochastic sampler step as a policy π(x_t' | x_t): the DDIM step (``eta``,
    classifier-free guidance) for Stable Diffusion, the consistency step (guidance embedding, no
    doubling; :mod:`diffrl.policies.lcm`) for a latent consistency model."""

    pipe: object
    guidance_scale: float
    eta: float

    @property
    def is_lcm(self) -> bool:
        return isinstance(self.pipe.scheduler, LCMScheduler)

    def encode(self, prompts: list[str], negative_prompt: str, device):
        """Prompt embeddings ``[B, L, D]`` on ``device`` and the negative ones (None without CFG)."""
        guided = self.guidance_scale > 1.0 and not self.is_lcm
        return encode_prompts(self.pipe, prompts, negative_prompt, guided, device)

    def noise_pred(self, x, t, embeds, negative, unet=None) -> torch.Tensor:
        """ε̂(x_t, t) ``[B, C, h, w]`` float32 from ``unet`` (default the pipeline's), guided as the
        pipeline is; ``t`` a scalar or ``[B]``."""
        unet = unet if unet is not None else self.pipe.unet
        if self.is_lcm:
            cond = guidance_embedding(self.pipe, self.guidance_scale, x.shape[0], x.device, embeds.dtype)
            return guided_noise_pred(unet, x, t, embeds, None, 1.0, timestep_cond=cond)
        model_input = self.pipe.scheduler.scale_model_input(x, t)
        return guided_noise_pred(unet, model_input, t, embeds, negative, self.guidance_scale)

    def step(self, eps, t, x, generator=None, prev_sample=None) -> StepOutput:
        """x_t' given x_t and its ε̂: a draw (or ``prev_sample`` scored) with its log-prob, which
        is None for DDIM at eta = 0 and on an LCM's last (deterministic) step, whose
        ``prev_sample`` is the final latents."""
        scheduler = self.pipe.scheduler
        if self.is_lcm:
            return lcm_step_with_logprob(scheduler, eps, t, x, prev_sample=prev_sample, generator=generator)
        return ddim_step_with_logprob(
            scheduler,
            eps,
            t,
            x,
            eta=self.eta,
            prev_sample=prev_sample,
            generator=generator,
            with_logprob=self.eta > 0,
        )

    def actions(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timesteps whose steps are stochastic actions of the MDP: all of DDIM's; all but the
        last of an LCM's H (its last step maps x_{τ_H} to the final latents deterministically)."""
        return timesteps[:-1] if self.is_lcm else timesteps

    def begin(self, prompts, settings: SamplerSettings, generator, latents=None):
        """Embeddings, x_T (``latents`` or fresh noise) and the schedule's timesteps on the
        pipeline's execution device (looked up once: diffusers walks every module for it)."""
        device = self.pipe._execution_device
        embeds, negative = self.encode(prompts, settings.negative_prompt, device)
        x = initial_noise(
            self.pipe, len(prompts), settings.height, settings.width, generator, latents, device
        )
        self.pipe.scheduler.set_timesteps(settings.num_steps, device=device)
        return embeds, negative, x, self.pipe.scheduler.timesteps

    def start(self, prompts, settings: SamplerSettings, generator):
        """:meth:`begin` and the first noise prediction (the only one not made for a candidate)."""
        embeds, negative, x, timesteps = self.begin(prompts, settings, generator)
        return embeds, negative, x, timesteps, self.noise_pred(x, timesteps[0], embeds, negative)


def _denoise(transition: Transition, latents, timesteps, prompt_embeds, negative_embeds, generator):
    """Run the policy over ``timesteps`` from ``latents`` ``[B, C, h, w]``.

    Returns (the states after each step, a list of ``len(timesteps)`` tensors ``[B, C, h, w]``;
    their log-probs, a list of ``[B]``, or Nones when DDIM's eta = 0).
    """
    states, log_probs = [], []
    for t in timesteps:
        noise_pred = transition.noise_pred(latents, t, prompt_embeds, negative_embeds)
        step = transition.step(noise_pred, t, latents, generator=generator)
        latents = step.prev_sample
        states.append(latents)
        log_probs.append(step.log_prob)
    return states, log_probs


@torch.no_grad()
def sample_trajectories(
    pipe,
    prompts: list[str],
    settings: SamplerSettings = PLAIN,
    *,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
) -> Trajectory:
    """Sample one denoising chain per prompt with log-probabilities (DDPO Alg. 1, sampling phase).

    Args:
        pipe: a ``StableDiffusionPipeline``-like pipeline with a ``DDIMScheduler``, or a
            ``LatentConsistencyModelPipeline`` with its ``LCMScheduler`` (RLCM's policy).
        prompts: B prompts.
        settings: steps, guidance, eta, size and negative prompt (:class:`SamplerSettings`).
        generator: RNG for the initial noise and every step's noise.
        latents: optional initial noise x_T ``[B, C, h, w]`` (else drawn from ``generator``).

    Returns:
        :class:`Trajectory`; no autograd graph is kept.
    """
    return sample_branches(
        pipe, prompts, settings, branch_step=0, num_branches=1, generator=generator, latents=latents
    )


@torch.no_grad()
def sample_branches(
    pipe,
    prompts: list[str],
    settings: SamplerSettings = PLAIN,
    *,
    branch_step: int,
    num_branches: int,
    generator: torch.Generator | None = None,
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
    transition = Transition(pipe, settings.guidance_scale, settings.eta)
    prompt_embeds, negative_embeds, x, timesteps = transition.begin(prompts, settings, generator, latents)
    actions = transition.actions(timesteps)
    if not 0 <= branch_step <= len(actions) or num_branches < 1:
        raise ValueError(
            f"branch_step must be in [0, {len(actions)}] and num_branches >= 1, got {branch_step}, {num_branches}"
        )
    trunk, trunk_log_probs = _denoise(
        transition, x, actions[:branch_step], prompt_embeds, negative_embeds, generator
    )

    def fan_out(tensor):
        return None if tensor is None else tensor.repeat_interleave(num_branches, dim=0)

    prompt_embeds, negative_embeds = fan_out(prompt_embeds), fan_out(negative_embeds)
    start = fan_out(trunk[-1] if trunk else x)
    branches, branch_log_probs = _denoise(
        transition, start, actions[branch_step:], prompt_embeds, negative_embeds, generator
    )
    states = [fan_out(s) for s in [x, *trunk]] + branches
    log_probs = [fan_out(lp) for lp in trunk_log_probs] + branch_log_probs
    final = states[-1]
    if transition.is_lcm:  # the deterministic last consistency step: f(x_{τ_H}) is the final latent
        last = timesteps[-1]
        final = transition.step(
            transition.noise_pred(final, last, prompt_embeds, None), last, final
        ).prev_sample
    return Trajectory(
        prompts=[p for p in prompts for _ in range(num_branches)],
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        latents=torch.stack(states, dim=1),
        timesteps=actions.clone(),
        log_probs=torch.stack(log_probs, dim=1) if log_probs and log_probs[0] is not None else None,
        images=decode_latents(pipe, final),
        parents=None if num_branches == 1 else torch.arange(len(prompts)).repeat_interleave(num_branches),
    )


def concat_trajectories(trajectories: list[Trajectory]) -> Trajectory:
    """One trajectory of all samples, the groups (``parents``) numbered on across batches."""
    parents, offset = [], 0
    for t in trajectories:
        own = torch.arange(len(t)) if t.parents is None else t.parents
        parents.append(own + offset)
        offset += int(own.max()) + 1
    negative = [t.negative_prompt_embeds for t in trajectories]
    return Trajectory(
        prompts=[p for t in trajectories for p in t.prompts],
        prompt_embeds=torch.cat([t.prompt_embeds for t in trajectories]),
        negative_prompt_embeds=None if negative[0] is None else torch.cat(negative),
        latents=torch.cat([t.latents for t in trajectories]),
        timesteps=trajectories[0].timesteps,
        log_probs=torch.cat([t.log_probs for t in trajectories]),
        images=torch.cat([t.images for t in trajectories]),
        parents=torch.cat(parents),
    )
