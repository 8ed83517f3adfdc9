"""The training loop on accelerate (DDPO; Black et al. 2024, Alg. 1 with the PPO update of Sec. 4.2).

Per epoch: sample trajectories with log-probs -> rewards (a worker thread overlaps batch k's
reward with batch k+1's sampling) -> gather across processes -> per-prompt advantages -> PPO
updates over shuffled samples and per-sample shuffled timesteps -> metrics, sample grid,
checkpoint. The sections below read top to bottom in that order.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from diffrl import human, rewards
from diffrl.algorithms import b2diffurl, d3po, ddpo
from diffrl.algorithms.ddpo import ppo_loss
from diffrl.checkpoints import load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint
from diffrl.config import Config, SampleConfig, dump_yaml, to_dict
from diffrl.errors import AwaitingLabels, ConfigError, NumericalError, RewardError, RunStopped
from diffrl.files import (
    append_jsonl,
    atomic_write_bytes,
    image_grid,
    line_chart,
    read_jsonl,
    save_png,
    truncate_metrics,
)
from diffrl.pipelines import inspect_pipeline, load_pipeline
from diffrl.prompts import load_prompts
from diffrl.report import write_report
from diffrl.rollout import Transition, concat_trajectories, sample_branches
from diffrl.stat_tracking import PerPromptStatTracker
from diffrl.types import Trajectory

# ============================================================================ setup


def check_environment(config: Config, device: torch.device) -> None:
    """Errors about this machine's abilities that the config implies, before any model loads."""
    if config.model.attention == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError(
                "model.attention=xformers: xformers is not installed (pip install 'diffrl[gpu]'), or use sdpa"
            )
        if device.type != "cuda":
            raise ConfigError(
                f"model.attention=xformers: xformers needs a CUDA device; this run is on {device}"
            )
    tracker_pkg = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(config.run.log_with)
    if tracker_pkg and importlib.util.find_spec(tracker_pkg) is None:
        raise ConfigError(f"run.log_with={config.run.log_with}: the {tracker_pkg} package is not installed")
    if config.model.mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError("model.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")


def preflight(config: Config, device: torch.device):
    """Every check that needs no model weights, in the order a user would fix them: this machine,
    the resume target, the model (found? resolution a multiple of its VAE factor?), the prompts,
    the reward(s). Returns ``(prompt source, reward function, D3PO's extra ``(name, reward)`` pairs)``."""
    check_environment(config, device)
    if config.run.resume_from:
        resolve_resume(config.run.resume_from)
    info = inspect_pipeline(config.model.pretrained, revision=config.model.revision)
    if info.is_lcm != (config.algorithm == "rlcm"):
        raise ConfigError(
            f"algorithm={config.algorithm}: model.pretrained={config.model.pretrained} is "
            + (
                "a latent consistency model; train it with algorithm: rlcm"
                if info.is_lcm
                else "not a latent consistency model (no LCMScheduler); use algorithm: ddpo, or an LCM "
                "such as tiny-lcm or SimianLuo/LCM_Dreamshaper_v7"
            )
        )
    resolution = config.sample.resolution
    if resolution is not None and resolution % info.vae_scale_factor:
        raise ConfigError(
            f"sample.resolution: {resolution} is not a multiple of {info.vae_scale_factor}, the VAE "
            f"downsampling factor of {config.model.pretrained} (native resolution {info.resolution})"
        )
    source = load_prompts(config.prompts.source)
    reward_fn = rewards.get(config.reward.name, **config.reward.kwargs)
    extra = config.d3po.extra_rewards if config.algorithm == "d3po" else []
    return source, reward_fn, [(name, rewards.get(name)) for name in extra]


def set_attention(unet, backend: str, device: torch.device) -> None:
    """xformers when asked (or on auto when usable), else torch scaled-dot-product attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    usable = device.type == "cuda" and importlib.util.find_spec("xformers") is not None
    if backend == "xformers" or (backend == "auto" and usable):
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0())


def prepare_unet(pipe, config: Config, weight_dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Freeze what is not trained, attach LoRA (peft) or unfreeze the UNet; returns the trainable
    parameters, always float32 (master weights under mixed precision)."""
    m = config.model
    frozen = [pipe.vae, pipe.text_encoder] + ([pipe.unet] if m.use_lora else [])
    for module in frozen:
        module.requires_grad_(False)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)
    if m.use_lora:
        from peft import LoraConfig

        pipe.unet.add_adapter(
            LoraConfig(
                r=m.lora_rank,
                lora_alpha=m.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=list(m.lora_target_modules),
            )
        )
    else:
        pipe.unet.requires_grad_(True)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"model.lora_target_modules={m.lora_target_modules} matched no UNet module")
    for p in params:
        p.data = p.data.float()
    if m.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    return params


@dataclass
class Streams:
    """This process's random streams; their states go into every checkpoint."""

    prompts: torch.Generator
    sampling: torch.Generator
    shuffle: torch.Generator

    @classmethod
    def seeded(cls, seed: int, rank: int) -> Streams:
        return cls(*(torch.Generator().manual_seed(seed + 100_003 * rank + 7_919 * s) for s in range(3)))

    def state(self) -> dict:
        return {name: getattr(self, name).get_state() for name in ("prompts", "sampling", "shuffle")}

    def load(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).set_state(value)


