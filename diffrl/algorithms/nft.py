"""DiffusionNFT: online RL on the forward process (Zheng et al. 2025, *DiffusionNFT: Online Diffusion
Reinforcement with Forward Process*, Sec. 3-4 and Alg. 1; the formulas of its public code's
``scripts/train_nft_sd3.py``, REFERENCES.md "DiffusionNFT").

**Data.** Each epoch the *old* policy v_old (θ_old, below) samples G images per prompt with any
solver; the config's sampler is used as it is, the deterministic one by default (``sample.eta``
0: the flow Euler ODE, or DDIM at eta 0). Only the final latents x0 are kept for training; no
step log-probs are needed. Rewards become advantages within each prompt's group
(:func:`diffrl.algorithms.grpo.group_advantages`), clipped to ±c (``train.adv_clip_max``, 5), and
then optimality probabilities r = clip(A / 2c + 1/2, 0, 1) ∈ [0, 1] (the code's A/10 + 1/2).

**Loss.** For each sample and each trained timestep t of the sampler's schedule (shuffled per
sample, the first ``int(train.timestep_fraction · N)``), a fresh ε gives x_t by the forward process
(flow: (1 − σ) x0 + σ ε). With the implicit positive and negative policies (Eq. 6)

    v⁺ = (1 − β) v_old + β v_θ,        v⁻ = (1 + β) v_old − β v_θ

and their x0 predictions x̂± (flow: x_t − σ v±), each sample's loss is (Eq. 8, with the code's
adaptive weight: the error normalised by its own detached mean absolute value)

    L± = mean((x̂± − x0)²) / sg(max(mean|x̂± − x0|, 1e-5))
    L  = 5 · [r L⁺ + (1 − r) L⁻] / β + λ · mean((v_θ − v_ref)²)

averaged over the minibatch, v_ref the denoiser with its LoRA adapters disabled (λ =
``nft.reference_weight``, 1e-4). A positive sample (r = 1) pulls v_θ towards the flow-matching
target of its own x0; a negative one (r = 0) pushes v_θ away from it, as far as v_old allows.

**Old policy.** After each epoch's update θ_old ← η θ_old + (1 − η) θ with
η = min(u · max(0, k − f), h), k the optimizer steps taken so far (the code's ``decay_type`` 1:
f = 0, u = 1e-3, h = 0.5; ``nft.old_*``). θ_old starts at the pretrained weights, so early
epochs are (nearly) on-policy.

**On DDIM UNets** the same loss runs on the ε-prediction: x_t = √ᾱ x0 + √(1 − ᾱ) ε and
x̂ = (x_t − √(1 − ᾱ) ε̂) / √ᾱ, which is affine in the model output like the flow's x_t − σ v, so
x̂± = (1 − β) x̂_old + β x̂_θ exactly as above. It differs in scale: x̂'s error is ε̂'s times
√((1 − ᾱ)/ᾱ), huge at high noise, which the adaptive weight divides out; and the regulariser is
on ε̂ instead of v. Neither sampler likelihood nor the sampler's own steps enter the loss, which is
why any solver can collect the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffrl.algorithms import Batch, Context, Plan, Rollouts, gather, per_sample
from diffrl.algorithms.forward import Noised, masked_mean, train_on_forward_process, validate_data
from diffrl.algorithms.grpo import group_advantages
from diffrl.errors import require

SECTION = "nft"
MODEL = ("ddim", "flow")
"""NFT trains DDIM UNets and flow transformers (SD3, FLUX); a consistency model has no forward
process of this form."""
LOG_PROBS = False
DEFAULTS: dict[str, dict] = {"sample": {"eta": 0.0}, "train": {"timestep_fraction": 0.99}}
"""The deterministic solver and the code's share of trained timesteps unless a config says otherwise."""
LOSS_SCALE = 5.0
"""The constant factor of the reference code's policy loss."""

__all__ = [
    "DEFAULTS",
    "MODEL",
    "SECTION",
    "Config",
    "collect",
    "nft_loss",
    "plan",
    "prepare",
    "setup",
    "train",
]


@dataclass
class NFTConfig:
    group_size: int = 8
    """G: images per prompt per epoch (the reference: 24)."""
    beta: float = 1.0
    """β of the implicit policies (the reference: 1.0; 0.1 for OCR and multiple rewards)."""
    reference_weight: float = 1e-4
    """λ of the velocity-MSE regulariser to the reference (0: off; needs LoRA otherwise)."""
    old_flat: int = 0
    """f: optimizer steps before the old policy starts to lag (η = 0 until then)."""
    old_rate: float = 1e-3
    """u: growth of η per optimizer step."""
    old_max: float = 0.5
    """h: the largest η (the old policy's weight on itself)."""

    def validate(self) -> None:
        require(self.group_size >= 2, "nft.group_size", f"must be >= 2, got {self.group_size}")
        require(self.beta > 0, "nft.beta", f"must be > 0, got {self.beta}")
        require(
            self.reference_weight >= 0, "nft.reference_weight", f"must be >= 0, got {self.reference_weight}"
        )
        require(0 <= self.old_max < 1, "nft.old_max", f"must be in [0, 1), got {self.old_max}")
        require(
            self.old_rate >= 0 and self.old_flat >= 0, "nft.old_rate", "old_rate and old_flat must be >= 0"
        )


Config = NFTConfig


def validate(config) -> None:
    """Whole groups per epoch; a reference for the regulariser; a sampler whose last state is x0."""
    n = config.nft
    validate_data(config, n.group_size, "nft.group_size")
    require(
        n.reference_weight == 0 or config.model.use_lora,
        "nft.reference_weight",
        "the reference is the denoiser with its LoRA adapters disabled: needs model.use_lora: true (or 0)",
    )


