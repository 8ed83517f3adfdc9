"""Plain REINFORCE with per-prompt baselines (Williams 1992, Eq. 11; the baseline of each prompt
is the mean reward of its samples in the epoch): an algorithm written outside diffrl, one file.

    algorithm: reinforce        # after diffrl.algorithms.register("reinforce", "reinforce")
    algorithm: reinforce        # or: the module path itself, when it is importable

    loss = −mean over (sample, step) of (r − b_prompt) · log πθ(x_{t−1} | x_t)

Log-probs are diffrl's element means, so the learning rate is on that scale.
"""

import torch

from diffrl.algorithms import Plan, gather, per_sample


def plan(config, epoch):
    """Independent chains, every step trained."""
    return Plan()


def baselined(prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
    """r − (the mean reward of the same prompt's samples): ``[N]`` -> ``[N]``."""
    advantages = torch.empty_like(rewards)
    for prompt in set(prompts):
        same = torch.tensor([p == prompt for p in prompts])
        advantages[same] = rewards[same] - rewards[same].mean()
    return advantages


def prepare(ctx, rollouts, epoch):
    """Advantages of the kept samples over all processes."""
    gathered = gather(ctx, rollouts, epoch)
    keep = gathered.finite
    advantages = torch.zeros_like(gathered.rewards)
    advantages[keep] = baselined(gathered.kept_prompts, gathered.rewards[keep])
    return per_sample(advantages, keep, gathered)


def loss(term, batch, config):
    """The REINFORCE term of one pass: −mean of A · log π over the valid rows."""
    advantages = batch.values["advantages"][batch.members[term.rows, 0]]
    weight = term.valid.float()
    value = -(advantages * term.log_prob[:, 0] * weight).sum() / weight.sum().clamp(min=1)
    return value, {"abs_advantage": (advantages.abs() * weight).sum() / weight.sum().clamp(min=1)}
