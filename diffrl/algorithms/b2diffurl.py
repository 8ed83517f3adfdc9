"""B²-DiffuRL: branch sampling and backward progressive training against sparse rewards
(Hu et al., "Towards Better Alignment: Training Diffusion Models with Reinforcement Learning
Against Sparse Rewards", CVPR 2025).

A sparse reward judges only the final image, so with DDPO every step of a chain shares one
advantage, whatever that step contributed. B²-DiffuRL narrows the credit assignment:

1. **Backward progressive training** (paper Sec. 4.1). Training runs in stages s = 0..S-1, each
   starting from the previous stage's weights (here: stage s is epoch s of one run). Stage s trains
   only the last ℓ(s) of the N denoising steps, growing backwards from the image end:
   ℓ(s) = L + ⌊s·(R − L + 1)/S⌋, so the branch point is b(s) = N − ℓ(s). Defaults from the
   authors' code: L = 14, R = 20, S = 100, N = 20 (ℓ(0) = 14, ℓ(15) = 15, ℓ(29) = 16, ℓ(99) = 20).
2. **Branch sampling** (paper Sec. 4.2; :func:`diffrl.rollout.sample_branches`). Each chain runs
   to step b once; K branches continue from x_b with independent noise. Siblings differ only in
   the trained steps, so their reward differences are due to those steps.
3. **Selection and advantages** (paper Sec. 4.2, Eq. 8 and the released code). Rewards are
   z-scored per prompt over the current and the last ``history_stages`` stages,
   z = (R − μ_p)/(σ_p + 1e-8). In each sibling group the best is kept if z ≥ 0.5 and the worst if
   z ≤ −0.5; the rest are dropped. A kept sample's advantage is clip(z, ±5), and DDPO's PPO loss
   (:func:`diffrl.algorithms.ddpo.ppo_loss`, ε = 0.1 in the paper) is applied on steps b..N−1.

``advantage: history`` (default) is what the authors' code does: the history z-score both selects
and weights; siblings only form the groups. The paper's text instead describes the advantage
relative to the siblings; ``advantage: siblings`` implements that reading: z is computed against
the sibling group's own mean and std (population std, + 1e-8), and the same ±0.5 selection and ±5
clip apply to it. The two differ when a whole sibling group is better or worse than the prompt's
history: ``history`` still trains on it (the group's best, say, with a large positive advantage),
``siblings`` only on the contrast inside the group.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import torch

from diffrl.algorithms import Batch, Context, Plan, Rollouts, gather, per_sample
from diffrl.algorithms.ddpo import loss
from diffrl.errors import require

__all__ = ["SECTION", "Config", "loss", "plan", "prepare", "setup", "validate"]

Z_EPS = 1e-8
SECTION = "b2diffurl"
"""The config section of B²-DiffuRL's settings (:class:`B2DiffuRLConfig`)."""


@dataclass
class B2DiffuRLConfig:
    min_trained_steps: int = 14
    """L: steps trained at stage 0 (the last L of N)."""
    max_trained_steps: int = 20
    """R: steps trained at the last stage (at most sample.num_steps)."""
    num_stages: int = 100
    """S: stages of the backward progressive schedule; stage s = epoch s (later epochs stay at R)."""
    num_branches: int = 5
    """K: branches continued from each chain's branch point (images per prompt draw)."""
    history_stages: int = 8
    """Past stages pooled with the current one for the per-prompt z-score."""
    select_threshold: float = 0.5
    """A group's best is kept if z >= this, its worst if z <= -this."""
    advantage: Literal["history", "siblings"] = "history"
    """z against the prompt's reward history (authors' code) or against the sibling group (paper text)."""

    def validate(self) -> None:
        require(self.num_stages >= 1, "b2diffurl.num_stages", f"must be >= 1, got {self.num_stages}")
        require(self.num_branches >= 1, "b2diffurl.num_branches", f"must be >= 1, got {self.num_branches}")
        require(
            self.history_stages >= 0, "b2diffurl.history_stages", f"must be >= 0, got {self.history_stages}"
        )
        require(
            self.select_threshold >= 0,
            "b2diffurl.select_threshold",
            f"must be >= 0, got {self.select_threshold}",
        )


