"""RAFT: reward-ranked fine-tuning (Dong et al., TMLR 2023, *RAFT: Reward rAnked FineTuning for
Generative Foundation Model Alignment*, Alg. 1), and its curated self-consuming form (Ferbach et
al. 2024, *Self-Consuming Generative Models with Curated Data Provably Optimize Human
Preferences*, the retraining loop with a fraction of the original data, their Sec. 3-4).

**One stage per epoch** (Alg. 1): the current model samples K = ``raft.group_size`` images for
each of the epoch's prompts with the config's sampler (any solver: no log-probs are needed);
the reward ranks them; each prompt keeps its ``raft.keep`` best (acceptance keep/K; RAFT's 1),
and of those the best ``raft.top_fraction`` over the whole batch (the LMFlow SD example's best
8 of 10); the model is then fine-tuned on the kept final latents x0 with the diffusion training
loss — fresh noise ε at the sampler's timesteps t, x_t by the forward process and

    L = mean over kept rows of mean((f_θ(x_t, t, c) − target(x0, ε, t))²)

the regression target of the model's parameterisation (flow: ε − x0; DDIM: ε, or v), with
:func:`~diffrl.algorithms.forward.train_on_forward_process` (``train.num_inner_epochs`` passes,
minibatches of ``train.batch_size``). The conditional denoiser is trained (no guidance mix), a
share ``raft.empty_prompt_fraction`` of rows with the empty prompt so that the unconditional
velocity that classifier-free guidance extrapolates from is fitted to the same images.

**Curated self-consuming** (``raft.data_fraction`` φ > 0): every stage retrains on a mixture in
which a share φ of the rows are original data — ``raft.data: toy`` renders the stage's prompts
with the toy world (the data the tiny models were pretrained on), a JSONL of ``{prompt, image}``
rows (paths relative to the file) draws rows at random; their images are VAE-encoded to x0. With
φ = 0 it is plain RAFT; Ferbach et al. show that the mixture keeps the iterated retraining stable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from diffrl.algorithms import Batch, Context, Plan, Rollouts, gather
from diffrl.algorithms.forward import Noised, masked_mean, train_on_forward_process, validate_data
from diffrl.errors import ConfigError, require

SECTION = "raft"
MODEL = ("ddim", "flow")
"""RAFT fine-tunes DDIM UNets and flow transformers with their training loss."""
LOG_PROBS = False
DEFAULTS: dict[str, dict] = {"train": {"cfg": False, "timestep_fraction": 0.99}}
"""The conditional denoiser, trained at (nearly) every timestep of the schedule."""

__all__ = ["DEFAULTS", "MODEL", "SECTION", "Config", "plan", "prepare", "select", "setup", "train"]


@dataclass
class RAFTConfig:
    group_size: int = 8
    """K: images sampled per prompt per stage."""
    keep: int = 1
    """Best images kept per prompt (RAFT: 1, acceptance 1/K)."""
    top_fraction: float = 1.0
    """Share of the kept images, best first over the whole batch, that is trained."""
    data: str = ""
    """Original data for the self-consuming mixture: ``toy`` or a JSONL of {prompt, image} rows."""
    data_fraction: float = 0.0
    """φ: share of each stage's training rows drawn from ``data`` (0: plain RAFT)."""
    empty_prompt_fraction: float = 0.1
    """Share of rows trained with the empty (negative) prompt, so that the unconditional velocity
    that classifier-free guidance extrapolates from moves with the conditional one (SD's 10%)."""

    def validate(self) -> None:
        require(self.group_size >= 1, "raft.group_size", f"must be >= 1, got {self.group_size}")
        require(
            1 <= self.keep <= self.group_size,
            "raft.keep",
            f"must be in [1, raft.group_size = {self.group_size}], got {self.keep}",
        )
        require(
            0 < self.top_fraction <= 1, "raft.top_fraction", f"must be in (0, 1], got {self.top_fraction}"
        )
        require(
            0 <= self.data_fraction < 1, "raft.data_fraction", f"must be in [0, 1), got {self.data_fraction}"
        )
        require(
            0 <= self.empty_prompt_fraction < 1,
            "raft.empty_prompt_fraction",
            f"must be in [0, 1), got {self.empty_prompt_fraction}",
        )
        require(
            self.data_fraction == 0 or bool(self.data),
            "raft.data",
            "raft.data_fraction > 0 needs raft.data: toy or a JSONL of {prompt, image} rows",
        )


Config = RAFTConfig


def validate(config) -> None:
    """Whole groups per epoch; the conditional loss; a sampler whose last state is x0."""
    r = config.raft
    validate_data(config, r.group_size, "raft.group_size")
    require(
        not config.train.cfg,
        "train.cfg",
        "RAFT fine-tunes the conditional denoiser with the diffusion loss: set train.cfg: false",
    )


def read_data(path: str) -> list[tuple[str, Path]]:
    """The (prompt, image path) rows of a JSONL file; a bad line or a missing image raises a
    :class:`ConfigError` naming the file and line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"raft.data: {path} is not a file (toy, or a JSONL of {{prompt, image}} rows)")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, image = str(row["prompt"]), file.parent / row["image"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(
                f"raft.data: {path}:{number}: a row needs 'prompt' and 'image' ({err})"
            ) from err
        if not image.is_file():
            raise ConfigError(f"raft.data: {path}:{number}: image {image} does not exist")
        rows.append((prompt, image))
    if not rows:
        raise ConfigError(f"raft.data: {path} has no rows")
    return rows


def setup(config) -> list[tuple[str, Path]] | None:
    """The original data's rows (read and checked before any model loads), or None."""
    r = config.raft
    if r.data_fraction == 0 or r.data == "toy":
        return None
    return read_data(r.data)


