"""D3PO: direct preference optimization of the denoising chain, without a reward model (Yang et
al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model", CVPR 2024).

Rollouts come in groups that share the prompt and the initial noise x_T but draw independent
noise at every step (:func:`diffrl.rollout.sample_branches` with branch step 0). Every pair (a, b)
of a group gets a preference h ∈ {[1, −1] (a wins), [−1, 1] (b wins), [0, 0] (tie)}: from human
labels, or from rewards (AI feedback; with several rewards, a wins only if it Pareto-dominates b,
:func:`preferences`). Each step i of the two chains is its own DPO term (paper Eq. 14, the
per-step loss that Sec. 4's Theorem 1 justifies):

    L_i = −log σ(β·log[πθ(aʷ_i | sʷ_i)/π_ref(aʷ_i | sʷ_i)] − β·log[πθ(aˡ_i | sˡ_i)/π_ref(aˡ_i | sˡ_i)])

The authors' released code, the default here, clamps each ratio first and writes the loss with h:

    r_k,i = clamp(exp(log πθ − log π_ref), 1 − ε, 1 + ε),   L_i = −log σ(β·h_0·log r_0,i + β·h_1·log r_1,i)

``clamp: null`` gives Eq. 14 unclamped. A tie has h = 0: its loss is log 2 with zero gradient,
so ties are counted but not trained. Log-probs follow diffrl's element-mean convention (as in the
authors' code, which inherits DDPO's), which is what β = 0.1, ε = 0.1 are tuned for.

The reference π_ref is the frozen pretrained model (``reference: pretrained``, the UNet with its
LoRA adapters disabled: no second UNet) or the policy that sampled the epoch (``reference:
sampler``: the model after the previous epoch, as the paper's human-feedback procedure describes;
its log-probs are the ones stored at sampling time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from diffrl.algorithms import Batch, Context, Plan, Rollouts, Term
from diffrl.errors import AwaitingLabels, require

SECTION = "d3po"
"""The config section of D3PO's settings (:class:`D3POConfig`)."""

DEFAULTS: dict[str, dict] = {
    "sample": {"num_steps": 20, "eta": 1.0, "guidance_scale": 5.0},
    "train": {"learning_rate": 3e-5, "max_grad_norm": 1.0},
    "model": {"lora_rank": 4, "lora_alpha": 4.0},
}
"""Values ``algorithm: d3po`` uses for the keys a config leaves unset (the paper's Sec. 5 settings)."""


@dataclass
class D3POConfig:
    beta: float = 0.1
    """β, the inverse temperature of the per-step logistic loss."""
    clamp: float | None = 0.1
    """ε: ratios are clamped to [1 − ε, 1 + ε] (the authors' code); null: the paper's Eq. 14."""
    group_size: int = 2
    """Images per prompt sharing x_T; every pair of a group is compared."""
    reference: Literal["pretrained", "sampler"] = "pretrained"
    """π_ref: the pretrained UNet (LoRA disabled) or the policy that sampled the epoch."""
    preferences: Literal["reward", "human"] = "reward"
    """Where preferences come from: the reward(s) (AI feedback), or people's labels of the saved
    rollouts (``diffrl label RUN_DIR``; the run checkpoints every epoch and waits for them)."""
    extra_rewards: list[str] = field(default_factory=list)
    """More reward names besides ``reward.name``; a pair has a winner only under Pareto dominance."""

    def validate(self) -> None:
        require(self.beta > 0, "d3po.beta", f"must be > 0, got {self.beta}")
        require(
            self.clamp is None or 0 < self.clamp < 1,
            "d3po.clamp",
            f"must be in (0, 1) or null, got {self.clamp}",
        )
        require(
            self.group_size >= 2,
            "d3po.group_size",
            f"must be >= 2 (a pair per prompt), got {self.group_size}",
        )
        require(
            self.preferences == "reward" or not self.extra_rewards,
            "d3po.extra_rewards",
            "only used with preferences: reward (with human labels the rewards are only logged)",
        )