def trained_steps(stage: int, config: B2DiffuRLConfig) -> int:
    """ℓ(s) = L + ⌊s·(R − L + 1)/S⌋: how many final steps stage ``stage`` trains (paper Sec. 4.1).
    Stages past S − 1 keep ℓ(S − 1) = R."""
    L, R, S = config.min_trained_steps, config.max_trained_steps, config.num_stages
    s = min(stage, S - 1)
    return min(R, L + (s * (R - L + 1)) // S)


def branch_step(stage: int, num_steps: int, config: B2DiffuRLConfig) -> int:
    """b(s) = N − ℓ(s): the index of the first trained (branched) step of a chain of N steps."""
    return num_steps - trained_steps(stage, config)


class StageHistory:
    """Per-prompt rewards of recent stages, for z = (R − μ_p)/(σ_p + 1e-8) over the current and the
    last ``history_stages`` stages (the authors' per-prompt statistics). Plain-data state for checkpoints."""

    def __init__(self, history_stages: int):
        self.history_stages = history_stages
        self.stages: deque = deque(maxlen=history_stages + 1)  # [(stage, {prompt: [rewards]})]

    def update(self, stage: int, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Record stage ``stage``'s rewards ``[N]`` and return their z-scores ``[N]`` float32."""
        current: dict[str, list[float]] = {}
        for prompt, reward in zip(prompts, rewards.tolist()):
            current.setdefault(prompt, []).append(reward)
        self.stages.append((stage, current))
        z = torch.empty(len(prompts), dtype=torch.float32)
        for prompt in current:
            pooled = torch.tensor([r for _, seen in self.stages for r in seen.get(prompt, [])])
            index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            mean, std = pooled.mean(), pooled.std(unbiased=False)
            z[index] = ((rewards[index].float() - mean) / (std + Z_EPS)).float()
        return z

    def state_dict(self) -> dict:
        return {"history_stages": self.history_stages, "stages": [[s, seen] for s, seen in self.stages]}

    def load_state_dict(self, state: dict) -> None:
        self.history_stages = state["history_stages"]
        self.stages = deque(((s, seen) for s, seen in state["stages"]), maxlen=self.history_stages + 1)


def sibling_z(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """z of each reward against its sibling group's mean and population std (+ 1e-8); ``[N]`` -> ``[N]``."""
    z = torch.empty_like(rewards, dtype=torch.float32)
    for g in groups.unique():
        member = groups == g
        values = rewards[member].float()
        z[member] = (values - values.mean()) / (values.std(unbiased=False) + Z_EPS)
    return z


def select_extremes(z: torch.Tensor, groups: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep, per sibling group, the best if its z >= ``threshold`` and the worst if z <= −``threshold``.

    Args:
        z: ``[N]`` scores; groups: ``[N]`` group id of each sample (siblings share one).
    Returns:
        ``[N]`` bool mask of kept samples (ties: the first best/worst in sample order).
    """
    keep = torch.zeros_like(z, dtype=torch.bool)
    for g in groups.unique():
        members = (groups == g).nonzero().flatten()
        scores = z[members]
        best, worst = members[scores.argmax()], members[scores.argmin()]
        if z[best] >= threshold:
            keep[best] = True
        if z[worst] <= -threshold:
            keep[worst] = True
    return keep


def compute_advantages(
    prompts: list[str],
    rewards: torch.Tensor,
    groups: torch.Tensor,
    history: StageHistory,
    stage: int,
    config: B2DiffuRLConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and the selection of a gathered stage batch (the trainer clips them to ±5).

    Args:
        prompts: N prompts; rewards: ``[N]``; groups: ``[N]`` sibling-group ids.
    Returns:
        (advantages ``[N]`` float32, 0 where not kept; kept mask ``[N]`` bool).
    """
    z_history = history.update(stage, prompts, rewards)
    z = z_history if config.advantage == "history" else sibling_z(rewards, groups)
    keep = select_extremes(z, groups, config.select_threshold)
    return torch.where(keep, z, torch.zeros_like(z)), keep


# ---------------------------------------------------------------------------- the interface

Config = B2DiffuRLConfig


def setup(config) -> StageHistory:
    """The per-prompt stage history the z-scores use (saved in every checkpoint)."""
    return StageHistory(config.b2diffurl.history_stages)


def plan(config, epoch: int) -> Plan:
    """Stage s = epoch s: chains branch at b(s) into K branches, steps b(s)..N−1 are trained."""
    b = config.b2diffurl
    return Plan(branch_step(epoch, config.sample.num_steps, b), b.num_branches)


def prepare(ctx: Context, rollouts: Rollouts, epoch: int) -> Batch:
    """History z-scores and sibling selection of the gathered stage batch (Sec. 4.2)."""
    gathered, config = gather(ctx, rollouts, epoch), ctx.config
    finite = gathered.finite
    advantages, trained = torch.zeros_like(gathered.rewards), finite.clone()
    advantages[finite], trained[finite] = compute_advantages(
        gathered.kept_prompts,
        gathered.rewards[finite],
        gathered.groups[finite],
        ctx.state,
        epoch,
        config.b2diffurl,
    )
    return per_sample(advantages, trained, gathered, plan(config, epoch).branch_step)


def validate(config) -> None:
    """The schedule must fit in the sampler's steps. (The selection keeps a varying number of
    samples, padded to whole optimizer steps, so batch sizes need not divide.)"""
    b, n = config.b2diffurl, config.sample.num_steps
    require(
        1 <= b.min_trained_steps <= b.max_trained_steps <= n,
        "b2diffurl.min_trained_steps",
        f"need 1 <= min_trained_steps ({b.min_trained_steps}) <= max_trained_steps ({b.max_trained_steps}) "
        f"<= sample.num_steps ({n})",
    )
