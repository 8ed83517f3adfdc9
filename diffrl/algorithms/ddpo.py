"""DDPO-IS: policy-gradient fine-tuning of a diffusion sampler (Black et al., ICLR 2024).

The denoising chain is an MDP (Sec. 4.1): s_t = (c, t, x_t), a_t = x_{t-1},
pi(a_t | s_t) = p_theta(x_{t-1} | x_t, c), reward r(x_0, c) at the end. DDPO-IS (Sec. 4.2, Eq. 5)
takes the importance-sampled gradient of E[r] with PPO's clipped surrogate (Schulman et al.
2017, Eq. 7), one term per trained (sample, timestep):

    ratio = pi_theta(x_{t-1} | x_t) / pi_old(x_{t-1} | x_t) = exp(logp_new - logp_old)
    loss  = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

with log-probs in diffrl's element-mean convention (that is what makes eps = 1e-4 meaningful) and
advantages A from per-prompt reward statistics (Sec. 4.3), clipped to [-adv_clip_max, adv_clip_max].
``train.kl_beta`` > 0 adds β·KL(π_θ || π_ref) per trained step, the exact KL of the two step
Gaussians (:mod:`diffrl.algorithms.grpo` explains it; RLCM and GRPO share this loss).

On a flow model's SDE (Flow-GRPO's policy) this is GRPO with per-prompt history instead of
groups (:mod:`diffrl.algorithms.grpo`): the same loss through the same transition.

The interface (:mod:`diffrl.algorithms`): every epoch samples independent chains (:func:`plan`),
:func:`prepare` turns the gathered rewards into advantages, :func:`loss` is the PPO term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffrl.algorithms import Batch, Context, Plan, Rollouts, Term, gather, per_sample
from diffrl.errors import ConfigError
from diffrl.stat_tracking import PerPromptStatTracker, normalize

MODEL = ("ddim", "flow")
"""DDPO trains the DDIM sampler and a flow model's SDE or CPS step (SD3, FLUX)."""


@dataclass
class PPOStats:
    """Diagnostics of one PPO loss term, each a 0-dim float32 tensor (detached)."""

    approx_kl: torch.Tensor
    """1/2 mean((logp_new - logp_old)^2)."""
    clipfrac: torch.Tensor
    """Fraction of terms with |ratio - 1| > eps."""


def compute_advantages(
    prompts: list[str], rewards: torch.Tensor, tracker: PerPromptStatTracker | None
) -> torch.Tensor:
    """Advantages of a gathered batch: per-prompt statistics when ``tracker`` is given, else
    whole-batch normalisation. ``[N]`` -> ``[N]`` float32 (not yet clipped)."""
    if tracker is not None:
        return tracker.update(prompts, rewards)
    return normalize(rewards.float())


def ppo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PPOStats]:
    """PPO clipped surrogate for one timestep of a minibatch.

    Args:
        log_prob: log pi_theta of the stored actions, ``[B]`` (element mean, carries gradient).
        old_log_prob: log pi_old at sampling time, ``[B]``.
        advantages: ``[B]``; clipped here to +-``adv_clip_max``.
        clip_range: eps of the ratio clip.

    Returns:
        the scalar float32 loss and its :class:`PPOStats`.
    """
    advantages = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob.float() - old_log_prob.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    weight = torch.ones_like(ratio) if valid is None else valid.to(ratio.device, torch.float32)
    count = weight.sum().clamp(min=1.0)

    def mean(values: torch.Tensor) -> torch.Tensor:
        return (values * weight).sum() / count

    loss = mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        stats = PPOStats(
            approx_kl=mean(0.5 * log_ratio**2),
            clipfrac=mean(((ratio - 1.0).abs() > clip_range).float()),
        )
    return loss, stats


# ---------------------------------------------------------------------------- the interface


def setup(config) -> PerPromptStatTracker | None:
    """The per-prompt reward statistics (None with ``stat_tracking.enabled: false``)."""
    st = config.stat_tracking
    return PerPromptStatTracker(st.buffer_size, st.min_count) if st.enabled else None


def validate(config) -> None:
    """Whole optimizer steps per epoch (every sample is trained, so the counts must divide); the
    KL penalty's reference exists (LoRA)."""
    s, t = config.sample, config.train
    if t.kl_beta > 0 and not config.model.use_lora:
        raise ConfigError(
            f"train.kl_beta: {t.kl_beta} needs model.use_lora: true (the reference is the denoiser with its LoRA "
            "adapters disabled; full fine-tuning keeps no frozen copy); or train.kl_beta: 0"
        )
    samples, per_step = s.batch_size * s.num_batches_per_epoch, t.batch_size * t.gradient_accumulation_steps
    if samples % per_step:
        raise ConfigError(
            f"train.batch_size: sample.batch_size * sample.num_batches_per_epoch = {samples} samples per process must be a "
            f"multiple of train.batch_size * train.gradient_accumulation_steps = {per_step} (whole optimizer "
            "steps per epoch)",
        )


def plan(config, epoch: int) -> Plan:
    """Independent chains, every step trained."""
    return Plan()


def prepare(ctx: Context, rollouts: Rollouts, epoch: int) -> Batch:
    """Advantages of the gathered epoch from the samples whose reward was not dropped (Sec. 4.3)."""
    gathered = gather(ctx, rollouts, epoch)
    finite = gathered.finite
    advantages = torch.zeros_like(gathered.rewards)
    advantages[finite] = compute_advantages(gathered.kept_prompts, gathered.rewards[finite], ctx.state)
    return per_sample(advantages, finite, gathered)


def loss(term: Term, batch: Batch, config) -> tuple[torch.Tensor, dict]:
    """The PPO clipped surrogate of one term (:func:`ppo_loss`) plus ``train.kl_beta`` times the
    exact step KL to the reference (both averaged over the term's valid items); approx_kl,
    clipfrac and, with the penalty, kl."""
    t = config.train
    advantages = batch.values["advantages"][batch.members[term.rows, 0]]
    value, stats = ppo_loss(
        term.log_prob[:, 0], term.old_log_prob[:, 0], advantages, t.clip_range, t.adv_clip_max, term.valid
    )
    out = {"approx_kl": stats.approx_kl, "clipfrac": stats.clipfrac}
    if t.kl_beta > 0:
        weight = term.valid.to(value.device, torch.float32)
        kl = (term.kl()[:, 0] * weight).sum() / weight.sum().clamp(min=1.0)
        value = value + t.kl_beta * kl
        out["kl"] = kl.detach()
    return value, out