def old_weight(steps: int, config: NFTConfig) -> float:
    """η = min(u · max(0, k − f), h) after k optimizer steps."""
    return min(config.old_rate * max(0, steps - config.old_flat), config.old_max)


class NFTState:
    """The old policy θ_old (an :class:`~diffrl.ema.EMA` of the trained weights, built on the first
    use from the learner) and the optimizer steps taken; both go into checkpoints."""

    def __init__(self):
        self.old = None
        self.steps = 0
        self.pending = None

    def policy(self, learner):
        """θ_old of ``learner``'s trained parameters (restored from a checkpoint when one was read)."""
        from diffrl.ema import EMA

        if self.old is None:
            self.old = EMA(learner.unet, decay=0.0, every=1)
            if self.pending is not None:
                self.old.load_state_dict(*self.pending)
                self.pending = None
        return self.old

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])

    def tensor_state(self, keep: bool = True) -> dict[str, torch.Tensor]:
        return self.old.state_dict(keep)

    def load_tensor_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        self.pending = (tensors, source)


def setup(config) -> NFTState:
    return NFTState()


def plan(config, epoch: int) -> Plan:
    """Groups of ``nft.group_size`` independent chains per prompt."""
    return Plan(group_size=config.nft.group_size)


def collect(ctx: Context, epoch: int, sample) -> Rollouts:
    """The epoch's rollouts sampled by the old policy θ_old."""
    with ctx.state.policy(ctx.learner).applied():
        return sample()


def prepare(ctx: Context, rollouts: Rollouts, epoch: int) -> Batch:
    """Optimality probabilities r ∈ [0, 1] (``values["r"]``) from group advantages; a dropped
    reward is not trained."""
    gathered = gather(ctx, rollouts, epoch)
    c = ctx.config.train.adv_clip_max
    advantages = group_advantages(gathered.prompts, gathered.rewards, False, 1e-4)
    r = (advantages.clamp(-c, c) / (2 * c) + 0.5).clamp(0, 1)
    batch = per_sample(advantages, gathered.finite, gathered)
    batch.values["r"] = gathered.local(r)
    batch.metrics["r_mean"] = float(r[gathered.finite].mean())
    return batch


def adaptive_error(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """mean((x̂ − x0)²) / sg(max(mean|x̂ − x0|, 1e-5)) per sample: ``[B, C, h, w]`` x 2 -> ``[B]``."""
    err = (x0_hat - x0).flatten(1)
    return (err**2).mean(1) / err.abs().mean(1).detach().clamp(min=1e-5)


def nft_loss(
    x0: torch.Tensor,
    x0_theta: torch.Tensor,
    x0_old: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The policy loss (module docstring) from the x0 predictions of the trained and the old
    denoiser, ``[B, C, h, w]`` each (x̂ is affine in the model output, so x̂± combine like v±),
    optimality probabilities ``r [B]`` and β; the mean over the ``valid`` rows. 0-dim float32."""
    positive = (1 - beta) * x0_old + beta * x0_theta
    negative = (1 + beta) * x0_old - beta * x0_theta
    per_sample_loss = (
        LOSS_SCALE * (r * adaptive_error(positive, x0) + (1 - r) * adaptive_error(negative, x0)) / beta
    )
    return per_sample_loss.mean() if valid is None else masked_mean(per_sample_loss, valid)


def train(ctx: Context, batch: Batch, traj, streams, epoch: int, label: str) -> dict:
    """The epoch's update on the forward process (:func:`~diffrl.algorithms.forward.train_on_forward_process`:
    ``num_inner_epochs`` passes, one accumulated term per trained timestep) with the loss above;
    then the old-policy update."""
    from diffrl.learner import adapters_disabled
    from diffrl.transitions import denoiser

    config, learner, state = ctx.config, ctx.learner, ctx.state
    n, accelerator = config.nft, ctx.accelerator
    old = state.policy(learner)
    samples = batch.members[:, 0]
    r_all = batch.values["r"]
    model = denoiser(learner.pipe)

    def loss(term: Noised):
        transition, x_t, ts, text = term.transition, term.x_t, term.t, term.text
        with torch.no_grad(), accelerator.autocast():
            with old.applied():
                x0_old = transition.predicted_x0(
                    transition.noise_pred(x_t, ts, text, unet=learner.unet), ts, x_t
                )
            out_ref = None
            if n.reference_weight > 0:
                with adapters_disabled(model):
                    out_ref = transition.noise_pred(x_t, ts, text, unet=model)
        with accelerator.autocast():
            out = transition.noise_pred(x_t, ts, text, unet=learner.unet)
        x0_theta = transition.predicted_x0(out, ts, x_t)
        r = r_all[term.rows].to(x_t.device)
        value = nft_loss(term.x0, x0_theta, x0_old, r, n.beta, term.valid)
        stats = {"policy_loss": value.detach()}
        if out_ref is not None:
            reg = masked_mean(((out - out_ref) ** 2).flatten(1).mean(1), term.valid)
            value = value + n.reference_weight * reg
            stats["reference_mse"] = reg.detach()
        return value, stats  # accelerate divides by the accumulation length (trained_steps terms each)

    stats = train_on_forward_process(
        ctx, traj.latents[samples, -1], traj.text.select(samples), batch.trained, streams, epoch, label, loss
    )
    state.steps += stats.pop("optimizer_steps")
    eta = old_weight(state.steps, n)
    old.blend(eta)
    return {**stats, "old_weight": eta}
