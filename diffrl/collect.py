"""An epoch's rollouts: sampling batches on the policy while a worker thread scores the previous
batch (DDPO Alg. 1's sampling phase, with the reward overlapped), and the reward plumbing
(timeouts, dropped samples, metadata) the trainer and the algorithms share."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from accelerate.utils import gather_object

from diffrl import rewards
from diffrl.algorithms import Plan, Rollouts
from diffrl.progress import progress
from diffrl.rollout import concat_trajectories, sample_branches
from diffrl.transitions import denoiser
from diffrl.types import SamplerSettings, Trajectory


def sampler_settings(config) -> SamplerSettings:
    """The sampler of a run's rollouts from its ``sample`` section."""
    s = config.sample
    return SamplerSettings(
        num_steps=s.num_steps,
        guidance_scale=s.guidance_scale,
        eta=s.eta,
        height=s.resolution,
        width=s.resolution,
        negative_prompt=s.negative_prompt,
        flow_step=s.flow_step,
        max_sequence_length=s.max_sequence_length,
    )


def sample_batch(
    pipe, config, prompts: list[str], generator: torch.Generator, plan: Plan | None = None
) -> Trajectory:
    """One batch of chains with the configured sampler, branched as ``plan`` says (default: not)."""
    plan = plan or Plan()
    return sample_branches(
        pipe,
        prompts,
        sampler_settings(config),
        branch_step=plan.branch_step,
        num_branches=plan.num_branches,
        generator=generator,
        window=plan.window,
    )


def score_images(reward_fn, traj: Trajectory, config, where: str, *, chunk=None, first=0, metadata=None):
    """Rewards ``[B]`` of ``traj``'s images under ``reward.timeout`` / ``reward.on_error`` (NaN:
    dropped), in calls of at most ``chunk`` images (default all); the reward writes into the B
    ``metadata`` dicts (default fresh ones, discarded). Failed samples are numbered from ``first``."""
    chunk = chunk or len(traj)
    metadata = metadata if metadata is not None else [{} for _ in traj.prompts]
    values = []
    for start in range(0, len(traj), chunk):
        stop = min(start + chunk, len(traj))
        values.append(
            rewards.score(
                reward_fn,
                traj.images[start:stop],
                traj.prompts[start:stop],
                metadata[start:stop],
                timeout=config.reward.timeout,
                on_error=config.reward.on_error,
                first_index=first + start,
                where=where,
            )
        )
    return torch.cat(values)


@contextmanager
def lora_merged(unet, enabled: bool):
    """Within: every LoRA layer's update folded into its base weight (peft ``merge``); after: the
    adapters unmerged and the base weights restored bit for bit from a copy (unmerging alone
    subtracts the update again and leaves rounding behind)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)] if enabled else []
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    with torch.no_grad():
        for layer in layers:
            layer.merge()
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.unmerge()
                layer.get_base_layer().weight.copy_(weight)


def sample_epoch(
    pipe, config, source, reward_fn, streams, accelerator, plan: Plan, *, merge: bool, where: str, label: str
):
    """``sample.num_batches_per_epoch`` batches of ``sample.batch_size`` prompts (drawn from
    ``streams.prompts``), sampled with ``merge`` (LoRA folded in) and branched per ``plan``; each
    batch's reward runs in a worker thread while the next batch samples; ``label`` (``epoch 3/10``)
    heads the progress lines.

    Returns :class:`Rollouts`: one trajectory of all N local chains, rewards ``[N]`` (NaN:
    dropped), the N metadata dicts, the seconds spent sampling and waiting for rewards."""
    s = config.sample
    trajectories, futures, metadata, t0 = [], [], [], time.perf_counter()
    grouped = epoch_prompts(source, s.batch_size * s.num_batches_per_epoch, plan.group_size, streams.prompts)
    with ThreadPoolExecutor(max_workers=1) as pool:
        batches = range(s.num_batches_per_epoch)
        for b in progress(batches, f"{label}: sampling", accelerator.is_local_main_process):
            prompts = (
                source.sample(s.batch_size, streams.prompts)
                if grouped is None
                else grouped[b * s.batch_size : (b + 1) * s.batch_size]
            )
            if plan.num_branches > 1 and plan.group_size == plan.num_branches:
                prompts = prompts[:: plan.num_branches]  # one trunk per group, its K branches the group
            with accelerator.autocast(), lora_merged(denoiser(pipe), merge):
                traj = sample_batch(pipe, config, prompts, streams.sampling, plan)
            trajectories.append(traj)
            batch_metadata = [{} for _ in traj.prompts]
            futures.append(
                pool.submit(
                    score_images, reward_fn, traj, config, where, first=len(metadata), metadata=batch_metadata
                )
            )
            metadata += batch_metadata
        t1 = time.perf_counter()
        local_rewards = torch.cat([f.result() for f in futures])
    t2 = time.perf_counter()
    return Rollouts(concat_trajectories(trajectories), local_rewards, metadata, t1 - t0, t2 - t1)


def epoch_prompts(source, count: int, group_size: int, generator) -> list[str] | None:
    """With ``group_size`` > 1, the epoch's ``count`` prompts as ``count / group_size`` draws,
    each repeated ``group_size`` times in a row; None (draw per batch) otherwise."""
    if group_size <= 1:
        return None
    return [p for p in source.sample(count // group_size, generator) for _ in range(group_size)]


def metadata_means(metadata: list[dict], valid: torch.Tensor, accelerator) -> dict[str, float]:
    """Mean over all processes' kept samples (``valid [N]``) of every numeric value rewards wrote
    into the metadata (e.g. ``exact_match`` of ``shapes_alignment``), as ``{"reward_<key>": mean}``."""
    metadata = [meta for meta, keep in zip(metadata, valid.tolist()) if keep]
    if accelerator.num_processes > 1:
        metadata = gather_object(metadata)
    values: dict[str, list[float]] = {}
    for meta in metadata:
        for key, value in meta.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key, []).append(float(value))
    return {f"reward_{k}": sum(v) / len(v) for k, v in values.items()}