@dataclass
class Pairs:
    """The compared pairs of an epoch, P of them, indices into the epoch's samples."""

    first: torch.Tensor
    """``[P]`` long, sample a of each pair."""
    second: torch.Tensor
    """``[P]`` long, sample b of each pair."""
    h: torch.Tensor
    """``[P, 2]`` float32 preference: [1, −1] a wins, [−1, 1] b wins, [0, 0] tie."""

    def __len__(self) -> int:
        return self.first.shape[0]

    @property
    def decided(self) -> torch.Tensor:
        """``[P]`` bool, pairs with a winner (the trained ones)."""
        return self.h.abs().sum(1) > 0


def group_pairs(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unordered pair of samples in the same group: ``groups [N]`` -> (a ``[P]``, b ``[P]``), a < b."""
    same = (groups[:, None] == groups[None, :]).triu(diagonal=1)
    first, second = same.nonzero(as_tuple=True)
    return first, second


def preferences(scores: torch.Tensor, groups: torch.Tensor) -> Pairs:
    """AI feedback: compare every pair of a group under Pareto dominance.

    Args:
        scores: ``[N, R]`` rewards of each sample under R rewards (NaN: dropped sample).
        groups: ``[N]`` group id (samples with equal ids share prompt and x_T).

    a wins when it is at least as good under every reward and better under one; b likewise;
    otherwise (or when either has a NaN score) the pair is a tie.
    """
    first, second = group_pairs(groups)
    a, b = scores[first], scores[second]
    finite = torch.isfinite(a).all(1) & torch.isfinite(b).all(1)
    a_wins = (a >= b).all(1) & (a > b).any(1) & finite
    b_wins = (b >= a).all(1) & (b > a).any(1) & finite
    h = torch.zeros(first.shape[0], 2)
    h[a_wins] = torch.tensor([1.0, -1.0])
    h[b_wins] = torch.tensor([-1.0, 1.0])
    return Pairs(first, second, h)


def d3po_loss(
    log_ratio: torch.Tensor,
    h: torch.Tensor,
    beta: float,
    clamp: float | None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-step D3PO loss (Eq. 14, or the authors' clamped form) averaged over pairs.

    Args:
        log_ratio: ``[P, 2]`` log πθ − log π_ref of both members' actions at one step each.
        h: ``[P, 2]`` preferences; beta: β; clamp: ε or None.
        valid: ``[P]`` bool, pairs that count (padding is False); default all.

    Returns:
        (loss, 0-dim; the logits β·Σ_k h_k·log r_k ``[P]``, detached: > 0 means the policy
        already prefers the winner more than the reference does).
    """
    if clamp is not None:
        # log(clamp(exp(x), 1 − ε, 1 + ε)) = clamp(x, log(1 − ε), log(1 + ε)): same value and
        # gradient (zero outside), without exp overflow
        log_ratio = log_ratio.clamp(
            torch.log1p(torch.tensor(-clamp)).item(), torch.log1p(torch.tensor(clamp)).item()
        )
    logits = beta * (h * log_ratio).sum(dim=1)
    losses = -F.logsigmoid(logits)
    if valid is None:
        return losses.mean(), logits.detach()
    weights = valid.to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1), logits.detach()


# ---------------------------------------------------------------------------- the interface

Config = D3POConfig


def validate(config) -> None:
    """The pretrained reference is the UNet with its adapters disabled: it needs LoRA. (Ties are
    not trained, so the number of pairs varies and is padded: batch sizes need not divide.)"""
    require(
        config.d3po.reference != "pretrained" or config.model.use_lora,
        "d3po.reference",
        "pretrained needs model.use_lora: true (the reference is the UNet with its LoRA adapters "
        "disabled; full fine-tuning would need a second UNet); or use reference: sampler",
    )


def setup(config) -> list:
    """The ``(name, reward function)`` of each of ``d3po.extra_rewards``, built before any model
    loads so that a bad name fails early."""
    from diffrl import rewards

    return [(name, rewards.get(name)) for name in config.d3po.extra_rewards]


