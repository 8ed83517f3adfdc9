"""Rollouts: run the stochastic sampler on a diffusers pipeline and record the MDP trajectory.

State s_t = (x_t, t, prompt), action a_t = x_{t-1}, policy = the sampler's Gaussian step (the
pipeline's transition, :mod:`diffrl.transitions`: DDIM for Stable Diffusion, the consistency step
for a latent consistency model, the Flow-GRPO SDE / CPS / ODE for SD3 and FLUX), reward = a score
of the decoded image. An LCM with H steps has T = H − 1 actions; its last step is deterministic.
"""

from __future__ import annotations

import dataclasses

import torch

from diffrl.transitions import decode_latents, transition_for
from diffrl.types import SamplerSettings, Text, Trajectory

PLAIN = SamplerSettings()
"""The default sampler: 50 DDIM steps, eta 1, guidance 5, the model's native size."""


def _denoise(transitions, latents, timesteps, text: Text, generator):
    """Run the policy over ``timesteps`` from ``latents`` ``[B, C, h, w]``, step i with
    ``transitions[i]``.

    Returns (the states after each step, a list of ``len(timesteps)`` tensors ``[B, C, h, w]``;
    their log-probs, a list of ``[B]``, or Nones for a deterministic step).
    """
    states, log_probs = [], []
    for transition, t in zip(transitions, timesteps):
        noise_pred = transition.noise_pred(latents, t, text)
        step = transition.step(noise_pred, t, latents, generator=generator)
        latents = step.prev_sample
        states.append(latents)
        log_probs.append(step.log_prob)
    return states, log_probs


def step_transitions(transition, count: int, window: tuple[int, int] | None) -> list:
    """The transition of each of ``count`` actions: the sampler's own inside ``window`` =
    [start, stop) (every action without a window), its deterministic solver (eta = 0: DDIM's,
    or the flow Euler ODE) outside it (Flow-GRPO-Fast; MixGRPO, Li et al. 2025, Sec. 3.1)."""
    if window is None:
        return [transition] * count
    start, stop = window
    if not 0 <= start < stop <= count:
        raise ValueError(f"the SDE window [{start}, {stop}) must lie within the {count} actions")
    if getattr(transition, "is_lcm", False):
        raise ValueError("an SDE window needs a deterministic solver outside it; an LCM's steps have none")
    ode = dataclasses.replace(transition, eta=0.0)
    return [transition if start <= i < stop else ode for i in range(count)]


def _stack_log_probs(log_probs: list, batch: int) -> torch.Tensor | None:
    """``[B, T]`` float32 of the steps' log-probs, NaN on deterministic steps; None when no step
    has a density."""
    if all(lp is None for lp in log_probs):
        return None
    nan = next(lp for lp in log_probs if lp is not None).new_full((batch,), float("nan"))
    return torch.stack([nan if lp is None else lp for lp in log_probs], dim=1)


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
        pipe: a ``StableDiffusionPipeline``-like pipeline with a ``DDIMScheduler``, a
            ``LatentConsistencyModelPipeline`` with its ``LCMScheduler`` (RLCM's policy), or a
            ``StableDiffusion3Pipeline`` / ``FluxPipeline`` with its flow-matching scheduler.
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
    window: tuple[int, int] | None = None,
) -> Trajectory:
    """Branch sampling (B²-DiffuRL, Hu et al. 2025, Sec. 4.2): each of the B chains runs its first
    ``branch_step`` = b steps once (the trunk); then ``num_branches`` = K branches continue from
    x_b with independent noise to x_0. The trunk's UNet calls are made once, not once per branch:
    B·b + B·K·(N − b) sample evaluations (twice that with guidance, which batches both branches).

    Args as :func:`sample_trajectories`, plus ``branch_step`` in [0, N] and ``num_branches`` >= 1,
    and an SDE ``window`` = [start, stop) of actions (:func:`step_transitions`): the sampler's
    stochastic step inside it, the deterministic solver outside. With ``branch_step`` = start the
    trunk is one ODE chain per prompt and the K branches share it (Flow-GRPO-Fast's branching).
    With b = 0, K = 1 and no window this is plain sampling, draw for draw.

    Returns:
        :class:`Trajectory` of B·K chains ordered trunk-major (chain i·K + k is branch k of trunk
        i), with ``parents [B·K]`` = i; the shared prefix ``latents[:, :b+1]`` and its log-probs
        are copied into every branch; log-probs of deterministic steps are NaN.
    """
    transition = transition_for(pipe, settings)
    text, x, timesteps = transition.begin(prompts, settings, generator, latents)
    actions = transition.actions(timesteps)
    if not 0 <= branch_step <= len(actions) or num_branches < 1:
        raise ValueError(
            f"branch_step must be in [0, {len(actions)}] and num_branches >= 1, got {branch_step}, {num_branches}"
        )
    steps = step_transitions(transition, len(actions), window)
    trunk, trunk_log_probs = _denoise(steps[:branch_step], x, actions[:branch_step], text, generator)

    def fan_out(tensor):
        return None if tensor is None else tensor.repeat_interleave(num_branches, dim=0)

    text = text.repeat(num_branches)
    start = fan_out(trunk[-1] if trunk else x)
    branches, branch_log_probs = _denoise(steps[branch_step:], start, actions[branch_step:], text, generator)
    states = [fan_out(s) for s in [x, *trunk]] + branches
    log_probs = [fan_out(lp) for lp in trunk_log_probs] + branch_log_probs
    final = transition.finish(states[-1], timesteps, text)
    return Trajectory(
        prompts=[p for p in prompts for _ in range(num_branches)],
        text=text,
        latents=torch.stack(states, dim=1),
        timesteps=actions.clone(),
        log_probs=_stack_log_probs(log_probs, len(prompts) * num_branches),
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
    return Trajectory(
        prompts=[p for t in trajectories for p in t.prompts],
        text=Text.cat([t.text for t in trajectories]),
        latents=torch.cat([t.latents for t in trajectories]),
        timesteps=trajectories[0].timesteps,
        log_probs=None
        if trajectories[0].log_probs is None
        else torch.cat([t.log_probs for t in trajectories]),
        images=torch.cat([t.images for t in trajectories]),
        parents=torch.cat(parents),
    )
