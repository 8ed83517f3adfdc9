"""The training loop on accelerate (DDPO; Black et al. 2024, Alg. 1 with the PPO update of Sec. 4.2).

Per epoch: sample trajectories with log-probs -> rewards (a worker thread overlaps batch k's
reward with batch k+1's sampling) -> gather across processes -> per-prompt advantages -> PPO
updates over shuffled samples and per-sample shuffled timesteps -> metrics, sample grid,
checkpoint. The sections below read top to bottom in that order.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from diffrl import rewards
from diffrl.algorithms.ddpo import compute_advantages, ppo_loss
from diffrl.checkpoints import load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint
from diffrl.config import Config, ConfigError, SampleConfig, dump_yaml, to_dict
from diffrl.files import (
    append_jsonl,
    atomic_write_bytes,
    image_grid,
    line_chart,
    read_jsonl,
    save_png,
    truncate_metrics,
)
from diffrl.pipelines import load_pipeline
from diffrl.policies.ddim import ddim_step_with_logprob
from diffrl.prompts import load_prompts
from diffrl.rollout import guided_noise_pred, sample_trajectories
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


def sample_batch(pipe, s: SampleConfig, prompts: list[str], generator: torch.Generator) -> Trajectory:
    """One batch of trajectories with the configured sampler (DDIM steps, eta, guidance, size)."""
    return sample_trajectories(
        pipe,
        prompts,
        num_steps=s.num_steps,
        guidance_scale=s.guidance_scale,
        eta=s.eta,
        generator=generator,
        height=s.resolution,
        width=s.resolution,
        negative_prompt=s.negative_prompt,
    )


def sample_epoch(pipe, config: Config, source, reward_fn, streams: Streams, accelerator, progress: bool):
    """Sample ``num_batches_per_epoch`` batches; each batch's reward runs in a worker thread while
    the next batch samples. Returns (trajectories, local rewards ``[N]``, the N metadata dicts the
    reward filled in, seconds sampling, seconds waiting for rewards)."""
    s = config.sample
    trajectories, futures, metadata, t0 = [], [], [], time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        for _ in tqdm(range(s.num_batches_per_epoch), desc="sampling", disable=not progress, leave=False):
            prompts = source.sample(s.batch_size, streams.prompts)
            with accelerator.autocast():
                traj = sample_batch(pipe, s, prompts, streams.sampling)
            trajectories.append(traj)
            batch_metadata = [{} for _ in prompts]
            metadata += batch_metadata
            futures.append(pool.submit(reward_fn, traj.images, traj.prompts, batch_metadata))
        t1 = time.perf_counter()
        local_rewards = torch.cat([f.result() for f in futures])
    return trajectories, local_rewards, metadata, t1 - t0, time.perf_counter() - t1


def metadata_means(metadata: list[dict], accelerator) -> dict[str, float]:
    """Mean over all processes' samples of every numeric value rewards wrote into the metadata
    (e.g. ``exact_match`` of ``shapes_alignment``), as ``{"reward_<key>": mean}``."""
    if accelerator.num_processes > 1:
        metadata = gather_object(metadata)
    values: dict[str, list[float]] = {}
    for meta in metadata:
        for key, value in meta.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key, []).append(float(value))
    return {f"reward_{k}": sum(v) / len(v) for k, v in values.items()}


def fixed_sample_grid(pipe, config: Config, source, reward_fn, path: Path) -> None:
    """A grid of the first 16 prompts of the source sampled from a fixed seed, with rewards:
    written before training (``samples/before.png``) and after it (``samples/after.png``)."""
    prompts = [source.prompts[i % len(source.prompts)] for i in range(16)]
    traj = sample_batch(pipe, config.sample, prompts, torch.Generator().manual_seed(config.run.seed))
    values = reward_fn(traj.images, prompts, [{} for _ in prompts])
    captions = [f"{p}\nreward {v:.3f}" for p, v in zip(prompts, values.tolist())]
    save_png(image_grid(traj.images, captions), path)


def stack_epoch(trajectories) -> dict[str, torch.Tensor]:
    """Concatenate an epoch's trajectories into training tensors (N = all local samples)."""
    neg = [t.negative_prompt_embeds for t in trajectories]
    return {
        "latents": torch.cat([t.latents for t in trajectories]),  # [N, T+1, C, h, w]
        "log_probs": torch.cat([t.log_probs for t in trajectories]),  # [N, T]
        "prompt_embeds": torch.cat([t.prompt_embeds for t in trajectories]),  # [N, L, D]
        "negative_prompt_embeds": None if neg[0] is None else torch.cat(neg),  # [N, L, D]
        "timesteps": trajectories[0].timesteps,  # [T]
    }