def plan(config, epoch: int) -> Plan:
    """K independent chains per prompt."""
    return Plan(group_size=config.raft.group_size)


def select(prompts: list[str], rewards: torch.Tensor, keep: int, top_fraction: float) -> torch.Tensor:
    """RAFT's acceptance: each prompt's ``keep`` highest finite rewards (ties to the earlier
    sample), then the best ``ceil(top_fraction · kept)`` of those. ``[N]`` bool."""
    finite = torch.isfinite(rewards)
    kept = torch.zeros_like(finite)
    for prompt in dict.fromkeys(prompts):
        members = torch.tensor(
            [i for i, p in enumerate(prompts) if p == prompt and finite[i]], dtype=torch.long
        )
        if len(members):
            order = torch.sort(rewards[members], descending=True, stable=True).indices
            kept[members[order[:keep]]] = True
    chosen = kept.nonzero().flatten()
    count = math.ceil(top_fraction * len(chosen))
    order = torch.sort(rewards[chosen], descending=True, stable=True).indices
    selected = torch.zeros_like(finite)
    selected[chosen[order[:count]]] = True
    return selected


def prepare(ctx: Context, rollouts: Rollouts, epoch: int) -> Batch:
    """The kept samples (``trained``) over every process's rewards."""
    r = ctx.config.raft
    gathered = gather(ctx, rollouts, epoch)
    selected = select(gathered.prompts, gathered.rewards, r.keep, r.top_fraction)
    local = gathered.local(selected)
    return Batch(
        members=torch.arange(local.shape[0])[:, None],
        trained=local,
        rewards=gathered.rewards,
        metrics={
            "kept": int(selected.sum()),
            "kept_reward_mean": float(gathered.rewards[selected].mean()),
        },
    )


def original_data(ctx: Context, prompts: list[str], count: int, size: int, streams):
    """``count`` rows of the original data at ``size``² px: (prompts, x0 ``[count, C, h, w]``),
    ``toy``: ``prompts`` rendered in turn, or rows drawn from the JSONL."""
    from diffrl import toyworld
    from diffrl.preferences import load_images
    from diffrl.transitions import encode_images

    pipe, data = ctx.learner.pipe, ctx.config.raft.data
    if data == "toy":
        if size != toyworld.SIZE:
            raise ConfigError(
                f"raft.data: toy renders {toyworld.SIZE} px images of the toy world; this model samples {size} px"
            )
        chosen = [prompts[i % len(prompts)] for i in range(count)]
        seed = int(torch.randint(1 << 30, (1,), generator=streams.shuffle))
        images = toyworld.render_batch(chosen, seed) * 2 - 1
    else:
        rows = [ctx.state[int(i)] for i in torch.randint(len(ctx.state), (count,), generator=streams.shuffle)]
        chosen = [p for p, _ in rows]
        images = load_images([image for _, image in rows], size)
    return chosen, encode_images(pipe, images)


def with_empty_prompts(text, transition, negative_prompt: str, fraction: float, streams):
    """``text`` (N rows, conditional only) with each row replaced by the encoded empty (negative)
    prompt with probability ``fraction`` (drawn from the shuffle stream)."""
    from diffrl.types import Text

    empty = transition.encode([negative_prompt], "", text.embeds.device)
    chosen = torch.rand(text.embeds.shape[0], generator=streams.shuffle) < fraction
    rows = chosen.to(text.embeds.device)

    def swap(tensor, value):
        return None if tensor is None else torch.where(rows.view(-1, *[1] * (tensor.ndim - 1)), value, tensor)

    return Text(
        swap(text.embeds, empty.embeds[:1]),
        swap(text.pooled, None if empty.pooled is None else empty.pooled[:1]),
    )


def train(ctx: Context, batch: Batch, traj, streams, epoch: int, label: str) -> dict:
    """Fine-tune on the kept samples (and, with ``raft.data_fraction``, original data) with the
    diffusion loss (module docstring)."""
    from diffrl.collect import sampler_settings
    from diffrl.transitions import transition_for
    from diffrl.types import Text

    config, learner, accelerator = ctx.config, ctx.learner, ctx.accelerator
    samples, trained = batch.members[:, 0], batch.trained
    x0 = traj.latents[samples, -1].float()
    text = Text(traj.text.embeds, traj.text.pooled).select(samples)
    kept = samples[trained].tolist()
    r, extra = config.raft, {}
    transition = transition_for(learner.pipe, sampler_settings(config))
    if r.data_fraction > 0 and kept:
        count = max(1, round(r.data_fraction / (1 - r.data_fraction) * len(kept)))
        prompts, data_x0 = original_data(
            ctx, [traj.prompts[i] for i in kept], count, traj.images.shape[-1], streams
        )
        encoded = transition.encode(prompts, "", accelerator.device)
        x0 = torch.cat([x0, data_x0.to(x0.device)])
        text = Text.cat([text, Text(encoded.embeds, encoded.pooled)])
        trained = torch.cat([trained, torch.ones(count, dtype=torch.bool)])
        extra["data_rows"] = count
    if r.empty_prompt_fraction > 0:
        text = with_empty_prompts(
            text, transition, config.sample.negative_prompt, r.empty_prompt_fraction, streams
        )

    def loss(term: Noised):
        with accelerator.autocast():
            out = term.transition.noise_pred(term.x_t, term.t, term.text, unet=learner.unet)
        target = term.transition.target(term.x0, term.noise, term.t)
        value = masked_mean(((out.float() - target) ** 2).flatten(1).mean(1), term.valid)
        return value, {"diffusion_loss": value.detach()}

    stats = train_on_forward_process(ctx, x0, text, trained, streams, epoch, label, loss)
    stats.pop("optimizer_steps")
    return {**stats, **extra}
