"""Training on the forward process, shared by the algorithms that need no sampler likelihood
(DiffusionNFT, RAFT): fresh noise on final latents x0 at the timesteps of the sampler's schedule,
a loss of the denoiser's output there, and the learner's accumulated updates.

One epoch is ``train.num_inner_epochs`` shuffled passes over the trained rows in minibatches of
``train.batch_size``; for each minibatch one accumulated term per trained timestep, each row its
own shuffled order of the schedule's N timesteps, the first ``int(train.timestep_fraction · N)``
of them trained (an optimizer step every ``train.gradient_accumulation_steps`` minibatches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from diffrl.types import Text


@dataclass
class Noised:
    """One term's inputs: the rows, their x0 ``[m, C, h, w]``, the noise ε and the timesteps
    ``[m]``, x_t = ``add_noise(x0, ε, t)``, the rows' text, the mask of real (not padding) rows
    ``[m]`` and the transition (``predicted_x0``, ``target``, ``noise_pred``)."""

    rows: torch.Tensor
    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    text: Text
    valid: torch.Tensor
    transition: object


def validate_data(config, group_size: int, key: str) -> None:
    """The checks every forward-process method needs: whole groups of ``group_size`` (the config
    key ``key``) per epoch, and a sampler whose last stored state is the final x0."""
    from diffrl.errors import require

    s = config.sample
    samples = s.batch_size * s.num_batches_per_epoch
    require(
        samples % group_size == 0,
        key,
        f"{group_size} must divide sample.batch_size * sample.num_batches_per_epoch = {samples}",
    )
    require(
        not (s.flow_step == "cps" and s.eta > 0),
        "sample.flow_step",
        "cps ends in a deterministic map that the stored states do not include; the forward-process loss needs the final x0 (use sde or eta 0)",
    )


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The mean of ``values [m]`` over the ``valid [m]`` rows (0 when none is)."""
    weight = valid.to(values.device, torch.float32)
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def train_on_forward_process(
    ctx,
    x0: torch.Tensor,
    text: Text,
    trained: torch.Tensor,
    streams,
    epoch: int,
    label: str,
    loss: Callable[[Noised], tuple[torch.Tensor, dict]],
) -> dict:
    """The epoch's update (module docstring) on the rows of ``x0 [N, C, h, w]`` (final latents)
    and ``text`` (N rows) where ``trained [N]`` is true; ``loss(noised) -> (loss, stats)`` for each
    term. Classifier-free guidance's negative rows are dropped unless ``train.cfg``. Returns the
    stats averaged over the terms, ``optimizer_steps`` (this process's, skipped ones included) and
    ``skipped_steps`` (non-finite ones the learner skipped)."""
    from diffrl.collect import sampler_settings
    from diffrl.learner import training_items
    from diffrl.progress import progress
    from diffrl.transitions import transition_for

    config, learner, accelerator = ctx.config, ctx.learner, ctx.accelerator
    t = config.train
    transition = transition_for(learner.pipe, sampler_settings(config))
    timesteps = transition.schedule(config.sample.num_steps, x0[:1])
    trained_steps = max(1, int(len(timesteps) * t.timestep_fraction))
    index, valid = training_items(trained, t.batch_size * t.gradient_accumulation_steps, accelerator)
    accelerator.gradient_accumulation_steps = t.gradient_accumulation_steps * trained_steps
    accelerator.step = 0
    if not t.cfg:
        text = Text(text.embeds, text.pooled)

    def term(rows: torch.Tensor, ok: torch.Tensor, steps: torch.Tensor):
        x0_rows, ts = x0[rows].to(accelerator.device), timesteps[steps]
        noise = torch.randn(x0_rows.shape, generator=streams.shuffle).to(x0_rows.device)
        x_t = transition.add_noise(x0_rows, noise, ts)
        return loss(Noised(rows, x0_rows, noise, ts, x_t, text.select(rows), ok, transition))

    totals, terms, skipped = {}, 0, learner.guard.skipped
    learner.unet.train()
    for inner in range(t.num_inner_epochs):
        order = torch.randperm(len(index), generator=streams.shuffle)
        minibatches = progress(
            order.split(t.batch_size), f"{label}: training", accelerator.is_local_main_process, "minibatches"
        )
        for b, rows in enumerate(minibatches):
            orders = torch.stack([torch.randperm(len(timesteps), generator=streams.shuffle) for _ in rows])
            for j in range(trained_steps):
                stats = learner.update(
                    partial(term, index[rows], valid[rows], orders[:, j]),
                    f"epoch {epoch}, inner epoch {inner}",
                    f"minibatch {b}, trained timestep {j}",
                )
                for name, value in stats.items():
                    totals[name] = totals.get(name, 0.0) + value
                terms += 1
    learner.unet.eval()
    steps = t.num_inner_epochs * len(index) // (t.batch_size * t.gradient_accumulation_steps)
    means = {k: v / max(terms, 1) for k, v in totals.items()}
    return {**means, "optimizer_steps": steps, "skipped_steps": learner.guard.skipped - skipped}
