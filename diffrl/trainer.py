"""The online training loop on accelerate (the shape of Black et al. 2024's Alg. 1), for every
algorithm behind :mod:`diffrl.algorithms`' interface.

Per epoch: the algorithm's plan -> SAMPLING: trajectories with log-probs, rewards in a worker
thread -> the algorithm's ``prepare`` over the gathered rewards (advantages, pairs, the trained
mask) -> TRAINING: the learner's update with the algorithm's loss -> the epoch's record, outputs
and checkpoint. Nothing here knows which algorithm runs.
"""

from __future__ import annotations

import importlib.util
import time
from functools import partial

import torch
from accelerate import Accelerator

from diffrl import algorithms, rewards, runfolder
from diffrl.algorithms import Context
from diffrl.checkpoints import resolve_resume
from diffrl.collect import metadata_means, sample_epoch
from diffrl.errors import ConfigError
from diffrl.learner import build_learner, process_mean
from diffrl.monitor import start_monitor, watch
from diffrl.pipelines import inspect_pipeline
from diffrl.progress import EpochClock
from diffrl.prompts import configured_prompts
from diffrl.run import Run, StopSignals, Streams, evaluation_rewards, set_deterministic


def check_environment(config, device: torch.device) -> None:
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


def preflight(config, algorithm, device: torch.device):
    """Every check that needs no model weights, in the order a user would fix them: this machine,
    the run folder (a new run's folder holds no other run; a resume changes only what it may),
    the model (found? the sampler family the algorithm trains? resolution a
    multiple of its VAE factor?), the prompts, the reward and the evaluation rewards, the
    algorithm's own state. Returns ``(prompt source, reward function, algorithm state,
    evaluation)``, evaluation = :func:`~diffrl.run.evaluation_rewards`."""
    check_environment(config, device)
    if config.run.resume_from:
        run_dir, _ = resolve_resume(config.run.resume_from, report=True)
        runfolder.check_resume(config, run_dir)
    else:
        runfolder.check_new_run(config)
    info = inspect_pipeline(config.model.pretrained, revision=config.model.revision)
    family = info.family
    if family not in algorithm.models and not (algorithm.offline and family != "flow"):
        fits = ", ".join(algorithms.trained_on(family)) or "none yet"
        raise ConfigError(
            f"algorithm={config.algorithm}: model.pretrained={config.model.pretrained} is "
            + {
                "lcm": f"a latent consistency model; train it with algorithm: {fits}",
                "ddim": f"not a latent consistency model (no LCMScheduler); use algorithm: {fits}, or an LCM "
                "such as tiny-lcm or SimianLuo/LCM_Dreamshaper_v7",
                "flow": f"a flow-matching model (SD3, FLUX); train it with algorithm: {fits}",
            }[family]
        )
    if family == "flow" and config.model.attention == "xformers":
        raise ConfigError(
            "model.attention=xformers: flow transformers (SD3, FLUX) run their joint attention with torch "
            "scaled-dot-product attention; use model.attention: auto"
        )
    resolution = config.sample.resolution
    if resolution is not None and resolution % info.vae_scale_factor:
        raise ConfigError(
            f"sample.resolution: {resolution} is not a multiple of {info.vae_scale_factor}, the VAE "
            f"downsampling factor of {config.model.pretrained} (native resolution {info.resolution})"
        )
    source = configured_prompts(config.prompts)
    reward_fn = rewards.get(config.reward.name, **config.reward.kwargs)
    side = resolution or info.resolution
    if side < reward_fn.min_size:
        raise ConfigError(
            f"sample.resolution: {side}-pixel images are smaller than the {reward_fn.min_size} pixels "
            f"reward {config.reward.name} needs"
        )
    evaluation = evaluation_rewards(config, source.prompts)
    if not algorithm.offline:
        check_memory(config, info, side)
    return source, reward_fn, algorithm.setup(config), evaluation


