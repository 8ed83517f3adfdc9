"""RLCM: reinforcement learning of a latent consistency model (Oertell et al., "RL for Consistency
Models: Faster Reward Guided Text-to-Image Generation", 2024).

The multi-step consistency sampler is the MDP (Sec. 4): with the LCM schedule τ_1 > … > τ_H,
state s_k = (c, τ_k, x_{τ_k}), action a_k = x_{τ_{k+1}} and policy
π(a_k | s_k) = N(√ᾱ_{τ_{k+1}}·f_θ(x_{τ_k}, τ_k), (1 − ᾱ_{τ_{k+1}})·I), f_θ the consistency
function (Sec. 4, the policy paragraph; :func:`diffrl.policies.lcm.lcm_step_with_logprob`). The
reward scores decode(f_θ(x_{τ_H}, τ_H)). The objective and its estimator are DDPO's: the PPO
clipped surrogate with element-mean log-probs and per-prompt advantages
(:func:`diffrl.algorithms.ddpo.ppo_loss`, Sec. 4's Eq. for the policy gradient with importance
sampling), over the H − 1 stochastic steps.

The last consistency step is deterministic here: it has no action and no log-prob, and it is not
a trained term. The released code samples a last x_{τ_H}' around f with std √(1 − ᾱ_{τ_H}) and
trains on it, but the reward reads f, not that draw, so the term's expected gradient is zero
(A is independent of its noise) and it only adds variance. One UNet serves every step, so what
the earlier steps learn moves the last step's output too.

What differs from DDPO is the model and the defaults (:data:`DEFAULTS`, the paper's Sec. 5 and
appendix settings): H = 8 steps, lr 1e-4, PPO clip 1e-4, advantages clipped to ±10, gradient norm
5, LoRA rank 8 / alpha 8 on the attention projections, guidance w = 8 (embedding of w − 1 = 7).
"""

from __future__ import annotations

from diffrl.algorithms.ddpo import loss, plan, prepare, setup
from diffrl.algorithms.ddpo import validate as validate_batches
from diffrl.errors import ConfigError

__all__ = ["DEFAULTS", "MODEL", "loss", "plan", "prepare", "setup", "validate"]

MODEL = "lcm"
"""RLCM trains a latent consistency model's sampler (:mod:`diffrl.policies.lcm`)."""

DEFAULTS: dict[str, dict] = {
    "sample": {"num_steps": 8, "guidance_scale": 8.0},
    "train": {"learning_rate": 1e-4, "clip_range": 1e-4, "adv_clip_max": 10.0, "max_grad_norm": 5.0},
    "model": {"lora_rank": 8, "lora_alpha": 8.0},
}
"""Values ``algorithm: rlcm`` uses for the keys a config leaves unset (the paper's settings)."""


def validate(config) -> None:
    """H >= 2 consistency steps (H − 1 are actions), and DDPO's whole optimizer steps."""
    if config.sample.num_steps < 2:
        raise ConfigError(
            "sample.num_steps: RLCM needs H >= 2 consistency steps (H - 1 of them are trained actions), "
            f"got {config.sample.num_steps}"
        )
    validate_batches(config)