# ============================================================================ sampling + rewards


def sample_batch(
    pipe, s: SampleConfig, prompts: list[str], generator: torch.Generator, branching: tuple[int, int] = (0, 1)
) -> Trajectory:
    """One batch of trajectories with the configured sampler (DDIM steps, eta, guidance, size);
    ``branching = (b, K)`` continues K branches from step b of each chain (B²-DiffuRL)."""
    return sample_branches(
        pipe,
        prompts,
        branch_step=branching[0],
        num_branches=branching[1],
        num_steps=s.num_steps,
        guidance_scale=s.guidance_scale,
        eta=s.eta,
        generator=generator,
        height=s.resolution,
        width=s.resolution,
        negative_prompt=s.negative_prompt,
    )


def branching(config: Config, epoch: int) -> tuple[int, int]:
    """(branch step b, branches K) of this epoch's rollouts: (0, 1) for DDPO; D3PO's groups of
    images that share x_T (0, group size); B²-DiffuRL's stage schedule b(s) = N − ℓ(s) with K
    branches (stage s = epoch s)."""
    if config.algorithm == "d3po":
        return 0, config.d3po.group_size
    if config.algorithm != "b2diffurl":
        return 0, 1
    b = config.b2diffurl
    return b2diffurl.branch_step(epoch, config.sample.num_steps, b), b.num_branches


def score_batch(reward_fn, traj: Trajectory, metadata: list[dict], config: Config, first: int, where: str):
    """Rewards ``[B]`` of one batch under ``reward.timeout`` / ``reward.on_error`` (NaN = dropped)."""
    return rewards.score(
        reward_fn,
        traj.images,
        traj.prompts,
        metadata,
        timeout=config.reward.timeout,
        on_error=config.reward.on_error,
        first_index=first,
        where=where,
    )


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
    pipe, config: Config, source, reward_fn, streams: Streams, accelerator, epoch: int, progress
):
    """Sample ``num_batches_per_epoch`` batches; each batch's reward runs in a worker thread while
    the next batch samples. Returns (trajectories, local rewards ``[N]`` with NaN for dropped
    samples, the N metadata dicts the reward filled in, seconds sampling, seconds waiting for rewards)."""
    s = config.sample
    where = f"epoch {epoch}" + (
        f", process {accelerator.process_index}" if accelerator.num_processes > 1 else ""
    )
    trajectories, futures, metadata, t0 = [], [], [], time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        for _ in tqdm(range(s.num_batches_per_epoch), desc="sampling", disable=not progress, leave=False):
            prompts = source.sample(s.batch_size, streams.prompts)
            with accelerator.autocast(), lora_merged(pipe.unet, s.merge_lora):
                traj = sample_batch(pipe, s, prompts, streams.sampling, branching(config, epoch))
            trajectories.append(traj)
            batch_metadata = [{} for _ in traj.prompts]
            futures.append(
                pool.submit(score_batch, reward_fn, traj, batch_metadata, config, len(metadata), where)
            )
            metadata += batch_metadata
        t1 = time.perf_counter()
        local_rewards = torch.cat([f.result() for f in futures])
    return trajectories, local_rewards, metadata, t1 - t0, time.perf_counter() - t1


def human_labels(config: Config) -> bool:
    """Whether the run is D3PO from human labels (rollouts saved, each epoch waits for labels)."""
    return config.algorithm == "d3po" and config.d3po.preferences == "human"


def human_rollouts(
    pipe,
    config: Config,
    source,
    reward_fn,
    streams: Streams,
    accelerator,
    epoch: int,
    progress,
    run_dir: Path,
):
    """D3PO with human preferences: this process's rollouts of ``epoch``, sampled and saved
    (:mod:`diffrl.human`) on the first visit and read back from disk on the next; raises
    :class:`AwaitingLabels` while any process's groups lack a label.

    Returns what :func:`sample_epoch` returns (one trajectory of all samples, parents = groups)
    and the labeled pairs.
    """
    folder = human.rollout_folder(run_dir, epoch, accelerator.process_index)
    t_sample = t_reward = 0.0
    if human.is_saved(folder):
        traj, local_rewards, metadata = human.load_rollouts(folder)
    else:
        trajectories, local_rewards, metadata, t_sample, t_reward = sample_epoch(
            pipe, config, source, reward_fn, streams, accelerator, epoch, progress
        )
        traj = concat_trajectories(trajectories)
        human.save_rollouts(folder, traj, local_rewards, metadata)
    counts = torch.tensor(
        [len(human.unlabeled(folder)), len(human.read_index(folder)["groups"])], device=accelerator.device
    )
    missing, total = accelerator.reduce(counts, "sum").tolist()
    if missing:
        raise AwaitingLabels(run_dir, epoch, missing, total)
    pairs = human.label_pairs(traj.parents, folder)
    return [traj], local_rewards, metadata, t_sample, t_reward, pairs


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


