"""The offline preference loop: Diffusion-DPO and SePPO (:mod:`diffrl.algorithms.dpo`).

No rollouts are scored: each epoch is one shuffled pass over the preference data (or
``dpo.steps_per_epoch`` optimizer steps of it; split across processes), one DPO term per minibatch of pairs: encode both images with the VAE, draw one t and
one ε per pair and noise both images with them, the policy's and the reference's ε errors, the
loss. SePPO replaces the loser by a sample of the reference model for the same prompt. The run
folder, checkpoints, resume, signals and non-finite guards are the RL trainer's
(:mod:`diffrl.trainer`); metrics are the loss, the implicit accuracy and (SePPO) the share of
flipped signs.
"""

from __future__ import annotations

import io
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm.auto import tqdm

from diffrl.algorithms import dpo
from diffrl.checkpoints import list_checkpoints
from diffrl.config import Config
from diffrl.errors import ConfigError, InputFileError
from diffrl.files import append_jsonl, line_chart, read_jsonl, save_png
from diffrl.ops import eps_mse
from diffrl.report import write_report
from diffrl.rollout import encode_prompts, sample_trajectories
from diffrl.trainer import (
    Learner,
    NonFiniteGuard,
    Streams,
    adapters_disabled,
    build_policy,
    finish_epoch,
    fixed_sample_grid,
    open_run,
)

# ============================================================================ data


@dataclass
class Preference:
    """One preference: a prompt, the preferred image and (Diffusion-DPO) the other one; each image
    a file path or encoded bytes."""

    prompt: str
    winner: Path | bytes
    loser: Path | bytes | None


def load_preferences(source: str, need_loser: bool) -> list[Preference]:
    """Read ``dpo.data``: a JSONL of ``{"prompt", "winner", "loser"}`` (image paths relative to
    the file), a folder holding ``pairs.jsonl``, or a ``datasets`` dataset in the Pick-a-Pic
    layout (``hf:NAME[:SPLIT]`` or a ``save_to_disk`` folder; ties dropped). Every image file is
    checked to exist; errors name the file and record."""
    if not source:
        raise ConfigError(
            "dpo.data: no preference data given (a JSONL file, a folder with pairs.jsonl, or hf:NAME)"
        )
    path = Path(source).expanduser()
    if source.startswith("hf:") or (path / "dataset_info.json").is_file():
        return _pickapic(source, path)
    if path.is_dir():
        path = path / "pairs.jsonl"
    if not path.is_file():
        raise InputFileError(f"dpo.data: {path}: no such file")
    records, keys = (
        read_jsonl(path, strict=True),
        ("prompt", "winner", "loser") if need_loser else ("prompt", "winner"),
    )
    pairs = []
    for number, record in enumerate(records, start=1):
        missing = [k for k in keys if not isinstance(record.get(k), str)]
        if missing:
            raise InputFileError(f"{path}: record {number}: needs string fields {', '.join(missing)}")
        images = [path.parent / record[k] for k in keys[1:]]
        for image in images:
            if not image.is_file():
                raise InputFileError(f"{path}: record {number}: image {image} not found")
        pairs.append(Preference(record["prompt"], images[0], images[1] if need_loser else None))
    if not pairs:
        raise InputFileError(f"{path}: no preference records")
    return pairs


def _pickapic(source: str, path: Path) -> list[Preference]:
    """Pick-a-Pic v2 rows (caption, jpg_0, jpg_1, label_0 = 1 when image 0 is preferred, 0.5 tie)."""
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(
            f"dpo.data={source}: reading a datasets dataset needs `pip install datasets`"
        ) from err
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        rows = datasets.load_dataset(name, split=split or "train")
    else:
        rows = datasets.load_from_disk(str(path))
    return pickapic_rows(rows)


def pickapic_rows(rows) -> list[Preference]:
    """Preferences from rows in the Pick-a-Pic column layout; ties (label_0 = 0.5) are dropped."""
    pairs = []
    for row in rows:
        if row["label_0"] == 0.5:
            continue
        first, second = row["jpg_0"], row["jpg_1"]
        winner, loser = (first, second) if row["label_0"] > 0.5 else (second, first)
        pairs.append(Preference(row["caption"], winner, loser))
    return pairs


