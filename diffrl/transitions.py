"""A pipeline's sampler as the MDP's transition π(x' | x_t, prompt), one class per model family.

A transition encodes the prompts (cached), draws x_T, sets the schedule, calls the denoiser
(guided as the pipeline guides) and takes the stochastic step with its log-prob:

=======  ==========================================  ==============================================
family   pipelines                                   step (policy)
=======  ==========================================  ==============================================
ddim     ``StableDiffusionPipeline`` (SD 1.x/2.x)    DDIM with ``eta``, classifier-free guidance
                                                     (:mod:`diffrl.policies.ddim`)
lcm      ``LatentConsistencyModelPipeline``          consistency step, guidance embedding; the
                                                     last of H steps is deterministic
                                                     (:mod:`diffrl.policies.lcm`)
flow     ``StableDiffusion3Pipeline`` (SD3, SD3.5),  Flow-GRPO SDE with noise level a = ``eta``,
         ``FluxPipeline`` (FLUX.1-dev, -schnell)     CPS, or the Euler ODE at ``eta`` = 0
                                                     (:mod:`diffrl.policies.flow`)
=======  ==========================================  ==============================================

:func:`transition_for` picks the class. Both have the same methods — ``encode``, ``noise``,
``schedule``, ``noise_pred`` (ε̂ for a UNet, the velocity v for a flow transformer), ``step``,
``actions``, ``finish``, ``begin`` — so rollouts, guidance and the learner never ask which.
Latents are kept ``[B, C, h, w]`` float32 for every family (FLUX's 2x2 packing happens inside
``noise_pred`` only; the step is elementwise, so its element-mean log-prob is the same either way).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FluxPipeline, LCMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffrl.policies.ddim import ddim_step_with_logprob
from diffrl.policies.ddim import predicted_x0 as ddim_predicted_x0
from diffrl.policies.flow import flow_step_with_logprob
from diffrl.policies.flow import predicted_x0 as flow_predicted_x0
from diffrl.policies.lcm import guidance_embedding, lcm_step_with_logprob
from diffrl.text import encode_prompts
from diffrl.types import SamplerSettings, StepOutput, Text


def family(pipe) -> str:
    """``"flow"`` for a pipeline with a flow-matching transformer (SD3, FLUX), ``"lcm"`` for one with
    an ``LCMScheduler``, else ``"ddim"``."""
    if getattr(pipe, "transformer", None) is not None:
        return "flow"
    return "lcm" if isinstance(pipe.scheduler, LCMScheduler) else "ddim"


def denoiser(pipe) -> torch.nn.Module:
    """The network a run trains: the UNet of SD/LCM pipelines, the transformer of SD3/FLUX."""
    return pipe.transformer if family(pipe) == "flow" else pipe.unet


def execution_device(pipe) -> torch.device:
    """Where ``pipe`` runs its models: the denoiser's device, or diffusers' ``_execution_device``
    when a component carries an offloading hook (that lookup walks every module of every
    component: 5 ms per call for SD3's three text encoders, 3% of a tiny-flow rollout)."""
    model = denoiser(pipe)
    if any(hasattr(c, "_hf_hook") for c in pipe.components.values()):
        return pipe._execution_device
    return next(model.parameters()).device


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


def _latent_shape(pipe, batch: int, height, width, channels: int, factor: int) -> tuple[int, ...]:
    """``[B, C, h, w]`` of x_T for ``height`` x ``width`` pixels (None: the denoiser's native size,
    ``config.sample_size`` latent cells, or the pipeline's ``default_sample_size`` for FLUX),
    checked to be a multiple of ``factor`` pixels."""
    native = getattr(denoiser(pipe).config, "sample_size", None) or pipe.default_sample_size
    native = native[0] if isinstance(native, (list, tuple)) else native
    scale = pipe.vae_scale_factor
    height = height or native * scale
    width = width or native * scale
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    return (batch, channels, height // scale, width // scale)


def _initial(shape, generator, latents, device) -> torch.Tensor:
    """The given ``latents`` (checked against ``shape``) or fresh noise, float32 on ``device``:
    states and actions are float32 whatever the model dtype (DESIGN.md: log-probs in fp32)."""
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents shape {tuple(latents.shape)}, expected {tuple(shape)}")
    return latents.to(device, torch.float32)


class _Begin:
    """``begin``/``start``, shared by the transitions: everything before the first step."""

    def begin(self, prompts, settings: SamplerSettings, generator, latents=None):
        """Text, x_T (``latents`` or fresh noise) and the schedule's timesteps on the pipeline's
        execution device (:func:`execution_device`, looked up once)."""
        device = execution_device(self.pipe)
        text = self.encode(prompts, settings.negative_prompt, device)
        x = self.noise(len(prompts), settings.height, settings.width, generator, latents, device)
        return text, x, self.schedule(settings.num_steps, x)

    def start(self, prompts, settings: SamplerSettings, generator):
        """:meth:`begin` and the first model output (the only one not made for a candidate)."""
        text, x, timesteps = self.begin(prompts, settings, generator)
        return text, x, timesteps, self.noise_pred(x, timesteps[0], text)


@dataclass
class UNetTransition(_Begin):
    """The DDIM step (``eta``, classifier-free guidance) for Stable Diffusion, the consistency step
    (guidance embedding, no doubling; :mod:`diffrl.policies.lcm`) for a latent consistency model."""

    pipe: object
    guidance_scale: float
    eta: float

    @property
    def is_lcm(self) -> bool:
        return isinstance(self.pipe.scheduler, LCMScheduler)

    @property
    def stochastic(self) -> bool:
        """Whether the actions have densities (DDIM at eta = 0 is deterministic)."""
        return self.is_lcm or self.eta > 0

    def encode(self, prompts: list[str], negative_prompt: str, device) -> Text:
        """:class:`Text` on ``device``; the negative only with classifier-free guidance."""
        guided = self.guidance_scale > 1.0 and not self.is_lcm
        return encode_prompts(self.pipe, prompts, negative_prompt, guided, device)

    def noise(self, batch, height, width, generator, latents, device) -> torch.Tensor:
        """x_T ``[B, C, h, w]`` float32: ``latents`` or fresh noise, times the initial sigma."""
        shape = _latent_shape(
            self.pipe, batch, height, width, self.pipe.unet.config.in_channels, self.pipe.vae_scale_factor
        )
        return _initial(shape, generator, latents, device) * self.pipe.scheduler.init_noise_sigma

    def schedule(self, num_steps: int, x: torch.Tensor) -> torch.Tensor:
        """``set_timesteps(num_steps)`` on the pipeline's scheduler; its timesteps ``[N]``."""
        self.pipe.scheduler.set_timesteps(num_steps, device=x.device)
        return self.pipe.scheduler.timesteps

    def noise_pred(self, x, t, text: Text, unet=None) -> torch.Tensor:
        """ε̂(x_t, t) ``[B, C, h, w]`` float32 from ``unet`` (default the pipeline's), guided as the
        pipeline is; ``t`` a scalar or ``[B]``."""
        unet = unet if unet is not None else self.pipe.unet
        if self.is_lcm:
            cond = guidance_embedding(self.pipe, self.guidance_scale, x.shape[0], x.device, text.embeds.dtype)
            return guided_noise_pred(unet, x, t, text.embeds, None, 1.0, timestep_cond=cond)
        model_input = self.pipe.scheduler.scale_model_input(x, t)
        return guided_noise_pred(unet, model_input, t, text.embeds, text.negative, self.guidance_scale)

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

    def predicted_x0(self, eps, t, x) -> torch.Tensor:
        """The Tweedie estimate x̂0 of ``x`` at ``t`` from the UNet's output
        (:func:`diffrl.policies.ddim.predicted_x0`), ``[B, C, h, w]`` float32."""
        return ddim_predicted_x0(self.pipe.scheduler, eps, t, x)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The forward process x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε at ``t`` (a scalar or ``[B]``),
        ``[B, C, h, w]`` float32 (the scheduler's ``add_noise``)."""
        t = torch.as_tensor(t, device=x0.device).long().reshape(-1).expand(x0.shape[0])
        return self.pipe.scheduler.add_noise(x0.float(), noise.float(), t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The UNet's regression target at ``add_noise(x0, noise, t)`` (the diffusion training
        loss's) per ``prediction_type``: ε, v = √ᾱ_t ε − √(1 − ᾱ_t) x0 (SD 2.x 768) or x0,
        ``[B, C, h, w]`` float32."""
        scheduler = self.pipe.scheduler
        if scheduler.config.prediction_type == "sample":
            return x0.float()
        if scheduler.config.prediction_type == "v_prediction":
            t = torch.as_tensor(t, device=x0.device).long().reshape(-1).expand(x0.shape[0])
            return scheduler.get_velocity(x0.float(), noise.float(), t)
        return noise.float()

    def actions(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timesteps whose steps are stochastic actions of the MDP: all of DDIM's; all but the
        last of an LCM's H (its last step maps x_{τ_H} to the final latents deterministically)."""
        return timesteps[:-1] if self.is_lcm else timesteps

    def finish(self, x: torch.Tensor, timesteps: torch.Tensor, text: Text) -> torch.Tensor:
        """The final latents from the last action's state: an LCM's deterministic last consistency
        step f(x_{τ_H}); DDIM's last action already is x_0."""
        if not self.is_lcm:
            return x
        last = timesteps[-1]
        return self.step(self.noise_pred(x, last, text), last, x).prev_sample


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX's token layout: ``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``, each token a 2x2 patch
    (channel-major within the patch, as ``FluxPipeline`` packs)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``[B, (h/2)(w/2), 4C]`` -> ``[B, C, h, w]``."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FLUX's position ids of the packed latent tokens: ``[(h/2)(w/2), 3]`` rows (0, row, col)."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def image_seq_len(pipe, x: torch.Tensor) -> int:
    """Image tokens the transformer sees for latents ``x [B, C, h, w]``: (h/p)(w/p), p = 2 for
    FLUX's packing, else the transformer's patch size."""
    patch = 2 if isinstance(pipe, FluxPipeline) else pipe.transformer.config.patch_size
    return (x.shape[-2] // patch) * (x.shape[-1] // patch)


def shift_mu(pipe, seq_len: int) -> float:
    """The dynamic shift μ of the schedule for ``seq_len`` image tokens: linear from
    ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (FLUX's
    ``calculate_shift``, with its defaults where the scheduler config has none)."""
    c = pipe.scheduler.config
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return seq_len * slope + base - slope * base_len


@dataclass
class FlowTransition(_Begin):
    """The flow-matching step of SD3/SD3.5 (classifier-free guidance on the velocity, a "" negative
    by default) and FLUX (FLUX.1-dev's guidance embedding; FLUX.1-schnell has none; no CFG), with
    the pipeline's own schedule (static shift for SD3, the resolution-dependent dynamic shift μ with
    sigmas linspace(1, 1/N, N) for FLUX) and the step of :mod:`diffrl.policies.flow`: the Flow-GRPO
    SDE (``kind="sde"``) or CPS (``kind="cps"``) with noise level a = ``eta``, the Euler ODE at
    ``eta`` = 0 (deterministic, no log-prob); prompts encoded with ``max_sequence_length`` T5 tokens."""

    pipe: object
    guidance_scale: float
    eta: float
    kind: str = "sde"
    max_sequence_length: int | None = None

    @property
    def is_flux(self) -> bool:
        return isinstance(self.pipe, FluxPipeline)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def encode(self, prompts: list[str], negative_prompt: str, device) -> Text:
        """:class:`Text` with pooled embeddings; the negative only for SD3 with guidance > 1."""
        guided = self.guidance_scale > 1.0 and not self.is_flux
        return encode_prompts(self.pipe, prompts, negative_prompt, guided, device, self.max_sequence_length)

    def noise(self, batch, height, width, generator, latents, device) -> torch.Tensor:
        """x_T = ε ``[B, C, h, w]`` float32 (σ = 1 is pure noise); FLUX's sides must be multiples
        of twice the VAE factor (2x2 packing)."""
        channels = self.pipe.transformer.config.in_channels // (4 if self.is_flux else 1)
        factor = self.pipe.vae_scale_factor * (2 if self.is_flux else 1)
        shape = _latent_shape(self.pipe, batch, height, width, channels, factor)
        return _initial(shape, generator, latents, device)

    def schedule(self, num_steps: int, x: torch.Tensor) -> torch.Tensor:
        """The pipeline's schedule for ``num_steps`` and latents like ``x``; timesteps ``[N]`` =
        1000 σ (the scheduler's ``sigmas`` hold σ_0..σ_N, σ_N = 0)."""
        scheduler = self.pipe.scheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            kwargs["mu"] = shift_mu(self.pipe, image_seq_len(self.pipe, x))
        if self.is_flux and not scheduler.config.get("use_flow_sigmas"):
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
            scheduler.set_timesteps(device=x.device, **kwargs)
        else:
            scheduler.set_timesteps(num_steps, device=x.device, **kwargs)
        return scheduler.timesteps

    def noise_pred(self, x, t, text: Text, unet=None) -> torch.Tensor:
        """The velocity v(x_σ, σ) ``[B, C, h, w]`` float32 from ``unet`` (default the pipeline's
        transformer; the name is the interface's), classifier-free guided for SD3 when the text
        has a negative; ``t`` = 1000 σ, a scalar or ``[B]``."""
        model = unet if unet is not None else self.pipe.transformer
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        x_in = x.to(text.embeds.dtype)
        if self.is_flux:
            h, w = x.shape[-2:]
            guidance = None
            if model.config.guidance_embeds:
                guidance = torch.full((b,), float(self.guidance_scale), device=x.device)
            out = model(
                hidden_states=pack_latents(x_in),
                timestep=t / 1000,
                guidance=guidance,
                pooled_projections=text.pooled,
                encoder_hidden_states=text.embeds,
                txt_ids=torch.zeros(text.embeds.shape[1], 3, device=x.device, dtype=x_in.dtype),
                img_ids=image_ids(h, w, x.device, x_in.dtype),
                return_dict=False,
            )[0]
            return unpack_latents(out.float(), h, w)
        if text.negative is None or self.guidance_scale <= 1.0:
            return model(
                hidden_states=x_in,
                timestep=t,
                encoder_hidden_states=text.embeds,
                pooled_projections=text.pooled,
                return_dict=False,
            )[0].float()
        out = model(
            hidden_states=torch.cat([x_in, x_in]),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([text.negative, text.embeds]),
            pooled_projections=torch.cat([text.negative_pooled, text.pooled]),
            return_dict=False,
        )[0]
        uncond, cond = out.float().chunk(2)
        return torch.lerp(uncond, cond, self.guidance_scale)

    def step(self, v, t, x, generator=None, prev_sample=None) -> StepOutput:
        """x at the next σ given x at σ = t / 1000 and its velocity: the flow step of ``kind``
        (ODE at eta = 0) from the scheduler's σ_i to σ_{i+1}, one pair per sample when ``t`` is ``[B]``."""
        index = self._index(t, x.device)
        sigmas = self.pipe.scheduler.sigmas.to(x.device, torch.float32)
        return flow_step_with_logprob(
            v,
            x,
            sigmas[index],
            sigmas[index + 1],
            kind=self.kind if self.eta > 0 else "ode",
            noise_level=self.eta,
            sigma_after_one=sigmas[1],
            generator=generator,
            prev_sample=prev_sample,
        )

    def _index(self, t, device) -> torch.Tensor:
        """The position of each ``t`` (a scalar or ``[B]``) on the scheduler's schedule; off-schedule
        timesteps are refused."""
        timesteps = self.pipe.scheduler.timesteps.to(device)
        t = torch.as_tensor(t, device=device, dtype=timesteps.dtype).reshape(-1)
        match = (t[:, None] == timesteps[None, :]).float()
        if not bool((match.sum(dim=1) == 1).all()):
            raise ValueError(
                f"timesteps {t.tolist()} are not on the scheduler's schedule {timesteps.tolist()}"
            )
        return match.argmax(dim=1)

    def predicted_x0(self, v, t, x) -> torch.Tensor:
        """x̂0 = x − σ v at σ of ``t`` (:func:`diffrl.policies.flow.predicted_x0`), ``[B, C, h, w]``."""
        sigma = self.pipe.scheduler.sigmas.to(x.device, torch.float32)[self._index(t, x.device)]
        return flow_predicted_x0(v, sigma, x)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The forward process x_σ = (1 − σ) x0 + σ ε at σ of ``t`` (a scalar or ``[B]`` on the
        schedule), ``[B, C, h, w]`` float32."""
        sigma = self.pipe.scheduler.sigmas.to(x0.device, torch.float32)[self._index(t, x0.device)]
        sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
        return (1 - sigma) * x0.float() + sigma * noise.float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The flow-matching target velocity ε − x0 of ``add_noise(x0, noise, t)`` (the
        derivative of x_σ in σ), ``[B, C, h, w]`` float32."""
        return noise.float() - x0.float()

    @property
    def _last_is_deterministic(self) -> bool:
        """CPS onto σ' = 0 has std σ' sin(aπ/2) = 0: a deterministic map, not an action."""
        return self.eta > 0 and self.kind == "cps"

    def actions(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The stochastic steps: every one for the SDE (the last, onto σ = 0, too: Flow-GRPO samples
        it with the SDE) and the ODE; all but the last for CPS (:meth:`finish` takes that one)."""
        return timesteps[:-1] if self._last_is_deterministic else timesteps

    def finish(self, x: torch.Tensor, timesteps: torch.Tensor, text: Text) -> torch.Tensor:
        """The final latents: CPS's deterministic last step onto σ = 0 (x̂0 of the last state);
        otherwise the last action's state already is x_0."""
        if not self._last_is_deterministic:
            return x
        last = timesteps[-1]
        return self.step(self.noise_pred(x, last, text), last, x).prev_sample


def transition_for(pipe, settings: SamplerSettings) -> UNetTransition | FlowTransition:
    """The transition of ``pipe``'s family with the sampler ``settings`` (guidance, eta, the flow step)."""
    if family(pipe) == "flow":
        return FlowTransition(
            pipe, settings.guidance_scale, settings.eta, settings.flow_step, settings.max_sequence_length
        )
    return UNetTransition(pipe, settings.guidance_scale, settings.eta)


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """VAE latents ``[B, C, h, w]`` float32 of images ``[B, 3, H, W]`` in [−1, 1]: the posterior's
    mean, shifted by ``shift_factor`` (SD3/FLUX VAEs) and scaled by ``scaling_factor``, the
    inverse of :func:`decode_latents`."""
    vae = pipe.vae
    dtype = next(vae.parameters()).dtype
    latents = vae.encode(images.to(execution_device(pipe), dtype)).latent_dist.mean.float()
    return (latents - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode final latents ``[B, C, h, w]`` to float32 images ``[B, 3, H, W]`` in [0, 1]
    (undoing ``scaling_factor`` and, for SD3/FLUX VAEs, ``shift_factor``)."""
    vae = pipe.vae
    dtype = next(vae.parameters()).dtype  # vae.dtype walks every module for offloading hooks
    shift = vae.config.get("shift_factor") or 0.0
    images = vae.decode(latents.to(dtype) / vae.config.scaling_factor + shift).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