def fixed_sample_grid(pipe, config: Config, prompts: list[str], reward_fn, path: Path) -> None:
    """A grid of the first 16 of ``prompts`` sampled from a fixed seed, with rewards: written
    before training (``samples/before.png``), after the middle epoch (``samples/middle.png``) and
    after training (``samples/after.png``); ``report.html`` shows them side by side."""
    prompts = [prompts[i % len(prompts)] for i in range(16)]
    traj = sample_batch(pipe, config.sample, prompts, torch.Generator().manual_seed(config.run.seed))
    values = score_batch(reward_fn, traj, [{} for _ in prompts], config, 0, f"sample grid {path.name}")
    captions = [f"{p}\nreward {v:.3f}" for p, v in zip(prompts, values.tolist())]
    save_png(image_grid(traj.images, captions), path)


def stack_epoch(trajectories) -> dict[str, torch.Tensor]:
    """Concatenate an epoch's trajectories into training tensors (N = all local samples)."""
    traj = concat_trajectories(trajectories)
    return {
        "latents": traj.latents,  # [N, T+1, C, h, w]
        "log_probs": traj.log_probs,  # [N, T]
        "prompt_embeds": traj.prompt_embeds,  # [N, L, D]
        "negative_prompt_embeds": traj.negative_prompt_embeds,  # [N, L, D] or None
        "timesteps": traj.timesteps,  # [T]
        "groups": traj.parents,  # [N] sibling group (shared trunk) of each sample
    }


def gathered_advantages(
    prompts, groups, local_rewards, reward_stats, config: Config, accelerator, epoch: int
):
    """Gather every process's rewards, prompts and sibling groups; compute advantages on the whole
    batch (identically on every process) from the samples whose reward was not dropped (NaN):
    DDPO's per-prompt statistics (``reward_stats`` a :class:`PerPromptStatTracker` or None), or
    B²-DiffuRL's history z-scores and sibling selection (``reward_stats`` a ``StageHistory``).

    Returns (this process's advantages ``[N]``, 0 where not trained; this process's mask of
    trained samples ``[N]`` bool; all rewards ``[P*N]``, NaN where dropped).
    """
    n = local_rewards.shape[0]
    all_rewards = accelerator.gather(local_rewards.to(accelerator.device)).cpu()
    all_groups = accelerator.gather((groups + accelerator.process_index * n).to(accelerator.device)).cpu()
    all_prompts = gather_object(list(prompts)) if accelerator.num_processes > 1 else list(prompts)
    finite = torch.isfinite(all_rewards)
    if not finite.any():
        raise RewardError(
            f"epoch {epoch}: the reward failed on every sample (all dropped); nothing to train on"
        )
    advantages, trained = torch.zeros_like(all_rewards), finite.clone()
    kept_prompts = [p for p, keep in zip(all_prompts, finite.tolist()) if keep]
    if config.algorithm == "b2diffurl":
        advantages[finite], trained[finite] = b2diffurl.compute_advantages(
            kept_prompts, all_rewards[finite], all_groups[finite], reward_stats, epoch, config.b2diffurl
        )
    else:
        advantages[finite] = ddpo.compute_advantages(kept_prompts, all_rewards[finite], reward_stats)
    start = accelerator.process_index * n
    return advantages[start : start + n], trained[start : start + n], all_rewards


def preference_scores(trajectories, local_rewards, extra_rewards, config: Config, epoch: int) -> torch.Tensor:
    """D3PO's AI feedback: ``[N, 1 + E]`` scores of this process's samples under ``reward.name``
    (already computed, NaN where dropped) and each of the ``d3po.extra_rewards`` ``(name, fn)``."""
    columns = [local_rewards]
    for name, fn in extra_rewards:
        values, first = [], 0
        for traj in trajectories:
            where = f"epoch {epoch}, extra reward {name}"
            values.append(score_batch(fn, traj, [{} for _ in traj.prompts], config, first, where))
            first += len(traj)
        columns.append(torch.cat(values))
    return torch.stack(columns, dim=1)


# ============================================================================ training


def step_log_prob(unet, pipe, data, idx: torch.Tensor, step: torch.Tensor, config: Config, accelerator):
    """log pi_theta of the stored actions: for samples ``idx [B]`` at their timestep indices
    ``step [B]``, the element-mean log-density of the next state given x_t under the current UNet
    (DDIM step, or the consistency step of an LCM); ``[B]`` float32 (carries gradient unless
    called under no_grad)."""
    s = config.sample
    negative = data["negative_prompt_embeds"] if config.train.cfg else None
    x_t, x_next, t = data["latents"][idx, step], data["latents"][idx, step + 1], data["timesteps"][step]
    transition = Transition(pipe, s.guidance_scale, s.eta)
    with accelerator.autocast():
        noise_pred = transition.noise_pred(
            x_t, t, data["prompt_embeds"][idx], None if negative is None else negative[idx], unet=unet
        )
    return transition.step(noise_pred, t, x_t, prev_sample=x_next).log_prob