def load_images(items: list[Path | bytes], resolution: int) -> torch.Tensor:
    """Decode, convert to RGB, resize to ``resolution``² : ``[B, 3, H, W]`` float32 in [−1, 1]."""
    arrays = []
    for item in items:
        image = Image.open(io.BytesIO(item) if isinstance(item, bytes) else item).convert("RGB")
        arrays.append(np.asarray(image.resize((resolution, resolution), Image.BICUBIC), dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


@torch.no_grad()
def write_toy_preferences(
    pipe,
    prompts: list[str],
    out_dir: Path,
    *,
    samples: int = 4,
    num_steps: int = 4,
    winners: str = "best",
    seed: int = 0,
) -> int:
    """Offline preference data for the toy world: for each prompt, ``samples`` images from
    ``pipe`` (DDIM, eta 1, guidance 5) scored by ``shapes_alignment``; the loser is the worst,
    the winner the best (``winners="best"``) or a render of the prompt (``"render"``). Prompts
    whose samples all score the same are skipped. Writes ``images/*.png`` and ``pairs.jsonl``
    (appended record by record); returns the number of pairs."""
    from diffrl import toyworld
    from diffrl.rewards import get as get_reward
    from diffrl.rewards.jpeg import to_uint8

    reward_fn, generator = get_reward("shapes_alignment"), torch.Generator().manual_seed(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    count = 0
    for i, prompt in enumerate(prompts):
        traj = sample_trajectories(
            pipe, [prompt] * samples, num_steps=num_steps, guidance_scale=5.0, eta=1.0, generator=generator
        )
        scores = reward_fn(traj.images, [prompt] * samples, [{} for _ in range(samples)])
        if scores.max() == scores.min():
            continue
        best = (
            toyworld.render_batch([prompt], seed=i)[0]
            if winners == "render"
            else traj.images[scores.argmax()]
        )
        names = {"winner": f"images/{i:05d}_w.png", "loser": f"images/{i:05d}_l.png"}
        for key, image in (("winner", best), ("loser", traj.images[scores.argmin()])):
            save_png(Image.fromarray(to_uint8(image[None])[0]), out_dir / names[key])
        append_jsonl(out_dir / "pairs.jsonl", {"prompt": prompt, **names})
        count += 1
    return count


# ============================================================================ one DPO term


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """VAE latents (scaled, the distribution's mean) of images ``[B, 3, H, W]`` in [−1, 1]."""
    vae = pipe.vae
    latents = vae.encode(images.to(pipe._execution_device, vae.dtype)).latent_dist.mean
    return latents.float() * vae.config.scaling_factor


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


def dpo_step(learner: Learner, batch: list[Preference], config: Config, run_dir: Path, streams: Streams):
    """Prepare one Diffusion-DPO or SePPO term on ``batch`` without gradient (latents, SePPO's
    reference sample, the shared t and ε, the reference's errors) and return the closure that
    computes its loss and stats with gradient, for :meth:`Learner.update`."""
    pipe, accelerator, d = learner.pipe, learner.accelerator, config.dpo
    resolution = config.sample.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = [
        "" if float(torch.rand(1, generator=streams.prompts)) < d.empty_prompt_fraction else p.prompt
        for p in batch
    ]
    reference = None
    if config.algorithm == "seppo":
        chosen = dpo.choose_reference(
            list_checkpoints(run_dir), d.reference_strategy, d.reference_pool, streams.sampling
        )
        reference = None if chosen is None else checkpoint_weights(str(chosen))
    with torch.no_grad():
        embeds, _ = encode_prompts(pipe, prompts, None, False)
        winners = encode_images(pipe, load_images([p.winner for p in batch], resolution))
        if config.algorithm == "dpo":
            losers = encode_images(pipe, load_images([p.loser for p in batch], resolution))
        embeds2 = torch.cat([embeds, embeds])
        with swapped_in(pipe.unet, reference):
            if config.algorithm == "seppo":  # the loser slot: the reference's own image
                images = sample_trajectories(
                    pipe,
                    prompts,
                    num_steps=d.sample_steps,
                    guidance_scale=config.sample.guidance_scale,
                    eta=1.0,
                    generator=streams.sampling,
                    height=resolution,
                    width=resolution,
                ).images
                # encoded like the data's winners (not the sampler's raw latents), so that the
                # two sides differ in content, not in how their latents were made
                losers = encode_images(pipe, images * 2 - 1)
            x_t, t, noise = noised_pair(pipe, winners, losers.to(winners.device), streams.sampling)
            ref_w, ref_l = errors(pipe.unet, x_t, t, embeds2, noise, accelerator).chunk(2)

    def term():
        mse_w, mse_l = errors(learner.unet, x_t, t, embeds2, noise, accelerator).chunk(2)
        if config.algorithm == "seppo":
            inside, signs = dpo.seppo_inside(mse_w, mse_l, ref_w, ref_l, d.beta, d.flipper)
            loss, accuracy = dpo.dpo_loss(inside)
            return loss, {"accuracy": accuracy, "flipped": (signs < 0).float().mean()}
        loss, accuracy = dpo.dpo_loss(dpo.dpo_inside(mse_w, mse_l, ref_w, ref_l, d.beta))
        return loss, {"accuracy": accuracy}

    return term


# ============================================================================ the loop


def train_offline(config: Config, accelerator, reward_fn, stop) -> object:
    """Diffusion-DPO / SePPO as configured; returns the pipeline with the trained weights."""
    data = load_preferences(config.dpo.data, need_loser=config.algorithm == "dpo")
    progress = accelerator.is_local_main_process and sys.stderr.isatty()
    streams = Streams.seeded(config.run.seed, accelerator.process_index)
    pipe, unet, params, optimizer = build_policy(config, accelerator)
    learner = Learner(
        unet, pipe, optimizer, params, accelerator, NonFiniteGuard(config.train.max_nonfinite_steps), config
    )
    run_dir, start_epoch = open_run(config, accelerator, pipe, optimizer, None, streams)
    grid_prompts = [p.prompt for p in data[:16]]
    if start_epoch == 0 and accelerator.is_main_process:
        fixed_sample_grid(pipe, config, grid_prompts, reward_fn, run_dir / "samples" / "before.png")
    t = config.train
    per_step = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    steps_per_epoch = min(len(data) // per_step, config.dpo.steps_per_epoch or len(data))
    if steps_per_epoch == 0:
        raise ConfigError(
            f"dpo.data: {len(data)} preferences are fewer than one optimizer step needs "
            f"(train.batch_size x gradient_accumulation_steps x processes = {per_step})"
        )
    accelerator.gradient_accumulation_steps = t.gradient_accumulation_steps
    for epoch in range(start_epoch, config.run.num_epochs):
        t0, totals, terms, skipped = time.perf_counter(), {}, 0, learner.guard.skipped
        order = torch.randperm(len(data), generator=streams.shuffle)[: steps_per_epoch * per_step]
        local = order[accelerator.process_index :: accelerator.num_processes]
        learner.unet.train()
        batches = local.split(t.batch_size)
        for b, rows in enumerate(tqdm(batches, desc="training", disable=not progress, leave=False)):
            term = dpo_step(learner, [data[i] for i in rows.tolist()], config, run_dir, streams)
            stats = learner.update(term, f"epoch {epoch}", f"minibatch {b}")
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            terms += 1
        learner.unet.eval()
        record = {
            "epoch": epoch,
            **{
                k: accelerator.reduce(torch.tensor(v / terms, device=accelerator.device), "mean").item()
                for k, v in totals.items()
            },
            "num_pairs": len(order),
            "skipped_steps": learner.guard.skipped - skipped,
            "learning_rate": optimizer.param_groups[0]["lr"],
            "time_training": time.perf_counter() - t0,
        }
        accelerator.print(
            f"epoch {epoch}: loss {record['loss']:.4f}, implicit accuracy {record['accuracy']:.3f}"
            + (f", flipped {record['flipped']:.3f}" if "flipped" in record else "")
            + f", {record['time_training']:.1f}s"
        )
        if accelerator.is_main_process:
            append_jsonl(run_dir / "metrics.jsonl", record)
            curve = [r["accuracy"] for r in read_jsonl(run_dir / "metrics.jsonl")]
            save_png(line_chart(curve, "implicit accuracy per epoch"), run_dir / "accuracy_curve.png")
            if epoch == config.run.num_epochs // 2:
                fixed_sample_grid(pipe, config, grid_prompts, reward_fn, run_dir / "samples" / "middle.png")
        finish_epoch(run_dir, epoch, config, pipe, optimizer, None, streams, accelerator, stop)
    if accelerator.is_main_process:
        fixed_sample_grid(pipe, config, grid_prompts, reward_fn, run_dir / "samples" / "after.png")
        write_report(run_dir)
    accelerator.end_training()
    return pipe
