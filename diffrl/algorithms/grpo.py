"""GRPO on the denoising MDP: group-relative advantages, PPO's clip, and an exact KL penalty to the
pretrained model (Shao et al. 2024, DeepSeekMath, Sec. 4.1; on diffusion and flow samplers: Liu et
al. 2025, Flow-GRPO, Sec. 4, and Xue et al. 2025, DanceGRPO, which also trains SD 1.x).

Each epoch draws every prompt once for G chains (:class:`~diffrl.algorithms.Plan`'s
``group_size``, independent noise). A chain's advantage is its reward against its group's
(Flow-GRPO Eq. 4):

    A_i = (r_i - mean_{j in g(i)} r_j) / (std + eps),   std = the group's, or the whole batch's
                                                        (``grpo.global_std``, Flow-GRPO's SD3 configs)

broadcast to every step of the chain; groups whose rewards are all equal give A = 0 and are not
trained (they carry no policy gradient), unless ``grpo.zero_advantage: kl``: then they are trained
on the KL term alone, as the objective has it (DeepSeekMath Eq. 3; Flow-GRPO Sec. 4.1), so that the
penalty also holds the prompts the model already solves. The loss per trained step is PPO's clipped surrogate on the element-mean log-prob ratio
(:func:`diffrl.algorithms.ddpo.ppo_loss`) plus β·KL(π_θ || π_ref), π_ref the same UNet with its
LoRA adapters disabled. The KL is the exact KL of the two step Gaussians at the stored state
(:func:`diffrl.ops.gaussian_kl`): with the shared std σ_t of the sampler it is
mean((μ_θ − μ_ref)²) / (2σ_t²) over the latent's elements. On the flow SDE σ_t = s√|Δ|, so the
KL is mean((μ_θ − μ_ref)²) / (2 s² |Δ|) = (|Δ|/2)(1/s + s(1−σ)/(2σ))² mean((v_θ − v_ref)²).
Flow-GRPO's code computes β·mean((μ_θ − μ_ref)²)/(2s²), which omits the 1/|Δ| factor: its β
weighs steps by their width |Δ|. Here the penalty is the KL itself, so β means the same at every
step and on every sampler (a Flow-GRPO β corresponds to about β·|Δ| here at a 10-step schedule's
typical |Δ| ≈ 0.1: reuse its values with that in mind). With an SDE window the penalty is on the
window's steps (Flow-GRPO-Fast), or with ``grpo.sde_window.kl: chain`` on every step: the ODE
steps' states have the SDE's marginals (in continuous time), so the step KLs at them, summed, are
the full SDE chain's path KL, which also holds the adapter at the noise levels the window does not
train.

With ``train.kl_beta: 0`` and groups of one this is DDPO without its reward history: one code path.
It trains the DDIM sampler, a latent consistency model's (RLCM's policy) and a flow model's SDE
(Flow-GRPO) alike; the sampler is the pipeline's (:mod:`diffrl.transitions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from diffrl.algorithms import Batch, Context, Plan, Rollouts, gather, per_sample
from diffrl.algorithms.ddpo import loss
from diffrl.algorithms.ddpo import validate as validate_batches
from diffrl.errors import require

SECTION = "grpo"
__all__ = ["DEFAULTS", "MODEL", "SECTION", "Config", "loss", "plan", "prepare", "validate", "window"]

DEFAULTS: dict[str, dict] = {"train": {"kl_beta": 0.04}}
"""GRPO's KL penalty is on unless a config says otherwise (Flow-GRPO's GenEval β)."""
MODEL = ("ddim", "lcm", "flow")
"""GRPO trains the DDIM sampler, a latent consistency model's (:mod:`diffrl.policies.lcm`) and a
flow model's SDE or CPS step (:mod:`diffrl.policies.flow`: SD3, FLUX)."""


