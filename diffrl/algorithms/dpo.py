"""Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference
Optimization", CVPR 2024) and SePPO (Zhang et al., "Semi-Policy Preference Optimization for
Diffusion Alignment", 2024): preference learning from offline images, no sampling chain.

**Diffusion-DPO** (paper Eq. 14, with the expectation over t and the noise sampled once per pair):
a winner x0ʷ and a loser x0ˡ of the same prompt are noised with the *same* t ~ U{0..999} and the
same ε; with per-sample errors mse(x) = mean_{C,H,W} (ε_model(x_t, t) − ε)², computed under the
policy θ and the frozen reference,

    inside = −½·β·((mse_θ(xʷ) − mse_θ(xˡ)) − (mse_ref(xʷ) − mse_ref(xˡ)))
    loss   = mean over pairs of −log σ(inside)

(β = 5000 folds in T·ω(λ_t); the mean of −log σ, not −log σ of the mean). Implicit accuracy =
mean(inside > 0): the policy moved the winner's error down relative to the loser's.

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

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

DEFAULTS: dict[str, dict] = {
    "train": {"learning_rate": 2e-5, "adam_weight_decay": 1e-2, "max_grad_norm": 1.0},
}
"""Values ``algorithm: dpo``/``seppo`` use for the keys a config leaves unset (Diffusion-DPO's
SD 1.5 settings: lr 1e-8 × the 2048-pair effective batch, AdamW weight decay 1e-2)."""


@dataclass
class DPOConfig:
    beta: float = 5000.0
    """β of the DPO objective (Diffusion-DPO's default for SD 1.5, per-pixel mean errors)."""
    data: str = ""
    """Preference data: a JSONL of {prompt, winner, loser} image paths (relative to the file), a
    folder holding ``pairs.jsonl``, or ``hf:NAME[:SPLIT]`` / a ``datasets`` folder in the Pick-a-Pic
    layout (caption, jpg_0, jpg_1, label_0). SePPO reads only prompts and winners."""
    steps_per_epoch: int | None = None
    """Optimizer steps per epoch (each on fresh pairs drawn without replacement); null: one pass
    over the data. SePPO's references are the checkpoints written between epochs."""
    empty_prompt_fraction: float = 0.0
    """Fraction of pairs trained with the empty prompt (keeps classifier-free guidance working)."""
    reference_strategy: Literal["initial", "latest", "random"] = "random"
    """SePPO: which model generates x^ref and gives the reference errors: the pretrained one, the
    newest checkpoint, or one of the ``reference_pool`` newest drawn uniformly (a checkpoint is
    written every ``run.save_freq`` epochs; the paper saves every 30 updates and keeps 7)."""
    reference_pool: int = 7
    """SePPO: K, the number of newest checkpoints drawn from."""
    sample_steps: int = 20
    """SePPO: DDIM steps (eta 1, ``sample.guidance_scale``) of the reference's samples x^ref."""
    flipper: bool = True
    """SePPO: the anchor-based flipper chooses each sample's sign; false: s = +1 always (x^ref is
    always the loser, the paper's ablation without the flipper)."""


def dpo_inside(
    mse_w: torch.Tensor, mse_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """inside = −½·β·((mse_θ,w − mse_θ,l) − (mse_ref,w − mse_ref,l)), all ``[B]`` -> ``[B]``."""
    return -0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l))


def dpo_loss(inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of −log σ(inside), implicit accuracy mean(inside > 0)) of ``inside [B]``."""
    return -F.logsigmoid(inside).mean(), (inside.detach() > 0).float().mean()


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
