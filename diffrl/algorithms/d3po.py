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
