"""Command line: ``diffrl sample`` (more subcommands arrive with their features)."""

from __future__ import annotations

import argparse
import sys

import torch

from diffrl import rewards
from diffrl.files import image_grid, save_png
from diffrl.pipelines import load_pipeline
from diffrl.rollout import sample_trajectories


def _sample(args: argparse.Namespace) -> int:
    reward_fn = rewards.get(args.reward) if args.reward else None
    pipe = load_pipeline(args.model)
    prompts = [args.prompt] * args.num_images
    trajectory = sample_trajectories(
        pipe,
        prompts,
        num_steps=args.num_steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
        generator=torch.Generator().manual_seed(args.seed),
    )
    captions = [args.prompt] * len(prompts)
    if reward_fn is not None:
        values = reward_fn(trajectory.images, prompts, [{} for _ in prompts])
        captions = [f"{p}\nreward {v:.3f}" for p, v in zip(prompts, values.tolist())]
        print(f"{args.reward}: mean {values.mean():.4f} std {values.std():.4f}")
    save_png(image_grid(trajectory.images, captions), args.out)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl", description="RL fine-tuning and reward-guided sampling for diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser("sample", help="sample images with the DDIM policy and optionally score them")
    sample.add_argument("model", help="built-in name (tiny-sd), local diffusers folder or hub id")
    sample.add_argument("--prompt", default="a red circle")
    sample.add_argument("--num-images", type=int, default=8)
    sample.add_argument("--num-steps", type=int, default=50)
    sample.add_argument("--guidance-scale", type=float, default=5.0)
    sample.add_argument("--eta", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--reward", default=None, help="reward name or package.module:function")
    sample.add_argument("--out", default="samples.png")
    sample.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