def gathered_advantages(prompts, local_rewards, tracker, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather every process's rewards and prompts, compute advantages on the whole batch (identically
    on every process), return (this process's slice ``[N]``, all rewards ``[P*N]``)."""
    all_rewards = accelerator.gather(local_rewards.to(accelerator.device)).cpu()
    all_prompts = gather_object(list(prompts)) if accelerator.num_processes > 1 else list(prompts)
    advantages = compute_advantages(all_prompts, all_rewards, tracker)
    n = local_rewards.shape[0]
    start = accelerator.process_index * n
    return advantages[start : start + n], all_rewards


# ============================================================================ training


def train_epoch(
    unet, pipe, data, advantages, config: Config, optimizer, params, streams, accelerator, progress
):
    """PPO updates over one epoch's samples (``num_inner_epochs`` passes). Returns mean stats."""
    t, s = config.train, config.sample
    latents, old_log_probs, timesteps = data["latents"], data["log_probs"], data["timesteps"]
    num_samples, num_steps = old_log_probs.shape
    num_train_steps = int(num_steps * t.timestep_fraction)
    negative = data["negative_prompt_embeds"] if t.cfg else None
    pipe.scheduler.set_timesteps(s.num_steps, device=latents.device)
    totals = {"loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0}
    terms = 0
    unet.train()
    for _ in range(t.num_inner_epochs):
        order = torch.randperm(num_samples, generator=streams.shuffle)
        step_order = torch.stack(
            [torch.randperm(num_steps, generator=streams.shuffle) for _ in range(num_samples)]
        )
        batches = order.split(t.batch_size)
        for idx in tqdm(batches, desc="training", disable=not progress, leave=False):
            for j in range(num_train_steps):
                step = step_order[idx, j]
                x_t, x_prev = latents[idx, step], latents[idx, step + 1]
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        noise_pred = guided_noise_pred(
                            unet,
                            x_t,
                            timesteps[step],
                            data["prompt_embeds"][idx],
                            None if negative is None else negative[idx],
                            s.guidance_scale,
                        )
                    out = ddim_step_with_logprob(
                        pipe.scheduler, noise_pred, timesteps[step], x_t, eta=s.eta, prev_sample=x_prev
                    )
                    loss, stats = ppo_loss(
                        out.log_prob, old_log_probs[idx, step], advantages[idx], t.clip_range, t.adv_clip_max
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                totals["loss"] += loss.item()
                totals["approx_kl"] += stats.approx_kl.item()
                totals["clipfrac"] += stats.clipfrac.item()
                terms += 1
    unet.eval()
    return {k: v / terms for k, v in totals.items()}


# ============================================================================ outputs


def save_lora(pipe, run_dir: Path) -> None:
    """Write ``run_dir/lora`` in diffusers format (``pipe.load_lora_weights(run_dir / "lora")``),
    replacing the previous one only once the new one is complete."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tmp, final = run_dir / "lora.tmp", run_dir / "lora"
    StableDiffusionPipeline.save_lora_weights(
        tmp,
        unet_lora_layers={k: v.float() for k, v in layers.items()},
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    old = run_dir / "lora.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


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


def build_policy(config: Config, accelerator: Accelerator):
    """Load the pipeline, attach what is trained, build AdamW and let accelerate wrap the UNet
    (LoRA lives inside the DDP module, so its gradients are all-reduced).

    Returns ``(pipe, unet, params, optimizer)``; ``unet`` is the wrapped training module and
    ``pipe.unet`` the same weights, unwrapped, for sampling and saving.
    """
    m, t = config.model, config.train
    set_seed(config.run.seed)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[m.mixed_precision]
    pipe = load_pipeline(m.pretrained, revision=m.revision, device=accelerator.device)
    set_attention(pipe.unet, m.attention, accelerator.device)
    params = prepare_unet(pipe, config, weight_dtype)
    optimizer = torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    return pipe, unet, params, optimizer


def open_run(config: Config, accelerator: Accelerator, pipe, optimizer, tracker, streams) -> tuple[Path, int]:
    """Create (or, resuming, restore) the run folder; returns ``(run_dir, first epoch to run)``.

    Resuming restores weights, optimizer, RNG streams and stat tracker from the checkpoint and
    drops metrics of epochs after it, so none are duplicated.
    """
    run_dir, start_epoch = Path(config.run.output_dir) / config.run.name, 0
    if config.run.resume_from:
        run_dir, checkpoint = resolve_resume(config.run.resume_from)
        state, rng = load_checkpoint(checkpoint, pipe.unet, optimizer, accelerator.process_index)
        streams.load(rng)
        if tracker is not None and state.get("tracker"):
            tracker.load_state_dict(state["tracker"])
        start_epoch = state["epoch"] + 1
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", dump_yaml(config).encode())
        if start_epoch > 0:
            truncate_metrics(run_dir / "metrics.jsonl", start_epoch - 1)
    if config.run.log_with != "none":
        accelerator.init_trackers(config.run.name, config=_flat(to_dict(config)))
    accelerator.wait_for_everyone()
    return run_dir, start_epoch


def save_epoch(
    run_dir: Path, epoch: int, config: Config, pipe, optimizer, tracker, streams, accelerator
) -> None:
    """Checkpoint after ``epoch`` (every process takes part), prune old ones, export the weights."""
    save_checkpoint(
        run_dir,
        epoch,
        pipe.unet,
        optimizer,
        streams.state(),
        {"tracker": tracker.state_dict() if tracker else None},
        accelerator.process_index,
        accelerator.is_main_process,
        accelerator.wait_for_everyone,
    )
    if accelerator.is_main_process:
        prune_checkpoints(run_dir, config.run.keep_last)
        if config.model.use_lora:
            save_lora(pipe, run_dir)
        else:
            pipe.unet.save_pretrained(run_dir / "unet")


def train(config: Config):
    """Run DDPO as configured; returns the pipeline holding the trained weights (on every process)."""
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # multi-process CPU runs (gloo) need this to be detected
        mixed_precision=config.model.mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps
        * int(config.sample.num_steps * config.train.timestep_fraction),
        log_with=None if config.run.log_with == "none" else config.run.log_with,
        project_dir=config.run.output_dir,
    )
    check_environment(config, accelerator.device)
    if config.run.resume_from:
        resolve_resume(config.run.resume_from)  # a missing checkpoint fails before the model loads
    source = load_prompts(config.prompts.source)
    reward_fn = rewards.get(config.reward.name, **config.reward.kwargs)
    progress = accelerator.is_local_main_process and sys.stderr.isatty()
    st = config.stat_tracking
    tracker = PerPromptStatTracker(st.buffer_size, st.min_count) if st.enabled else None
    streams = Streams.seeded(config.run.seed, accelerator.process_index)
    pipe, unet, params, optimizer = build_policy(config, accelerator)
    run_dir, start_epoch = open_run(config, accelerator, pipe, optimizer, tracker, streams)
    if start_epoch == 0 and accelerator.is_main_process:
        fixed_sample_grid(pipe, config, source, reward_fn, run_dir / "samples" / "before.png")

    for epoch in range(start_epoch, config.run.num_epochs):
        # sampling and rewards
        pipe.unet.eval()
        trajectories, local_rewards, metadata, t_sample, t_reward = sample_epoch(
            pipe, config, source, reward_fn, streams, accelerator, progress
        )
        prompts = [p for traj in trajectories for p in traj.prompts]
        advantages, all_rewards = gathered_advantages(prompts, local_rewards, tracker, accelerator)

        # training
        t0 = time.perf_counter()
        stats = train_epoch(
            unet,
            pipe,
            stack_epoch(trajectories),
            advantages,
            config,
            optimizer,
            params,
            streams,
            accelerator,
            progress,
        )
        record = {
            "epoch": epoch,
            "reward_mean": all_rewards.mean().item(),
            "reward_std": all_rewards.std(unbiased=False).item(),
            "num_samples": all_rewards.numel(),
            **metadata_means(metadata, accelerator),
            **{
                k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item()
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
        if (epoch + 1) % config.run.save_freq == 0 or epoch == config.run.num_epochs - 1:
            save_epoch(run_dir, epoch, config, pipe, optimizer, tracker, streams, accelerator)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fixed_sample_grid(pipe, config, source, reward_fn, run_dir / "samples" / "after.png")
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
