"""How far from 1 the PPO ratio of an unchanged policy is under a given precision and device.

Samples one batch as the trainer does (accelerate autocast, the sampling batch size, LoRA merged if
sample.merge_lora), then re-scores every stored action with the training forward pass in
training-sized minibatches at per-sample shuffled timesteps, train.timesteps_per_pass at a time,
and prints max and mean |log ratio| (JSON). DDPO's clip is 1e-4 on the element-mean log-prob, so anything near that makes the first PPO step clip on noise; the trainer's
own check (train.ratio_tolerance) stops a run above 1e-3.

    python scripts/ratio_check.py configs/ddpo/tiny_alignment.yaml model.mixed_precision=bf16
    python scripts/ratio_check.py configs/rlcm/tiny_alignment.yaml model.mixed_precision=fp16   # on CUDA
"""

from __future__ import annotations

import argparse
import json

import torch
from accelerate import Accelerator

from diffrl.collect import lora_merged, sample_batch
from diffrl.config import load_config
from diffrl.learner import build_learner, pass_rows
from diffrl.prompts import configured_prompts
from diffrl.transitions import denoiser


def log_ratios(config, lora_std: float = 0.0) -> dict:
    """Sample one batch with ``config``'s policy and re-score every stored action as training does;
    returns the settings and the max and mean |log ratio| of the unchanged policy. ``lora_std`` > 0
    draws the trained weights from N(0, lora_std²) first, as a trained adapter's are non-zero
    (a fresh LoRA adds nothing, so merging it would change nothing)."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.model.mixed_precision)
    learner = build_learner(config, accelerator)
    pipe, params = learner.pipe, learner.params
    if lora_std > 0:
        torch.manual_seed(config.run.seed)
        with torch.no_grad():
            for p in params:
                p.normal_(0, lora_std)
    source = configured_prompts(config.prompts)
    gen = torch.Generator().manual_seed(config.run.seed)
    prompts = source.sample(config.sample.batch_size, gen)
    with torch.no_grad(), accelerator.autocast(), lora_merged(denoiser(pipe), learner.merge_sampling):
        traj = sample_batch(pipe, config, prompts, gen)
    num, steps = traj.log_probs.shape
    per_pass = steps if config.train.timesteps_per_pass == "auto" else config.train.timesteps_per_pass
    order = torch.randperm(num, generator=gen)
    step_order = torch.stack([torch.randperm(steps, generator=gen) for _ in range(num)])
    ratios = []
    with torch.no_grad():
        for rows in order.split(config.train.batch_size):
            for cols in torch.arange(steps).split(per_pass):
                idx, step = pass_rows(rows, cols, step_order)
                new = learner.log_prob(traj, idx, step)
                ratios.append((new - traj.log_probs[idx, step].to(new.device)).abs().cpu())
    ratios = torch.cat(ratios)
    return {
        "model": config.model.pretrained,
        "algorithm": config.algorithm,
        "device": str(accelerator.device),
        "mixed_precision": config.model.mixed_precision,
        "sample_batch": config.sample.batch_size,
        "train_batch": config.train.batch_size,
        "max_abs_log_ratio": ratios.max().item(),
        "mean_abs_log_ratio": ratios.mean().item(),
        "lora_std": lora_std,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument(
        "--lora-std", type=float, default=0.0, help="draw the trained weights from N(0, std^2)"
    )
    args = parser.parse_args()
    print(json.dumps(log_ratios(load_config(args.config, args.overrides), args.lora_std)))


if __name__ == "__main__":
    main()