def plan(config, epoch: int) -> Plan:
    """Groups of ``group_size`` chains sharing x_T (branch step 0); with human labels the epoch is
    checkpointed, since the next one waits for labels."""
    d = config.d3po
    return Plan(0, d.group_size, checkpoint=d.preferences == "human")


def collect(ctx: Context, epoch: int, sample) -> Rollouts:
    """AI feedback: the sampled epoch. Human labels: this process's rollouts of ``epoch``, sampled
    and saved (:mod:`diffrl.human`) on the first visit and read back on the next; raises
    :class:`AwaitingLabels` while any process's groups lack a label."""
    if ctx.config.d3po.preferences != "human":
        return sample()
    from diffrl import human

    accelerator = ctx.accelerator
    folder = human.rollout_folder(ctx.run_dir, epoch, accelerator.process_index)
    if human.is_saved(folder):
        rollouts = Rollouts(*human.load_rollouts(folder))
    else:
        rollouts = sample()
        human.save_rollouts(folder, rollouts.traj, rollouts.rewards, rollouts.metadata)
    counts = torch.tensor(
        [len(human.unlabeled(folder)), len(human.read_index(folder)["groups"])], device=accelerator.device
    )
    missing, total = accelerator.reduce(counts, "sum").tolist()
    if missing:
        raise AwaitingLabels(ctx.run_dir, epoch, missing, total)
    return rollouts


def preference_scores(ctx: Context, rollouts: Rollouts, epoch: int) -> torch.Tensor:
    """AI feedback: ``[N, 1 + E]`` scores of this process's samples under ``reward.name`` (already
    computed, NaN where dropped) and each of the ``d3po.extra_rewards`` (scored in sampling-batch
    chunks under ``reward.timeout`` / ``reward.on_error``)."""
    from diffrl.collect import score_images

    columns, config = [rollouts.rewards], ctx.config
    chunk = config.sample.batch_size * config.d3po.group_size  # one sampling batch
    for name, fn in ctx.state:
        columns.append(score_images(fn, rollouts.traj, config, f"epoch {epoch}, extra reward {name}", chunk))
    return torch.stack(columns, dim=1)


def prepare(ctx: Context, rollouts: Rollouts, epoch: int) -> Batch:
    """This process's pairs of each group with their preferences (labels or Pareto dominance)."""
    groups, accelerator = rollouts.traj.parents, ctx.accelerator
    if ctx.config.d3po.preferences == "human":
        from diffrl import human

        pairs = human.label_pairs(groups, human.rollout_folder(ctx.run_dir, epoch, accelerator.process_index))
    else:
        pairs = preferences(preference_scores(ctx, rollouts, epoch), groups)
    count = accelerator.reduce(torch.tensor(len(pairs), device=accelerator.device), "sum")
    return Batch(
        members=torch.stack([pairs.first, pairs.second], dim=1),
        trained=pairs.decided,
        rewards=accelerator.gather(rollouts.rewards.to(accelerator.device)).cpu(),
        values={"h": pairs.h},
        metrics={"num_pairs": int(count)},
    )


def loss(term: Term, batch: Batch, config) -> tuple[torch.Tensor, dict]:
    """The per-step loss of both members' log πθ − log π_ref at the same step (:func:`d3po_loss`),
    the implicit accuracy, approx_kl to the reference and the share of clamped ratios."""
    d = config.d3po
    reference = term.old_log_prob if d.reference == "sampler" else term.reference()
    log_ratio = term.log_prob - reference  # [B, 2]: (a, b) of each pair
    value, logits = d3po_loss(log_ratio, batch.values["h"][term.rows], d.beta, d.clamp, term.valid)
    weight = term.valid.float() / term.valid.sum().clamp(min=1)
    outside = (log_ratio.detach().exp() - 1).abs() > (d.clamp if d.clamp is not None else float("inf"))
    return value, {
        "accuracy": ((logits > 0).float() * weight).sum(),
        "approx_kl": (0.5 * log_ratio.detach().pow(2).mean(1) * weight).sum(),
        "clipfrac": (outside.float().mean(1) * weight).sum(),
    }