def epoch_bytes(config, info, side: int) -> int:
    """Bytes one process's epoch of trajectories holds (float32 latents of every step and the
    decoded images): N (T + 1) C (side / f)^2 + N 3 side^2 floats, N = samples per process."""
    s = config.sample
    samples = s.batch_size * s.num_batches_per_epoch
    latent = info.latent_channels * (side // info.vae_scale_factor) ** 2
    return 4 * samples * ((s.num_steps + 1) * latent + 3 * side * side)


def available_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(config, info, side: int) -> None:
    """Refuse an epoch whose stored trajectories alone would not fit the free memory."""
    need, free = epoch_bytes(config, info, side), available_memory()
    if free is not None and need > free:
        s = config.sample
        raise ConfigError(
            f"sample.batch_size: an epoch of {s.batch_size} x {s.num_batches_per_epoch} trajectories of "
            f"{s.num_steps} steps at {side} pixels stores {need / 2**30:.1f} GiB, more than the "
            f"{free / 2**30:.1f} GiB free here; lower sample.batch_size, sample.num_batches_per_epoch or "
            "sample.num_steps"
        )


def train(config):
    """Train as configured (the online loop below, or :mod:`diffrl.offline` for an offline
    algorithm); returns the pipeline holding the trained weights (on every process).

    Raises :class:`~diffrl.errors.RunStopped` after a SIGINT/SIGTERM, once the epoch is checkpointed.
    """
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # multi-process CPU runs (gloo) need this to be detected
        mixed_precision=config.model.mixed_precision,
        log_with=None if config.run.log_with == "none" else config.run.log_with,
        project_dir=config.run.output_dir,
    )
    algorithm = algorithms.get(config.algorithm)
    source, reward_fn, state, evaluation = preflight(config, algorithm, accelerator.device)
    accelerator.wait_for_everyone()  # every process checked the run folder before the main one writes it
    was_deterministic = set_deterministic(config.run.deterministic)
    try:
        with StopSignals() as stop:
            if algorithm.offline:
                from diffrl.offline import train_offline

                return train_offline(config, algorithm, accelerator, reward_fn, state, evaluation, stop)
            return train_online(config, algorithm, accelerator, source, reward_fn, state, evaluation, stop)
    finally:
        set_deterministic(was_deterministic)


def train_online(config, algorithm, accelerator, source, reward_fn, state, evaluation, stop: StopSignals):
    """The epochs of an online algorithm, after :func:`train`'s checks."""
    streams = Streams.seeded(config.run.seed, accelerator.process_index)
    accelerator.print(f"diffrl: loading {config.model.pretrained}", flush=True)
    learner = build_learner(config, accelerator)
    pipe = learner.pipe
    run = Run(config, learner, state, streams, reward_fn, source.prompts, evaluation)
    ctx = Context(config, accelerator, run.dir, state, learner)
    rank = f", process {accelerator.process_index}" if accelerator.num_processes > 1 else ""
    clock = EpochClock(config.run.num_epochs)
    monitor = start_monitor(config, run)

    for epoch in run.epochs:
        plan = algorithm.plan(config, epoch)
        evaluated = run.evaluate(epoch, after_training=False)

        # SAMPLING: rollouts on the current policy, rewards overlapped with the next batch
        learner.unet.eval()
        sample = partial(
            sample_epoch, pipe, config, source, reward_fn, streams, accelerator, plan,
            merge=learner.merge_sampling, where=f"epoch {epoch}{rank}", label=clock.label(epoch),
        )  # fmt: skip
        rollouts = algorithm.collect(ctx, epoch, sample)

        # TRAINING: the algorithm's advantages or pairs, then its loss over the trained steps
        t0 = time.perf_counter()
        batch = algorithm.prepare(ctx, rollouts, epoch)
        if algorithm.train is not None:
            stats = algorithm.train(ctx, batch, rollouts.traj, streams, epoch, clock.label(epoch))
        else:
            stats = learner.train_epoch(
                algorithm.loss, batch, rollouts.traj, streams, epoch, clock.label(epoch)
            )

        # the epoch's record, outputs and checkpoint
        kept = batch.rewards[torch.isfinite(batch.rewards)].double()  # float64: no overflow in the sums
        record = {
            "epoch": epoch,
            "reward_mean": kept.mean().item(),
            "reward_std": kept.std(unbiased=False).item(),
            "num_samples": kept.numel(),
            "num_dropped": batch.rewards.numel() - kept.numel(),
            "num_trained": int(accelerator.reduce(batch.trained.sum().to(accelerator.device), "sum")),
            "branch_step": plan.branch_step,
            **({"window_start": plan.window[0]} if plan.window else {}),
            **batch.metrics,
            **metadata_means(rollouts.metadata, torch.isfinite(rollouts.rewards), accelerator),
            **process_mean(stats, accelerator),
            "learning_rate": learner.optimizer.param_groups[0]["lr"],
            "time_sampling": rollouts.time_sampling,
            "time_reward": rollouts.time_reward,
            "time_training": time.perf_counter() - t0,
        }
        record.update(evaluated)
        record.update(run.evaluate(epoch, after_training=True))  # the last epoch's final weights
        flagged = watch(monitor, record, rollouts.traj, accelerator, clock.label(epoch))
        accelerator.print(
            f"{clock.label(epoch)}: reward {record['reward_mean']:.4f} ± {record['reward_std']:.4f}, "
            + "".join(f"{k} {record[k]:.3g}, " for k in ("approx_kl", "clipfrac", "accuracy") if k in record)
            + f"{record['time_sampling'] + record['time_training']:.1f}s, {clock.lap(epoch)}",
            flush=True,
        )
        run.log_epoch(epoch, record, rollouts.traj, rollouts.rewards)
        halt = flagged and config.monitor.stop
        run.end_epoch(epoch, stop, checkpoint=plan.checkpoint or halt)
        if halt:
            accelerator.print(
                f"{clock.label(epoch)}: monitor.stop: ending the run at the flagged epoch", flush=True
            )
            break
    return run.finish()