@dataclass
class SDEWindowConfig:
    """Flow-GRPO-Fast's and MixGRPO's SDE window: the sampler's stochastic step on W consecutive
    actions only, the deterministic solver (eta = 0) on the others, and only the window trained."""

    size: int = 0
    """W, the window's actions (0: no window, every action stochastic and trainable)."""
    placement: Literal["fixed", "random", "sliding"] = "fixed"
    """``fixed`` at ``start``; ``random``: the start uniform on {r0, …, r1 − W} each epoch
    (Flow-GRPO-Fast, ``range``); ``sliding``: ``start`` + ``stride`` every ``period`` epochs,
    back to 0 past the last action (MixGRPO)."""
    start: int = 0
    """The first window action (fixed), or where the sliding window begins."""
    range: list[int] | None = None
    """[r0, r1] of a random start (default [0, T // 2], Flow-GRPO-Fast's)."""
    stride: int = 1
    """Actions a sliding window moves each ``period`` (MixGRPO: 1)."""
    period: int = 25
    """Epochs between a sliding window's moves (MixGRPO: 25 iterations)."""
    kl: Literal["window", "chain"] = "window"
    """Where ``train.kl_beta``'s KL penalty is: on the window's trained steps only (Flow-GRPO-Fast),
    or on every step of the chain (``chain``): the ODE steps outside the window are KL-only terms,
    the KL of the sampler's stochastic step at their stored states. The adapter is shared by every
    noise level, so training the window moves the ODE steps too, and nothing else holds them there
    (:func:`prepare`)."""
    branches: bool = False
    """One ODE trunk per prompt up to the window, its G group members branching from there with
    independent noise: the trunk's transformer calls are made once per group (Flow-GRPO-Fast v1)."""

    def validate(self) -> None:
        require(self.size >= 0, "grpo.sde_window.size", f"must be >= 0, got {self.size}")
        require(self.start >= 0, "grpo.sde_window.start", f"must be >= 0, got {self.start}")
        require(self.stride >= 1, "grpo.sde_window.stride", f"must be >= 1, got {self.stride}")
        require(self.period >= 1, "grpo.sde_window.period", f"must be >= 1, got {self.period}")
        if self.range is not None:
            ok = len(self.range) == 2 and 0 <= self.range[0] and self.range[1] - self.range[0] >= self.size
            require(
                ok,
                "grpo.sde_window.range",
                f"must be [r0, r1] with 0 <= r0 and r1 - r0 >= size, got {self.range}",
            )


@dataclass
class GRPOConfig:
    group_size: int = 8
    """G: chains per prompt per epoch (Flow-GRPO: 24); divides the epoch's samples per process."""
    global_std: bool = False
    """Divide advantages by the whole gathered batch's reward std instead of each group's."""
    std_eps: float = 1e-4
    """eps added to the std of the advantage (Flow-GRPO: 1e-4)."""
    normalize_each_reward: bool = False
    """With ``reward.name: weighted``: normalise each member reward within its group and sum the
    weighted advantages, A = Σ_k w_k (r_k − mean_g r_k) / (std_g r_k + eps) (MixGRPO; GDPO), so
    that a reward with a small spread is not drowned by one with a large spread."""
    zero_advantage: Literal["skip", "kl"] = "skip"
    """Chains with A = 0 (a group of equal rewards): ``skip`` them (no policy gradient), or train them
    on the KL penalty alone (``kl``, the objective's every sample; needs ``train.kl_beta`` > 0)."""
    sde_window: SDEWindowConfig = field(default_factory=SDEWindowConfig)
    """Stochastic sampling and training on a window of W actions only (:func:`window`)."""

    def validate(self) -> None:
        require(self.group_size >= 2, "grpo.group_size", f"must be >= 2, got {self.group_size}")
        require(self.std_eps > 0, "grpo.std_eps", f"must be > 0, got {self.std_eps}")
        self.sde_window.validate()


Config = GRPOConfig


