"""Soft value-based decoding (SVDD; Li, Uehara et al., "Derivative-Free Guidance in Continuous
and Discrete Diffusion Models with Soft Value-Based Decoding", 2024) and its baselines.

SVDD samples from the reward-tilted distribution p^(α)(x_0) ∝ p_pre(x_0)·exp(r(x_0)/α) (Eq. 1)
with the pretrained model unchanged and no reward gradients, so r may be a JPEG size, a verifier
or a remote scorer. The soft value v_{t-1}(x) = α·log E_pre[exp(r(x_0)/α) | x_{t-1} = x] (Eq. 4)
turns the tilted chain into a per-step choice (Alg. 1): for each particle, draw M candidates
x_{t-1}^(m) ~ p_pre(· | x_t), weight them by softmax(v̂(x_{t-1}^(m))/α) and keep one by sampling
(α = 0: the argmax, the released code's default). Values are only ever compared inside a softmax
over v/α (max-subtracted), never exponentiated raw, so rewards in the thousands stay finite.

Value estimates (Sec. 4.2):
  * **SVDD-PM** (:func:`posterior_mean_value`): v̂(x_{t-1}) = r(decode(x̂_0(x_{t-1}))), the reward of
    the Tweedie estimate from the candidate's own noise prediction at t-1. That prediction is
    exactly what the chosen candidate needs for its next step, so it is reused, not recomputed:
    one UNet evaluation per candidate, P + P·M·(T−1) per P images (the released code makes
    (M+1)·T). The last step has no selection (its one child is the image).
  * **SVDD-MC** (:func:`diffrl.guidance.value.value_net_value`): a small network v(x_t, t, prompt) regressed on rollouts
    of the pretrained model (Eq. 6 with α → 0: plain regression of r(x_0) on the states;
    :mod:`diffrl.guidance.value`, ``diffrl train-value``).
  * **SVDD-R**: after each step the worst ``resample_fraction`` of a prompt's particles are
    replaced by copies drawn ∝ exp(v̂/α) among that prompt's particles.

Baselines at matched UNet evaluations: :func:`best_of_n` (N = M independent chains per image, keep
the best final reward) and :func:`smc` (N = M particles per image, incremental weights
exp(v̂_{t-1}/α)/exp(v̂_t/α), resampling every step within the image's particles).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffrl.transitions import decode_latents, transition_for
from diffrl.types import SamplerSettings

GUIDED = SamplerSettings(guidance_scale=7.5)
"""The guided samplers' default settings (the SVDD paper's SD 1.5 guidance)."""

ValueFn = Callable[..., torch.Tensor]
"""``value(pipe, latents [N, C, h, w], timestep, noise_pred [N, C, h, w], prompts [N], prompt_embeds [N, L, D]) -> [N]``."""


@dataclass
class GuidedSamples:
    """What a guided sampler returns."""

    images: torch.Tensor
    """``[P, 3, H, W]`` float32 in [0, 1], one per prompt."""
    latents: torch.Tensor
    """The final latents ``[P, C, h, w]``."""
    unet_calls: int
    """Guided UNet evaluations made (one per sample and step; classifier-free guidance batches its
    two branches into the same call and counts once)."""


# ---------------------------------------------------------------------------- value estimates


def posterior_mean_value(reward_fn) -> ValueFn:
    """SVDD-PM: the reward of the decoded estimate x̂_0 of each state (Tweedie's from a UNet's
    noise prediction; x − σ v from a flow model's velocity)."""

    def value(pipe, latents, timestep, noise_pred, prompts, prompt_embeds):
        x0 = transition_for(pipe, GUIDED).predicted_x0(noise_pred, timestep, latents)
        images = decode_latents(pipe, x0)
        return reward_fn(images, list(prompts), [{} for _ in prompts]).to(latents.device)

    return value


# ---------------------------------------------------------------------------- selection


def select_candidates(values: torch.Tensor, alpha: float, generator: torch.Generator | None) -> torch.Tensor:
    """One candidate per row of ``values [P, M]``: argmax when ``alpha == 0``, else a draw from
    softmax(values/α) (max-subtracted, so finite for any finite values). Returns ``[P]`` long."""
    if alpha == 0:
        return values.argmax(dim=1)
    weights = torch.softmax(values.float().cpu() / alpha, dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(values.device)


def resample_worst(
    values: torch.Tensor, prompts: list[str], fraction: float, alpha: float, generator
) -> torch.Tensor:
    """SVDD-R: within each prompt's particles, the worst ⌈fraction·n⌉ take copies of particles
    drawn ∝ exp(v/α) (the best when α = 0). ``values [P]`` -> source index ``[P]`` long."""
    source = torch.arange(len(prompts))
    for prompt in dict.fromkeys(prompts):
        members = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        count = math.ceil(fraction * len(members)) if len(members) > 1 else 0
        if count == 0:
            continue
        worst = members[values[members].argsort()[:count]]
        picks = select_candidates(values[members].reshape(1, -1).expand(count, -1), alpha, generator)
        source[worst] = members[picks.cpu()]
    return source


# ---------------------------------------------------------------------------- samplers


def _repeat(tensor, times):
    return tensor.repeat_interleave(times, dim=0)


@torch.no_grad()
def svdd(
    pipe,
    prompts: list[str],
    value: ValueFn,
    settings: SamplerSettings = GUIDED,
    *,
    num_candidates: int = 20,
    alpha: float = 0.0,
    generator: torch.Generator | None = None,
    resample_fraction: float = 0.0,
) -> GuidedSamples:
    """SVDD (Alg. 1): one image per prompt, M = ``num_candidates`` candidates per step chosen by
    ``value`` (:func:`posterior_mean_value` or :func:`diffrl.guidance.value.value_net_value`; unused, and may be None,
    when M = 1). The transition is the pipeline's: DDIM for SD, the consistency step for an LCM,
    the Flow-GRPO SDE (or CPS) step for SD3/FLUX (``settings.eta`` > 0).

    With M = 1 this is plain sampling, draw for draw. Costs P + P·M·(T−1) UNet evaluations.
    Returns :class:`GuidedSamples`.
    """
    m = num_candidates
    if m < 1 or alpha < 0 or not 0 <= resample_fraction < 1:
        raise ValueError(
            f"need num_candidates >= 1, alpha >= 0, resample_fraction in [0, 1); got {m}, {alpha}, {resample_fraction}"
        )
    transition = transition_for(pipe, settings)
    if m > 1 and not transition.stochastic:
        raise ValueError("SVDD needs eta > 0: with a deterministic step all candidates are the same")
    text, x, timesteps, eps = transition.start(prompts, settings, generator)
    p, calls = len(prompts), len(prompts)
    text_m, prompts_m = text.repeat(m), [q for q in prompts for _ in range(m)]
    rows = torch.arange(p, device=x.device)
    for i, t in enumerate(timesteps):
        if i == len(timesteps) - 1:  # the last step: its one child is the image
            x = transition.step(eps, t, x, generator).prev_sample
            break
        # [P*M]: candidate k of particle j at row j*M + k
        candidates = transition.step(_repeat(eps, m), t, _repeat(x, m), generator).prev_sample
        t_next = timesteps[i + 1]
        candidate_eps = transition.noise_pred(candidates, t_next, text_m)
        calls += p * m
        if m == 1:
            x, eps = candidates, candidate_eps
            continue
        values = value(pipe, candidates, t_next, candidate_eps, prompts_m, text_m.embeds).float().view(p, m)
        chosen = rows * m + select_candidates(values, alpha, generator)
        x, eps = candidates[chosen], candidate_eps[chosen]
        if resample_fraction > 0:
            source = resample_worst(values.flatten()[chosen], prompts, resample_fraction, alpha, generator)
            x, eps = x[source.to(x.device)], eps[source.to(x.device)]
    return GuidedSamples(images=decode_latents(pipe, x), latents=x, unet_calls=calls)


@torch.no_grad()
def smc(
    pipe,
    prompts: list[str],
    value: ValueFn,
    settings: SamplerSettings = GUIDED,
    *,
    num_particles: int = 20,
    alpha: float = 0.1,
    generator: torch.Generator | None = None,
) -> GuidedSamples:
    """Sequential Monte Carlo with the pretrained model as proposal (the SVDD paper's SMC
    baseline): N particles per prompt, incremental weights exp((v̂_{t-1} − v̂_t)/α), multinomial
    resampling among a prompt's particles at every step; the returned image is one particle drawn
    uniformly from the final (equally weighted) set. Costs P·N·T UNet evaluations."""
    n = num_particles
    if alpha <= 0 or n < 1:
        raise ValueError(
            f"SMC needs alpha > 0 (weights exp(v/alpha)) and num_particles >= 1; got {alpha}, {n}"
        )
    prompts_n = [q for q in prompts for _ in range(n)]
    transition = transition_for(pipe, settings)
    text, x, timesteps, eps = transition.start(prompts_n, settings, generator)
    p, calls = len(prompts), len(prompts_n)
    previous = torch.zeros(p * n, device=x.device)
    offsets = (torch.arange(p) * n).view(-1, 1)
    for i, t in enumerate(timesteps):
        x = transition.step(eps, t, x, generator).prev_sample
        if i == len(timesteps) - 1:
            break
        t_next = timesteps[i + 1]
        eps = transition.noise_pred(x, t_next, text)
        calls += p * n
        values = value(pipe, x, t_next, eps, prompts_n, text.embeds).float()
        log_weights = ((values - previous) / alpha).cpu().view(p, n)
        ancestors = (
            torch.multinomial(torch.softmax(log_weights, dim=1), n, replacement=True, generator=generator)
            + offsets
        ).flatten()
        ancestors = ancestors.to(x.device)
        x, eps, previous = x[ancestors], eps[ancestors], values[ancestors]
    pick = (torch.randint(n, (p,), generator=generator) + offsets.flatten()).to(x.device)
    return GuidedSamples(images=decode_latents(pipe, x[pick]), latents=x[pick], unet_calls=calls)


@torch.no_grad()
def best_of_n(
    pipe,
    prompts: list[str],
    reward_fn,
    settings: SamplerSettings = GUIDED,
    *,
    n: int = 20,
    generator: torch.Generator | None = None,
) -> GuidedSamples:
    """N independent chains per prompt, keep the one whose final image scores highest. Costs
    P·N·T UNet evaluations (SVDD-PM with M = N costs about the same)."""
    prompts_n = [q for q in prompts for _ in range(n)]
    chains = svdd(pipe, prompts_n, None, settings, num_candidates=1, generator=generator)
    scores = reward_fn(chains.images, prompts_n, [{} for _ in prompts_n]).view(len(prompts), n)
    pick = torch.arange(len(prompts)) * n + scores.argmax(dim=1).cpu()
    return GuidedSamples(
        images=chains.images[pick], latents=chains.latents[pick], unet_calls=chains.unet_calls
    )