def check_log_ratios(log_ratio: torch.Tensor, config: Config, accelerator, epoch: int) -> None:
    """Before an epoch's first update the policy is still the one that sampled, so re-scoring the
    first minibatch's stored actions must give ratio 1 up to float noise; otherwise PPO's clipping
    compares against the wrong old policy. ``log_ratio [B]`` is log πθ − the stored log-prob of that
    first term (the training forward itself: :class:`Learner` checks its first ``log_prob`` of an
    epoch, so the check costs no extra UNet call). Raises :class:`NumericalError` naming the likely
    cause when the mean |log ratio| over all processes' minibatches exceeds ``train.ratio_tolerance``.

    The mean, not the max: on GPUs the noise alone reaches a max of 1.5e-3 in fp32 (TF32
    convolutions, batch-size-dependent kernels) and 0.07 in bf16 at the smallest σ_t, with means
    of 2e-4 and 2e-3 (``scripts/ratio_check.py`` on an H200). A real mismatch is far above:
    re-scoring the shipped tiny model's 4-step chains at guidance 4 instead of 5 gives a mean of
    0.07, at eta 0.8 instead of 1 0.2."""
    tolerance = config.train.ratio_tolerance
    if tolerance == 0:
        return
    mean = accelerator.gather(log_ratio.detach().abs().mean().reshape(1).to(accelerator.device)).mean().item()
    if mean <= tolerance:
        return
    m = config.model
    cause = (
        f"model.mixed_precision={m.mixed_precision} runs the UNet in a low precision whose results depend on "
        f"the batch (sampling batches of {config.sample.batch_size} vs training minibatches of "
        f"{config.train.batch_size}); use mixed_precision=no or equal batch sizes"
        if m.mixed_precision != "no"
        else "the training step differs from the sampler (a changed scheduler, eta or guidance, non-finite "
        "weights, or non-deterministic UNet kernels)"
    )
    raise NumericalError(
        f"epoch {epoch}: re-scoring stored actions with the unchanged policy gives a mean |log ratio| of "
        f"{mean:.3g} > train.ratio_tolerance={tolerance:g} (PPO clips at train.clip_range="
        f"{config.train.clip_range:g}). Likely cause: {cause}. Raise train.ratio_tolerance to accept it."
    )


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps skipped for non-finite values; stops the run after ``limit`` in a row."""

    limit: int
    in_a_row: int = 0
    skipped: int = 0

    def record(self, fault: str | None, where: str) -> None:
        """Note one optimizer step: ``fault`` says what went non-finite (None: the step was taken)."""
        if fault is None:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        warnings.warn(f"skipped an optimizer step: {fault} ({where})", RuntimeWarning, stacklevel=2)
        if self.in_a_row >= self.limit:
            raise NumericalError(
                f"{self.in_a_row} optimizer steps in a row were skipped (train.max_nonfinite_steps={self.limit}); "
                f"the last: {fault} ({where}). Lower train.learning_rate, check the reward's scale, or use "
                "model.mixed_precision=no"
            )


def optimizer_step(optimizer, params, named_params, loss_fault: str | None, config: Config, accelerator):
    """Clip and step, unless the accumulated loss or gradients are non-finite on any process (then
    the gradients are dropped). Returns what was non-finite, or None when the step was taken.

    The total gradient norm (one multi-tensor operation) is finite exactly when every gradient is,
    so the tensors are searched for the culprit only when it is not. Under fp16 the grad scaler
    already skips overflowing steps (that is how it tunes its scale), so only a non-finite loss
    counts as a fault there."""
    scaled = accelerator.scaler is not None
    fault = loss_fault
    grads = [p.grad for p in params if p.grad is not None]
    if not scaled and grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
        bad = [
            n.removeprefix("module.")
            for n, p in named_params
            if p.grad is not None and not p.grad.isfinite().all()
        ]
        what = (
            f"non-finite gradients in {len(bad)} tensors, e.g. {bad[0]}" if bad else "gradient norm overflow"
        )
        fault = "; ".join(filter(None, [fault, what]))
    if accelerator.num_processes > 1:  # every process must take the same decision
        flags = accelerator.gather(torch.tensor([fault is not None], device=accelerator.device))
        if flags.any() and fault is None:
            fault = "non-finite values on another process"
    if fault is None or scaled:
        accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
        optimizer.step()
    optimizer.zero_grad()
    return fault


def training_samples(trained: torch.Tensor, per_step: int, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The local samples to train on, padded so that every process runs the same number of whole
    optimizer steps (DDP needs it): ``trained [N]`` bool -> (indices ``[M]``, mask ``[M]`` bool),
    M a multiple of ``per_step``; padding repeats a sample with mask False (no loss)."""
    kept = trained.nonzero().flatten()
    count = torch.tensor([kept.numel()], device=accelerator.device)
    most = int(accelerator.gather(count).max()) if accelerator.num_processes > 1 else kept.numel()
    size = max(1, -(-most // per_step)) * per_step
    pad = size - kept.numel()
    filler = kept[:1] if kept.numel() else torch.zeros(1, dtype=torch.long)
    index = torch.cat([kept, filler.repeat(pad)])
    mask = torch.cat([torch.ones(kept.numel(), dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
    return index, mask


@dataclass
class Learner:
    """The trainable policy and what updates it: the accelerate-wrapped UNet (``pipe.unet`` is the
    same weights unwrapped), the AdamW over ``params``, and the non-finite guard."""

    unet: torch.nn.Module
    pipe: object
    optimizer: torch.optim.Optimizer
    params: list
    accelerator: Accelerator
    guard: NonFiniteGuard
    config: Config
    loss_fault: str | None = None
    unchecked_epoch: int | None = None

    def __post_init__(self) -> None:
        self.named_params = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]

    def log_prob(self, data, idx: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """log πθ of stored actions ``[B]`` with gradient (:func:`step_log_prob`). The first call
        after :func:`update_epoch` set ``unchecked_epoch`` (before any update of the epoch) also
        checks the ratios to the stored log-probs (:func:`check_log_ratios`)."""
        log_prob = step_log_prob(self.unet, self.pipe, data, idx, step, self.config, self.accelerator)
        if self.unchecked_epoch is not None:
            epoch, self.unchecked_epoch = self.unchecked_epoch, None
            check_log_ratios(log_prob - data["log_probs"][idx, step], self.config, self.accelerator, epoch)
        return log_prob

    def update(self, compute_loss, where: str, term: str) -> dict[str, float]:
        """One accumulated loss term: ``compute_loss() -> (loss, {name: 0-dim stat})`` and its
        backward inside ``accelerator.accumulate``; at an accumulation boundary, the optimizer
        step (skipped when anything was non-finite, see :func:`optimizer_step`). ``where`` (the
        epoch) and ``term`` (the minibatch and step) name the place in warnings and errors."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.unet):
            loss, stats = compute_loss()
            accelerator.backward(loss)
            if not torch.isfinite(loss):
                self.loss_fault = f"loss {loss.item()} at {term}"
            if accelerator.sync_gradients:
                fault = optimizer_step(
                    self.optimizer, self.params, self.named_params, self.loss_fault, self.config, accelerator
                )
                self.guard.record(fault, where)
                self.loss_fault = None
        return {"loss": loss.item(), **{k: float(v) for k, v in stats.items()}}


def pass_rows(rows: torch.Tensor, cols: torch.Tensor, step_order: torch.Tensor):
    """One training pass: minibatch ``rows [B]`` at their trained steps number ``cols [k]`` (each row
    has its own step order ``step_order [N, S]``) -> (items ``[B·k]``, steps ``[B·k]``), step-major."""
    return rows.repeat(len(cols)), step_order[rows][:, cols].T.reshape(-1)


def update_epoch(
    learner: Learner,
    trained: torch.Tensor,
    num_steps: int,
    first_step: int,
    term,
    streams,
    epoch: int,
    progress,
) -> dict[str, float]:
    """The update phase shared by the algorithms: ``num_inner_epochs`` passes over the items with
    ``trained [M]`` True (samples for PPO, pairs for D3PO), shuffled, in minibatches of
    ``train.batch_size``; each item's steps ``first_step..num_steps-1`` in its own random order
    (``timestep_fraction`` of them), one accumulated term per (minibatch, pass):
    ``term(items [B·k], steps [B·k], valid [B·k]) -> (loss, stats)`` over k = ``timesteps_per_pass``
    of the item's trained steps at once (the rows are the minibatch repeated k times). A pass's loss
    is weighted by its share of the steps, so the accumulated gradient is that of one term per
    (minibatch, step) for any k. The epoch's first term checks the log ratios (:class:`Learner`).
    Returns the mean of every stat and ``skipped_steps``."""
    t, accelerator = learner.config.train, learner.accelerator
    index, valid = training_samples(trained, t.batch_size * t.gradient_accumulation_steps, accelerator)
    span = num_steps - first_step
    num_train_steps = int(span * t.timestep_fraction)
    passes = torch.arange(num_train_steps).split(t.timesteps_per_pass)
    accelerator.gradient_accumulation_steps = t.gradient_accumulation_steps * len(passes)
    accelerator.step = 0  # whole optimizer steps per epoch; the accumulation length may change between epochs
    learner.pipe.scheduler.set_timesteps(learner.config.sample.num_steps, device=accelerator.device)
    totals: dict[str, float] = {}
    terms, skipped_before = 0, learner.guard.skipped
    learner.unet.train()
    learner.unchecked_epoch = epoch

    def weighted(items, steps, ok, weight):
        loss, stats = term(items, steps, ok)
        return loss * weight, stats

    for inner in range(t.num_inner_epochs):
        order = torch.randperm(len(index), generator=streams.shuffle)
        step_order = first_step + torch.stack(
            [torch.randperm(span, generator=streams.shuffle) for _ in range(len(index))]
        )
        batches = order.split(t.batch_size)
        for b, rows in enumerate(tqdm(batches, desc="training", disable=not progress, leave=False)):
            for cols in passes:
                items, steps = pass_rows(rows, cols, step_order)
                stats = learner.update(
                    partial(
                        weighted,
                        index[items],
                        steps,
                        valid[items],
                        len(cols) * len(passes) / num_train_steps,
                    ),
                    f"epoch {epoch}, inner epoch {inner}",
                    f"minibatch {b}, trained timestep {int(cols[0])}"
                    + (f"..{int(cols[-1])}" if len(cols) > 1 else ""),
                )
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                terms += 1
    learner.unet.eval()
    return {
        **{k: v / terms for k, v in totals.items()},
        "skipped_steps": learner.guard.skipped - skipped_before,
    }


def train_epoch(
    learner: Learner, data, advantages, trained, streams, epoch: int, progress
) -> dict[str, float]:
    """DDPO's PPO updates (also B²-DiffuRL's and RLCM's) over one epoch's samples with ``trained [N]``
    True (others were dropped or not selected), at the steps from the epoch's branch point on."""
    t, config = learner.config.train, learner.config

    def term(idx, step, valid):
        log_prob = learner.log_prob(data, idx, step)
        loss, stats = ppo_loss(
            log_prob, data["log_probs"][idx, step], advantages[idx], t.clip_range, t.adv_clip_max, valid
        )
        return loss, {"approx_kl": stats.approx_kl, "clipfrac": stats.clipfrac}

    num_steps = data["log_probs"].shape[1]
    first_step = branching(config, epoch)[0]
    return update_epoch(learner, trained, num_steps, first_step, term, streams, epoch, progress)


def train_d3po_epoch(
    learner: Learner, data, pairs: d3po.Pairs, streams, epoch: int, progress
) -> dict[str, float]:
    """D3PO's updates over one epoch's decided pairs (ties have zero gradient and are skipped):
    per (minibatch of pairs, step) both members' log πθ − log π_ref at the same step index
    (the pair's own shuffled order), the per-step loss of :func:`diffrl.algorithms.d3po.d3po_loss`."""
    config, d = learner.config, learner.config.d3po

    def reference(idx, step):
        if d.reference == "sampler":  # the policy that sampled this epoch: its stored log-probs
            return data["log_probs"][idx, step]
        with torch.no_grad(), adapters_disabled(learner.pipe.unet):
            return step_log_prob(
                learner.pipe.unet, learner.pipe, data, idx, step, config, learner.accelerator
            )

    def term(rows, step, valid):
        members, steps = torch.cat([pairs.first[rows], pairs.second[rows]]), torch.cat([step, step])
        log_ratio = learner.log_prob(data, members, steps) - reference(members, steps)
        log_ratio = log_ratio.view(2, -1).T  # [B, 2]: (a, b) of each pair
        loss, logits = d3po.d3po_loss(log_ratio, pairs.h[rows], d.beta, d.clamp, valid)
        weight = valid.float() / valid.sum().clamp(min=1)
        outside = (log_ratio.detach().exp() - 1).abs() > (d.clamp if d.clamp is not None else float("inf"))
        return loss, {
            "accuracy": ((logits > 0).float() * weight).sum(),
            "approx_kl": (0.5 * log_ratio.detach().pow(2).mean(1) * weight).sum(),
            "clipfrac": (outside.float().mean(1) * weight).sum(),
        }

    return update_epoch(learner, pairs.decided, data["log_probs"].shape[1], 0, term, streams, epoch, progress)


@contextmanager
def adapters_disabled(unet):
    """The UNet without its LoRA adapters inside the block: the frozen pretrained model."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


# ============================================================================ outputs


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace folder ``final`` by the complete folder ``tmp`` (``final.old`` holds the previous
    one for the moment between the two renames; a crash there leaves both findable)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def export_weights(pipe, config: Config, run_dir: Path) -> None:
    """Write the trained weights for use outside diffrl, replacing the previous export only once
    the new one is complete: ``run_dir/lora`` in diffusers format
    (``pipe.load_lora_weights(run_dir / "lora")``), or ``run_dir/unet`` after full fine-tuning."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    name = "lora" if config.model.use_lora else "unet"
    tmp = run_dir / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if config.model.use_lora:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers={k: v.float() for k, v in layers.items()},
            safe_serialization=True,
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        )
    else:
        unet.save_pretrained(tmp)
    _swap_in(tmp, run_dir / name)


def write_epoch_outputs(
    run_dir: Path, epoch: int, record: dict, first: Trajectory, first_rewards: torch.Tensor
) -> None:
    """metrics.jsonl line, the epoch's sample grid and the reward curve (main process)."""
    append_jsonl(run_dir / "metrics.jsonl", record)
    count = min(16, len(first.prompts))
    captions = [f"{p}\nreward {r:.3f}" for p, r in zip(first.prompts[:count], first_rewards[:count].tolist())]
    save_png(image_grid(first.images[:count], captions), run_dir / "samples" / f"epoch_{epoch:04d}.png")
    curve = [r["reward_mean"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    save_png(line_chart(curve, "mean reward per epoch"), run_dir / "reward_curve.png")


# ============================================================================ the loop


def make_optimizer(params: list, config: Config) -> torch.optim.AdamW:
    """AdamW over ``params`` with ``train``'s settings, updating all tensors in one multi-tensor
    call (``foreach``; torch's default only on CUDA): a LoRA has a hundred small tensors."""
    t = config.train
    return torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
        foreach=True,
    )


def build_policy(config: Config, accelerator: Accelerator):
    """Load the pipeline, attach what is trained, build AdamW and let accelerate wrap the UNet
    (LoRA lives inside the DDP module, so its gradients are all-reduced).

    Returns ``(pipe, unet, params, optimizer)``; ``unet`` is the wrapped training module and
    ``pipe.unet`` the same weights, unwrapped, for sampling and saving.
    """
    m = config.model
    set_seed(config.run.seed)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[m.mixed_precision]
    pipe = load_pipeline(m.pretrained, revision=m.revision, device=accelerator.device)
    set_attention(pipe.unet, m.attention, accelerator.device)
    params = prepare_unet(pipe, config, weight_dtype)
    if m.compile:  # in place: pipe.unet stays the same module (LoRA saving, merging, adapters)
        pipe.unet.compile()
    unet, optimizer = accelerator.prepare(pipe.unet, make_optimizer(params, config))
    return pipe, unet, params, optimizer


def reward_statistics(config: Config):
    """The state advantages are computed with, saved in every checkpoint: DDPO's per-prompt
    tracker (None with stat_tracking disabled) or B²-DiffuRL's per-prompt stage history."""
    if config.algorithm == "b2diffurl":
        return b2diffurl.StageHistory(config.b2diffurl.history_stages)
    st = config.stat_tracking
    return PerPromptStatTracker(st.buffer_size, st.min_count) if st.enabled else None


def open_run(
    config: Config, accelerator: Accelerator, pipe, optimizer, reward_stats, streams
) -> tuple[Path, int]:
    """Create (or, resuming, restore) the run folder; returns ``(run_dir, first epoch to run)``.

    Resuming restores weights, optimizer, RNG streams and reward statistics from the checkpoint (or,
    stopped before the first one, starts over) and drops metrics of epochs after it, so none are
    duplicated.
    """
    run_dir, start_epoch = Path(config.run.output_dir) / config.run.name, 0
    if config.run.resume_from:
        run_dir, checkpoint = resolve_resume(config.run.resume_from)
        if checkpoint is not None:
            state, rng = load_checkpoint(checkpoint, pipe.unet, optimizer, accelerator.process_index)
            streams.load(rng)
            if reward_stats is not None and state.get("tracker"):
                reward_stats.load_state_dict(state["tracker"])
            start_epoch = state["epoch"] + 1
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", dump_yaml(config).encode())
        if config.run.resume_from:
            truncate_metrics(run_dir / "metrics.jsonl", start_epoch - 1)
    if config.run.log_with != "none":
        accelerator.init_trackers(config.run.name, config=_flat(to_dict(config)))
    accelerator.wait_for_everyone()
    return run_dir, start_epoch


def save_epoch(
    run_dir: Path, epoch: int, config: Config, pipe, optimizer, reward_stats, streams, accelerator
) -> None:
    """Checkpoint after ``epoch`` (every process takes part), prune old ones, export the weights."""
    save_checkpoint(
        run_dir,
        epoch,
        pipe.unet,
        optimizer,
        streams.state(),
        {"tracker": reward_stats.state_dict() if reward_stats is not None else None},
        accelerator.process_index,
        accelerator.is_main_process,
        accelerator.wait_for_everyone,
    )
    if accelerator.is_main_process:
        prune_checkpoints(run_dir, config.run.keep_last)
        export_weights(pipe, config, run_dir)


def finish_epoch(
    run_dir: Path, epoch: int, config: Config, pipe, optimizer, reward_stats, streams, accelerator, stop
) -> None:
    """Checkpoint when ``run.save_freq`` says so, after the last epoch, when a stop signal came, or
    after every epoch of D3PO with human labels (a run waits for labels at each epoch); after a signal, end the run with :class:`RunStopped` once that checkpoint is complete."""
    signum = stop.requested(accelerator)
    if accelerator.is_main_process:
        write_report(run_dir)
    if (
        signum
        or human_labels(config)  # the next epoch's rollouts wait for labels: resume from this policy
        or (epoch + 1) % config.run.save_freq == 0
        or epoch == config.run.num_epochs - 1
    ):
        save_epoch(run_dir, epoch, config, pipe, optimizer, reward_stats, streams, accelerator)
    accelerator.wait_for_everyone()
    if signum:
        accelerator.end_training()
        raise RunStopped(signum, run_dir, epoch)


class StopSignals:
    """Within ``with``: the first SIGINT/SIGTERM asks the run to stop at the end of the current
    epoch with a checkpoint; a second one acts at once as it would have (the newest complete
    checkpoint is kept either way). Handlers are installed only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self.received, self.previous = 0, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.received:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum
        print(
            f"diffrl: {signal.Signals(signum).name} received; stopping after this epoch with a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def requested(self, accelerator) -> int:
        """The signal any process received (0: none); every process gets the same answer."""
        received = torch.tensor([self.received], device=accelerator.device)
        return (
            int(accelerator.gather(received).max().item()) if accelerator.num_processes > 1 else self.received
        )


def set_deterministic(enabled: bool) -> bool:
    """``torch.use_deterministic_algorithms(enabled)`` (with the cuBLAS workspace it needs on CUDA);
    returns the previous setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    return previous


def train(config: Config):
    """Run DDPO (or B²-DiffuRL, RLCM, D3PO; Diffusion-DPO and SePPO in :mod:`diffrl.offline`) as configured; returns the pipeline holding the trained weights (on every process).

    Raises :class:`RunStopped` after a SIGINT/SIGTERM, once the current epoch is checkpointed.
    """
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # multi-process CPU runs (gloo) need this to be detected
        mixed_precision=config.model.mixed_precision,
        log_with=None if config.run.log_with == "none" else config.run.log_with,
        project_dir=config.run.output_dir,
    )
    source, reward_fn, extra_rewards = preflight(config, accelerator.device)
    was_deterministic = set_deterministic(config.run.deterministic)
    try:
        with StopSignals() as stop:
            if config.algorithm in ("dpo", "seppo"):
                from diffrl.offline import train_offline  # it builds on this module

                return train_offline(config, accelerator, reward_fn, stop)
            return _train_loop(config, accelerator, source, reward_fn, extra_rewards, stop)
    finally:
        set_deterministic(was_deterministic)


def _train_loop(config: Config, accelerator, source, reward_fn, extra_rewards, stop: StopSignals):
    """The epochs of :func:`train`, after its checks."""
    progress = accelerator.is_local_main_process and sys.stderr.isatty()
    reward_stats = reward_statistics(config)
    streams = Streams.seeded(config.run.seed, accelerator.process_index)
    pipe, unet, params, optimizer = build_policy(config, accelerator)
    learner = Learner(
        unet, pipe, optimizer, params, accelerator, NonFiniteGuard(config.train.max_nonfinite_steps), config
    )
    run_dir, start_epoch = open_run(config, accelerator, pipe, optimizer, reward_stats, streams)
    if start_epoch == 0 and accelerator.is_main_process:
        fixed_sample_grid(pipe, config, source.prompts, reward_fn, run_dir / "samples" / "before.png")
    if start_epoch >= config.run.num_epochs and accelerator.is_main_process:
        export_weights(pipe, config, run_dir)  # a run killed after its last checkpoint, before the export

    for epoch in range(start_epoch, config.run.num_epochs):
        # sampling and rewards
        pipe.unet.eval()
        if human_labels(config):
            trajectories, local_rewards, metadata, t_sample, t_reward, pairs = human_rollouts(
                pipe, config, source, reward_fn, streams, accelerator, epoch, progress, run_dir
            )
        else:
            trajectories, local_rewards, metadata, t_sample, t_reward = sample_epoch(
                pipe, config, source, reward_fn, streams, accelerator, epoch, progress
            )
        prompts = [p for traj in trajectories for p in traj.prompts]
        data = stack_epoch(trajectories)

        # training
        t0 = time.perf_counter()
        if config.algorithm == "d3po":
            if not human_labels(config):
                scores = preference_scores(trajectories, local_rewards, extra_rewards, config, epoch)
                pairs = d3po.preferences(scores, data["groups"])
            all_rewards, trained = (
                accelerator.gather(local_rewards.to(accelerator.device)).cpu(),
                pairs.decided,
            )
            stats = train_d3po_epoch(learner, data, pairs, streams, epoch, progress)
        else:
            advantages, trained, all_rewards = gathered_advantages(
                prompts, data["groups"], local_rewards, reward_stats, config, accelerator, epoch
            )
            stats = train_epoch(learner, data, advantages, trained, streams, epoch, progress)
        kept = all_rewards[torch.isfinite(all_rewards)]
        record = {
            "epoch": epoch,
            "reward_mean": kept.mean().item(),
            "reward_std": kept.std(unbiased=False).item(),
            "num_samples": kept.numel(),
            "num_dropped": all_rewards.numel() - kept.numel(),
            "num_trained": int(accelerator.reduce(trained.sum().to(accelerator.device), "sum")),
            "branch_step": branching(config, epoch)[0],
            **(
                {
                    "num_pairs": int(
                        accelerator.reduce(torch.tensor(len(pairs), device=accelerator.device), "sum")
                    )
                }
                if config.algorithm == "d3po"
                else {}
            ),
            **metadata_means(metadata, torch.isfinite(local_rewards), accelerator),
            **{
                k: accelerator.reduce(torch.tensor(float(v), device=accelerator.device), "mean").item()
                for k, v in stats.items()
            },
            "learning_rate": optimizer.param_groups[0]["lr"],
            "time_sampling": t_sample,
            "time_reward": t_reward,
            "time_training": time.perf_counter() - t0,
        }
        accelerator.log(record, step=epoch)
        accelerator.print(
            f"epoch {epoch}: reward {record['reward_mean']:.4f} ± {record['reward_std']:.4f}, "
            f"approx_kl {record['approx_kl']:.2e}, clipfrac {record['clipfrac']:.3f}, "
            f"{record['time_sampling'] + record['time_training']:.1f}s"
        )

        # outputs and checkpoint
        if accelerator.is_main_process:
            write_epoch_outputs(run_dir, epoch, record, trajectories[0], local_rewards)
            if epoch == config.run.num_epochs // 2:
                fixed_sample_grid(pipe, config, source.prompts, reward_fn, run_dir / "samples" / "middle.png")
        finish_epoch(run_dir, epoch, config, pipe, optimizer, reward_stats, streams, accelerator, stop)
    if accelerator.is_main_process:
        fixed_sample_grid(pipe, config, source.prompts, reward_fn, run_dir / "samples" / "after.png")
        write_report(run_dir)
    accelerator.end_training()
    return pipe


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"section.key": scalar}`` for trackers."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