def validate(config) -> None:
    """Whole groups and whole optimizer steps per epoch; per-reward normalisation needs members."""
    s, g = config.sample, config.grpo
    require(
        not g.normalize_each_reward or config.reward.name == "weighted",
        "grpo.normalize_each_reward",
        f"normalises the members of reward.name: weighted, but the reward is {config.reward.name!r}",
    )
    require(
        g.sde_window.kl == "window" or (config.train.kl_beta > 0 and g.sde_window.size > 0),
        "grpo.sde_window.kl",
        f"chain puts the KL penalty on the steps outside an SDE window, but grpo.sde_window.size is "
        f"{g.sde_window.size} and train.kl_beta is {config.train.kl_beta} (both must be > 0)",
    )
    require(
        g.zero_advantage == "skip" or config.train.kl_beta > 0,
        "grpo.zero_advantage",
        "kl trains equal-reward groups on the KL penalty alone, but train.kl_beta is 0",
    )
    samples = s.batch_size * s.num_batches_per_epoch
    require(
        samples % g.group_size == 0,
        "grpo.group_size",
        f"{g.group_size} must divide sample.batch_size * sample.num_batches_per_epoch = {samples}",
    )
    validate_batches(config)
    w, actions = g.sde_window, s.num_steps
    if w.size:
        last = (w.range or [0, actions // 2])[1] if w.placement == "random" else w.start + w.size
        require(
            w.size <= actions and last <= actions,
            "grpo.sde_window",
            f"{w.placement} window of {w.size} actions up to action {last} does not fit sample.num_steps = {actions}",
        )
        require(
            not w.branches or s.batch_size % g.group_size == 0,
            "grpo.sde_window.branches",
            f"branches one trunk per group: grpo.group_size {g.group_size} must divide sample.batch_size {s.batch_size}",
        )


def window(config, epoch: int) -> tuple[int, int] | None:
    """The SDE window (start, stop) of ``epoch`` (``grpo.sde_window``; None without one).

    ``random`` draws the start from a generator seeded by (``run.seed``, epoch), so ``prepare``
    finds the window the rollouts used, and a resumed run the same windows; the draw is once per
    epoch where Flow-GRPO-Fast draws once per sampling call (the same distribution of starts)."""
    w, actions = config.grpo.sde_window, config.sample.num_steps
    if not w.size:
        return None
    if w.placement == "fixed":
        start = w.start
    elif w.placement == "random":
        r0, r1 = w.range or (0, actions // 2)
        generator = torch.Generator().manual_seed(config.run.seed * 1_000_003 + epoch)
        start = r0 + int(torch.randint(r1 - w.size - r0 + 1, (1,), generator=generator))
    else:  # sliding: MixGRPO's window moves `stride` every `period` epochs, back to 0 past the end
        start = (w.start + w.stride * (epoch // w.period)) % (actions - w.size + 1)
    return start, start + w.size


def plan(config, epoch: int) -> Plan:
    """Groups of ``grpo.group_size`` independent chains per prompt, every step trained; with an
    SDE window, stochastic (and trained) steps only inside it, the group branching from one ODE
    trunk at its start with ``sde_window.branches``."""
    g, span = config.grpo, window(config, epoch)
    if span is not None and g.sde_window.branches:
        return Plan(branch_step=span[0], num_branches=g.group_size, group_size=g.group_size, window=span)
    return Plan(group_size=g.group_size, window=span)


def group_advantages(prompts: list[str], rewards: torch.Tensor, global_std: bool, eps: float) -> torch.Tensor:
    """``(r - group mean) / (std + eps)`` for gathered ``rewards [N]`` (NaN: dropped, advantage 0)
    grouped by prompt; std is the group's population std, or the whole batch's. ``[N]`` float32."""
    rewards = rewards.double()
    finite = torch.isfinite(rewards)
    advantages = torch.zeros_like(rewards)
    batch_std = rewards[finite].std(unbiased=False)
    for prompt in dict.fromkeys(p for p, keep in zip(prompts, finite.tolist()) if keep):
        members = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        members = members[finite[members]]
        group = rewards[members]
        std = batch_std if global_std else group.std(unbiased=False)
        advantages[members] = (group - group.mean()) / (std + eps)
    return advantages.float()


def member_advantages(ctx: Context, rollouts: Rollouts, gathered, epoch: int) -> torch.Tensor:
    """Σ_k w_k · :func:`group_advantages` of each member reward of ``reward.name: weighted``, read
    from the metadata it writes (``component_<label>``), gathered over processes. ``[P·N]``."""
    from diffrl.errors import RewardError

    total = torch.zeros(gathered.rewards.shape[0])
    for spec in ctx.config.reward.kwargs["rewards"]:
        label = spec.get("label", spec["name"])
        local = torch.tensor(
            [m.get(f"component_{label}", float("nan")) for m in rollouts.metadata], dtype=torch.float32
        )
        values = ctx.accelerator.gather(local.to(ctx.accelerator.device)).cpu()
        values[~gathered.finite] = float("nan")  # a dropped sample is dropped for every member
        if not torch.isfinite(values).any():
            raise RewardError(f"epoch {epoch}: member reward {label!r} wrote no component_{label} values")
        g = ctx.config.grpo
        total += float(spec.get("weight", 1.0)) * group_advantages(
            gathered.prompts, values, g.global_std, g.std_eps
        )
    return total


def prepare(ctx: Context, rollouts: Rollouts, epoch: int) -> Batch:
    """Group-relative advantages of the gathered epoch (of each member reward, summed, with
    ``grpo.normalize_each_reward``); chains with A = 0 (a group of equal rewards, or a dropped
    reward) are not trained, unless ``grpo.zero_advantage: kl`` (then only dropped rewards are not)."""
    g = ctx.config.grpo
    gathered = gather(ctx, rollouts, epoch)
    if g.normalize_each_reward:
        advantages = member_advantages(ctx, rollouts, gathered, epoch)
    else:
        advantages = group_advantages(gathered.prompts, gathered.rewards, g.global_std, g.std_eps)
    informative = gathered.finite & (advantages != 0)
    trained = gathered.finite if g.zero_advantage == "kl" else informative
    span = window(ctx.config, epoch) or (0, None)
    batch = per_sample(advantages, trained, gathered, *span)
    batch.kl_outside = g.sde_window.size > 0 and g.sde_window.kl == "chain"
    batch.metrics["frac_zero_advantage"] = 1.0 - informative.float().mean().item()
    return batch
