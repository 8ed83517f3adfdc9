"""Small dataclasses passed between the sampler, the rewards and the algorithms.

Shapes: B = batch, T = number of sampler steps, C/h/w = latent channels/height/width,
H/W = image height/width, L = text tokens, D = text embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    """One stochastic sampler step seen as a Gaussian policy pi(x_{t-1} | x_t).

    Attributes:
        prev_sample: the action x_{t-1}, ``[B, C, h, w]`` (sampled, or the one given to score).
        log_prob: log pi(prev_sample | sample), element-mean convention, ``[B]`` float32
            (None for a deterministic step, eta = 0).
        mean: the policy mean mu_theta(x_t, t), ``[B, C, h, w]``.
        std: the policy standard deviation sigma_t, ``[B, 1, 1, 1]`` (broadcasts over latents).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor | None
    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class Text:
    """Encoded prompts of a batch, every tensor batch-first in the text encoders' dtype.

    Attributes:
        embeds: per-token embeddings ``[B, L, D]`` (SD3: CLIP-L/G padded to T5's width, then T5
            along the sequence; FLUX: T5).
        pooled: pooled embeddings ``[B, P]`` for SD3 (CLIP-L and -G concatenated) and FLUX
            (CLIP-L); None for SD and LCMs.
        negative, negative_pooled: the same for guidance's unconditional branch (the negative
            prompt), or None when sampled without classifier-free guidance.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> Text:
        """The rows ``index`` (``[K]`` long) of every tensor."""
        return Text(*(None if t is None else t[index] for t in self.tensors()))

    def repeat(self, times: int) -> Text:
        """Every row ``times`` times in a row (``repeat_interleave``): ``[B, ...]`` -> ``[B·times, ...]``."""
        return Text(*(None if t is None else t.repeat_interleave(times, dim=0) for t in self.tensors()))

    def tensors(self) -> tuple:
        """(embeds, pooled, negative, negative_pooled)."""
        return self.embeds, self.pooled, self.negative, self.negative_pooled

    @staticmethod
    def cat(texts: list[Text]) -> Text:
        """The rows of all ``texts`` in order."""
        parts = zip(*(t.tensors() for t in texts))
        return Text(*(None if p[0] is None else torch.cat(p) for p in parts))


@dataclass
class Trajectory:
    """A batch of denoising chains (the MDP episodes) and their decoded images.

    Attributes:
        prompts: the B prompts.
        text: their encoding (:class:`Text`: ``[B, L, D]`` embeddings, pooled ones for SD3/FLUX,
            and the negative prompt's when sampled with classifier-free guidance).
        latents: states x_T, ..., x_0 of every chain, ``[B, T+1, C, h, w]`` float32;
            ``latents[:, j]`` is the input of step j and ``latents[:, j+1]`` its action. For a
            latent consistency model with H steps, T = H − 1 (the stochastic steps) and
            ``latents[:, -1]`` is x_{τ_H}, the input of the deterministic last consistency step
            whose output is decoded to ``images``.
        timesteps: the scheduler timestep of each step, ``[T]`` (long; float 1000 σ for flow models).
        log_probs: log pi(latents[:, j+1] | latents[:, j]) at sampling time, ``[B, T]`` float32;
            None for a deterministic chain (eta = 0), which has no density.
        images: decoded final images, ``[B, 3, H, W]`` float32 in [0, 1].
        parents: for branch sampling (B²-DiffuRL), the index of each chain's shared prefix
            (its trunk), ``[B]`` long: chains with equal parents have equal ``latents[:, :b+1]``.
            None when every chain is independent.
    """

    prompts: list[str]
    text: Text
    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor | None
    images: torch.Tensor
    parents: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        """T, the number of sampler steps (actions) in each chain."""
        return self.timesteps.shape[0]


@dataclass(frozen=True)
class SamplerSettings:
    """How chains are sampled: the settings every rollout, guidance method and evaluation shares.

    Attributes:
        num_steps: DDIM steps T, or an LCM's H consistency steps (T = H − 1 actions).
        guidance_scale: classifier-free guidance weight w (<= 1 disables guidance); for an LCM the
            w whose embedding the UNet takes (no doubling).
        eta: DDIM stochasticity, or the noise level a of a flow model's SDE/CPS step (0: a
            deterministic chain without log-probabilities, the Euler ODE for a flow model; unused
            by an LCM).
        height, width: image size in pixels (None: the UNet's native size).
        negative_prompt: the prompt of guidance's unconditional branch.
        flow_step: a flow model's stochastic step: ``sde`` (Flow-GRPO) or ``cps``
            (coefficients-preserving); see :mod:`diffrl.policies.flow`.
        max_sequence_length: T5 tokens per prompt for SD3/FLUX (None: the pipeline's default,
            256 for SD3, 512 for FLUX).
    """

    num_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 1.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    flow_step: str = "sde"
    max_sequence_length: int | None = None
