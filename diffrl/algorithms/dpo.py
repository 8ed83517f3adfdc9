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

SePPO (:mod:`diffrl.algorithms.seppo`) shares this module's data, noising and errors.

Both are offline algorithms (:mod:`diffrl.algorithms`): :func:`setup` reads the preference data
before any model loads, :func:`term` prepares one minibatch's term for the learner.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffrl.errors import require
from diffrl.learner import adapters_disabled
from diffrl.ops import eps_mse
from diffrl.preferences import Preference, load_images, load_preferences
from diffrl.text import encode_prompts
from diffrl.transitions import encode_images

OFFLINE = True
"""Trained on a data source, not on rollouts (:mod:`diffrl.offline`)."""
SECTION = "dpo"
"""The config section of Diffusion-DPO's and SePPO's settings (:class:`DPOConfig`)."""

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

    def validate(self) -> None:
        require(
            bool(self.data),
            "dpo.data",
            "is required: a JSONL of {prompt, winner, loser}, a folder with pairs.jsonl, or hf:NAME",
        )
        require(self.beta > 0, "dpo.beta", f"must be > 0, got {self.beta}")
        require(
            0 <= self.empty_prompt_fraction < 1,
            "dpo.empty_prompt_fraction",
            f"must be in [0, 1), got {self.empty_prompt_fraction}",
        )
        require(self.reference_pool >= 1, "dpo.reference_pool", f"must be >= 1, got {self.reference_pool}")
        require(
            self.steps_per_epoch is None or self.steps_per_epoch >= 1,
            "dpo.steps_per_epoch",
            f"must be >= 1 or null, got {self.steps_per_epoch}",
        )
        require(self.sample_steps >= 1, "dpo.sample_steps", f"must be >= 1, got {self.sample_steps}")


def dpo_inside(
    mse_w: torch.Tensor, mse_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """inside = −½·β·((mse_θ,w − mse_θ,l) − (mse_ref,w − mse_ref,l)), all ``[B]`` -> ``[B]``."""
    return -0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l))


def dpo_loss(inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of −log σ(inside), implicit accuracy mean(inside > 0)) of ``inside [B]``."""
    return -F.logsigmoid(inside).mean(), (inside.detach() > 0).float().mean()


# ---------------------------------------------------------------------------- one term


def noised_pair(pipe, winners: torch.Tensor, losers: torch.Tensor, generator: torch.Generator):
    """Both images of each pair noised with the same t ~ U{0..T−1} and the same ε.

    Returns (x_t ``[2B, C, h, w]`` winners first, t ``[2B]``, ε ``[2B, C, h, w]``)."""
    batch, scheduler = winners.shape[0], pipe.scheduler
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn(winners.shape, generator=generator).to(winners.device)
    t, noise = torch.cat([t, t]).to(winners.device), torch.cat([noise, noise])
    return scheduler.add_noise(torch.cat([winners, losers]), noise, t), t, noise


def errors(unet, x_t, t, embeds, noise, accelerator) -> torch.Tensor:
    """Per-sample ε errors mean_{C,H,W} (ε̂(x_t, t) − ε)² ``[2B]`` float32 (``ops.eps_mse``)."""
    with accelerator.autocast():
        pred = unet(x_t.to(embeds.dtype), t, encoder_hidden_states=embeds).sample
    return eps_mse(pred, noise)


@lru_cache(maxsize=8)
def checkpoint_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint folder holds (cached: a written checkpoint never changes)."""
    return load_file(str(Path(checkpoint) / "trainable.safetensors"))


@contextmanager
def swapped_in(unet, weights: dict[str, torch.Tensor] | None):
    """Within ``with``: the UNet with ``weights`` (a checkpoint's trainable tensors) in place of
    its trained ones, or the pretrained UNet (LoRA disabled) for None; the trained weights are
    back afterwards."""
    if weights is None:
        with adapters_disabled(unet):
            yield unet
        return
    params = dict(unet.named_parameters())
    saved = {name: params[name].detach().clone() for name in weights}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    try:
        yield unet
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def resolution(pipe, config) -> int:
    """The training image side: ``sample.resolution`` or the model's native size."""
    return config.sample.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor


def encode_batch(learner, batch: list[Preference], config, streams):
    """The prompts of ``batch`` (each replaced by the empty prompt with probability
    ``dpo.empty_prompt_fraction``), their embeddings ``[B, L, D]`` and the winners' latents."""
    pipe, d = learner.pipe, config.dpo
    prompts = [
        "" if float(torch.rand(1, generator=streams.prompts)) < d.empty_prompt_fraction else p.prompt
        for p in batch
    ]
    embeds = encode_prompts(pipe, prompts, None, False).embeds
    winners = encode_images(pipe, load_images([p.winner for p in batch], resolution(pipe, config)))
    return prompts, embeds, winners


# ---------------------------------------------------------------------------- the interface

Config = DPOConfig


def validate(config) -> None:
    require(
        config.model.use_lora,
        "model.use_lora",
        f"{config.algorithm} needs LoRA: the reference is the UNet with its adapters disabled (or a "
        "checkpoint's adapters swapped in); full fine-tuning would need a second UNet",
    )


def setup(config) -> list[Preference]:
    """The preference data, every image file checked (before any model loads)."""
    return load_preferences(config.dpo.data, need_loser=True)


def term(ctx, learner, batch: list[Preference], streams):
    """Prepare one Diffusion-DPO term on ``batch`` without gradient (latents, the shared t and ε,
    the frozen reference's errors) and return the closure computing its loss and stats with
    gradient, for :meth:`diffrl.learner.Learner.update`."""
    pipe, config = learner.pipe, ctx.config
    with torch.no_grad():
        _, embeds, winners = encode_batch(learner, batch, config, streams)
        losers = encode_images(pipe, load_images([p.loser for p in batch], resolution(pipe, config)))
        embeds2 = torch.cat([embeds, embeds])
        x_t, t, noise = noised_pair(pipe, winners, losers.to(winners.device), streams.sampling)
        with swapped_in(pipe.unet, None):
            ref_w, ref_l = errors(pipe.unet, x_t, t, embeds2, noise, learner.accelerator).chunk(2)

    def loss():
        mse_w, mse_l = errors(learner.unet, x_t, t, embeds2, noise, learner.accelerator).chunk(2)
        value, accuracy = dpo_loss(dpo_inside(mse_w, mse_l, ref_w, ref_l, config.dpo.beta))
        return value, {"accuracy": accuracy}

    return loss
