"""SePPO (Zhang et al., "Semi-Policy Preference Optimization for Diffusion Alignment", 2024):
Diffusion-DPO's objective (:mod:`diffrl.algorithms.dpo`) with winners only.

**SePPO** (Sec. 3 of the paper): only winners come from data. For each winner the loser slot is
taken by x^ref, a sample the *reference model* generates for the same prompt, and the reference
is drawn from the K most recent checkpoints of the run (:func:`choose_reference`; strategies
``initial`` θ_0, ``latest`` θ_{k−1}, ``random`` uniform over the K newest, the paper's best).
With the same t and ε for both images:

    Δ_w = mse_θ(xʷ) − mse_ref(xʷ),      Δ_r = mse_θ(x^ref) − mse_ref(x^ref)
    loss = −log σ(−½·β·(Δ_w − s·Δ_r))

The anchor-based flipper chooses s ∈ {+1, −1} per sample from the errors on the winning image,
the anchor, under that same noise. The rule implemented here (:func:`seppo_signs`; the paper's
Eq. 8, as summarised in REFERENCES.md, whose exact inequality could not be checked against the
paper from this machine):

    s = −1  if mse_ref(xʷ) < mse_θ(xʷ)   (Δ_w > 0: the reference fits the preferred image better
                                            than the policy, so its own sample is probably good:
                                            push its error down together with the winner's)
    s = +1  otherwise                     (the policy already fits the winner at least as well:
                                            treat x^ref as a loser, Diffusion-DPO's term)

s is a decision, not a differentiable quantity (computed without gradient). With s = +1 the loss
is exactly Diffusion-DPO's with x^ref as the loser; ``flipper: false`` keeps s = +1 for every
sample (the paper's "without flipper" ablation).
"""

from __future__ import annotations

import torch

from diffrl.algorithms.dpo import (
    DEFAULTS,
    SECTION,
    Config,
    checkpoint_weights,
    dpo_loss,
    encode_batch,
    errors,
    noised_pair,
    resolution,
    swapped_in,
    validate,
)
from diffrl.checkpoints import list_checkpoints
from diffrl.preferences import Preference, load_preferences
from diffrl.rollout import sample_trajectories
from diffrl.transitions import encode_images
from diffrl.types import SamplerSettings

__all__ = ["DEFAULTS", "OFFLINE", "SECTION", "Config", "setup", "term", "validate"]

OFFLINE = True
"""Trained on a data source (the winners), not on rollouts (:mod:`diffrl.offline`)."""


def seppo_signs(mse_w: torch.Tensor, ref_w: torch.Tensor) -> torch.Tensor:
    """The anchor-based flipper: s ``[B]`` = −1 where the reference fits the winner better than the
    policy (mse_ref(xʷ) < mse_θ(xʷ)), else +1 (see the module doc). No gradient."""
    return torch.where(ref_w.detach() < mse_w.detach(), -1.0, 1.0)


def seppo_inside(
    mse_w: torch.Tensor,
    mse_r: torch.Tensor,
    ref_w: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float,
    flipper: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SePPO's ``inside = −½·β·(Δ_w − s·Δ_r)`` ``[B]`` and the signs s ``[B]``; errors ``[B]``
    of the winner (w) and the reference's sample (r) under the policy and the reference; without
    the ``flipper`` s = +1."""
    signs = seppo_signs(mse_w, ref_w) if flipper else torch.ones_like(mse_w)
    return -0.5 * beta * ((mse_w - ref_w) - signs * (mse_r - ref_r)), signs


def choose_reference(checkpoints: list, strategy: str, pool: int, generator: torch.Generator):
    """SePPO's reference for this step among the run's checkpoints (oldest first): None for θ_0
    (the pretrained model: ``initial``, or before the first checkpoint), the newest
    (``latest``), or one drawn uniformly from the ``pool`` most recent (``random``)."""
    kept = list(checkpoints)[-pool:]
    if strategy == "initial" or not kept:
        return None
    if strategy == "latest":
        return kept[-1]
    return kept[int(torch.randint(len(kept), (1,), generator=generator))]


def setup(config) -> list[Preference]:
    """The preference data (prompts and winners; losers are not read), checked before any model loads."""
    return load_preferences(config.dpo.data, need_loser=False)


def term(ctx, learner, batch: list[Preference], streams):
    """Prepare one SePPO term on ``batch`` without gradient: a reference drawn from the run's
    checkpoints (:func:`choose_reference`), its own sample x^ref for each prompt in the loser slot,
    the shared t and ε and the reference's errors; return the closure computing the loss, the
    implicit accuracy and the share of flipped signs with gradient."""
    pipe, config, d = learner.pipe, ctx.config, ctx.config.dpo
    chosen = choose_reference(
        list_checkpoints(ctx.run_dir), d.reference_strategy, d.reference_pool, streams.sampling
    )
    reference = None if chosen is None else checkpoint_weights(str(chosen))
    side = resolution(pipe, config)
    with torch.no_grad():
        prompts, embeds, winners = encode_batch(learner, batch, config, streams)
        embeds2 = torch.cat([embeds, embeds])
        with swapped_in(pipe.unet, reference):
            settings = SamplerSettings(d.sample_steps, config.sample.guidance_scale, 1.0, side, side)
            images = sample_trajectories(pipe, prompts, settings, generator=streams.sampling).images
            # encoded like the data's winners (not the sampler's raw latents), so that the two
            # sides differ in content, not in how their latents were made
            losers = encode_images(pipe, images * 2 - 1)
            x_t, t, noise = noised_pair(pipe, winners, losers.to(winners.device), streams.sampling)
            ref_w, ref_l = errors(pipe.unet, x_t, t, embeds2, noise, learner.accelerator).chunk(2)

    def loss():
        mse_w, mse_l = errors(learner.unet, x_t, t, embeds2, noise, learner.accelerator).chunk(2)
        inside, signs = seppo_inside(mse_w, mse_l, ref_w, ref_l, d.beta, d.flipper)
        value, accuracy = dpo_loss(inside)
        return value, {"accuracy": accuracy, "flipped": (signs < 0).float().mean()}

    return loss
