"""diffrl's DDPO against trl 0.23.1's ``DDPOTrainer`` (its last release with DDPO), side by side.

Same shipped tiny pipeline, same config: 20 DDIM steps (eta 1), guidance 5, 8 images per epoch
(one batch), train batch 4 with no accumulation over samples, every timestep trained, one inner
epoch, LoRA rank 4 on the attention projections, per-prompt stat tracking (buffer 16, min count
16), JPEG compressibility as the reward, lr 3e-4, float32. Runs alternate (trl, each diffrl
variant, then the same backwards; each run in a fresh process) because the machine is noisy; each run's first epoch is a warm-up and is not counted. Reports the
median images/s of full epochs (sampling, reward, PPO updates, and whatever else each loop does
per epoch: diffrl's are timed from the end of one epoch to the end of the next) for both, and, for diffrl's
settings, how far re-scoring the stored actions puts the PPO ratio from 1 (``ratio_check``, with
LoRA weights drawn from N(0, 0.05²) as a trained adapter's are non-zero).

trl is never a dependency of diffrl: install it into an environment of its own.

    python -m venv .venv-trl
    .venv-trl/bin/pip install torch==2.14.1 torchvision==0.29.1 -e . trl==0.23.1
    .venv-trl/bin/python scripts/bench_trl.py [--rounds 2] [--epochs 4] [--variants NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from measure import isolated
from ratio_check import log_ratios

import diffrl.trainer as trainer
from diffrl import rewards
from diffrl.config import load_config
from diffrl.pipelines import SHIPPED_PIPELINES
from diffrl.prompts import load_prompts
from diffrl.run import Run

IMAGES, TRAIN_BATCH, STEPS, GUIDANCE, LR, RANK = 8, 4, 20, 5.0, 3e-4, 4


def diffrl_config(epochs: int, out: str, overrides: list[str]):
    """diffrl's DDPO config matching :func:`trl_epochs`' settings (plus ``overrides``)."""
    return load_config(
        None,
        [
            "algorithm=ddpo",
            "model.pretrained=tiny",
            f"model.lora_rank={RANK}",
            f"model.lora_alpha={RANK}",
            f"sample.num_steps={STEPS}",
            "sample.eta=1.0",
            f"sample.guidance_scale={GUIDANCE}",
            f"sample.batch_size={IMAGES}",
            "sample.num_batches_per_epoch=1",
            f"train.batch_size={TRAIN_BATCH}",
            "train.gradient_accumulation_steps=1",
            f"train.learning_rate={LR}",
            "train.timestep_fraction=1.0",
            "stat_tracking.enabled=true",
            "stat_tracking.buffer_size=16",
            "stat_tracking.min_count=16",
            "reward.name=jpeg_compressibility",
            "prompts.source=toy_train_single",
            f"run.num_epochs={epochs}",
            "run.save_freq=1000000",
            f"run.output_dir={out}",
            "run.name=bench",
            *overrides,
        ],
    )


def diffrl_epochs(epochs: int, overrides: list[str]) -> dict:
    """Wall seconds of each epoch after the first of a diffrl run: between the ends of consecutive
    epochs (``Run.end_epoch``), so everything the loop does per epoch on its critical path counts
    (the outputs a worker thread writes meanwhile share the machine)."""
    ends, finish = [], Run.end_epoch

    def timed_finish(*args, **kwargs):
        finish(*args, **kwargs)
        ends.append(time.perf_counter())

    Run.end_epoch = timed_finish
    try:
        with tempfile.TemporaryDirectory() as out:
            trainer.train(diffrl_config(epochs, out, overrides))
    finally:
        Run.end_epoch = finish
    return {"seconds": [b - a for a, b in zip(ends, ends[1:])]}


def trl_epochs(epochs: int) -> dict:
    """Seconds of each full epoch (``DDPOTrainer.step``) after the first of a trl run."""
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    PartialState()  # trl's pipeline logs through accelerate before its trainer makes an Accelerator

    prompts, reward_fn = load_prompts("toy_train_single").prompts, rewards.get("jpeg_compressibility")
    with tempfile.TemporaryDirectory() as out:
        config = DDPOConfig(
            num_epochs=epochs,
            sample_num_steps=STEPS,
            sample_eta=1.0,
            sample_guidance_scale=GUIDANCE,
            sample_batch_size=IMAGES,
            sample_num_batches_per_epoch=1,
            train_batch_size=TRAIN_BATCH,
            train_gradient_accumulation_steps=1,
            train_learning_rate=LR,
            train_timestep_fraction=1.0,
            per_prompt_stat_tracking=True,
            per_prompt_stat_tracking_buffer_size=16,
            per_prompt_stat_tracking_min_count=16,
            mixed_precision="no",
            save_freq=1000000,
            logdir=out,
            project_kwargs={"project_dir": out},
        )
        pipeline = DefaultDDPOStableDiffusionPipeline(str(SHIPPED_PIPELINES["tiny"]), use_lora=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DDPOTrainer(
                config,
                lambda images, p, metadata: (reward_fn(images, list(p), list(metadata)), {}),
                lambda: (random.choice(prompts), {}),
                pipeline,
            )
        seconds, global_step = [], 0
        for epoch in range(epochs):
            start = time.perf_counter()
            global_step = trainer.step(epoch, global_step)
            seconds.append(time.perf_counter() - start)
    return {"seconds": seconds[1:]}


def ratio_check(overrides: list[str]) -> dict:
    """``log_ratios`` of diffrl's config with ``overrides`` (LoRA weights drawn from N(0, 0.05²))."""
    with tempfile.TemporaryDirectory() as out:
        return log_ratios(diffrl_config(1, out, overrides), lora_std=0.05)


VARIANTS = {
    "diffrl, no levers (timesteps_per_pass=1, merge_lora=false)": [
        "train.timesteps_per_pass=1",
        "sample.merge_lora=false",
    ],
    "diffrl, defaults (timesteps_per_pass=auto: 20, merge_lora=auto)": [],
    "+ model.compile=true": ["model.compile=true"],
    "defaults, mixed_precision=bf16": ["model.mixed_precision=bf16"],
}
"""diffrl's settings measured against trl: without the levers, at the defaults (which turn on the
levers that keep the numerics), with compilation, and in bf16."""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of trl, every variant, then back")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is not counted)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    names = ["trl", *args.variants]
    times = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names + names[::-1]:
            if name == "trl":
                run = isolated(trl_epochs, args.epochs)["seconds"]
            else:
                run = isolated(diffrl_epochs, args.epochs, VARIANTS[name])["seconds"]
            times[name] += run
            print(f"{name}: {' '.join(f'{s:.2f}' for s in run)} s/epoch", flush=True)
    ratios = {name: isolated(ratio_check, VARIANTS[name]) for name in args.variants}
    speed = {name: IMAGES / statistics.median(t) for name, t in times.items()}
    print("| trainer | images/s (full DDPO epoch, median) | × trl | max \\|log ratio\\| re-scored |")
    print("|---|---|---|---|")
    print(f"| trl 0.23.1 DDPOTrainer | {speed['trl']:.2f} | 1.00 | |")
    for name in args.variants:
        print(
            f"| {name} | {speed[name]:.2f} | {speed[name] / speed['trl']:.2f} "
            f"| {ratios[name]['max_abs_log_ratio']:.1e} |"
        )
    if args.json:
        result = {
            "images_per_second": speed,
            "epoch_seconds": times,
            "ratio_check": ratios,
            "variants": {name: VARIANTS[name] for name in args.variants},
        }
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
