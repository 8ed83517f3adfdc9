"""Command line: ``diffrl train``, ``diffrl eval`` and ``diffrl sample``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


TRAIN_HELP = """\
Fine-tune a diffusion model with RL as described by a YAML config.

CONFIG is a YAML file with the sections model, sample, train, stat_tracking, reward, prompts and
run (see configs/ for complete examples; every key has a default). Any key can be overridden
after the file as section.key=value, the value parsed as YAML:

  diffrl train configs/ddpo/tiny_compressibility.yaml train.learning_rate=1e-4 run.num_epochs=10
  diffrl train configs/ddpo/sd15_aesthetic.yaml "prompts.source=[a cat, a dog]"

Unknown keys, wrong types and out-of-range values are reported before any model loads.
The run folder (run.output_dir/run.name) receives config.yaml, metrics.jsonl, samples/,
reward_curve.png, checkpoints/ and lora/. --resume RUN_DIR_OR_CHECKPOINT continues a run at the
epoch after its newest complete checkpoint (with the run's own config.yaml when CONFIG is omitted).
Multi-process: accelerate launch scripts/train.py CONFIG [key=value ...]
"""


def _train(args: argparse.Namespace) -> int:
    from diffrl.trainer import train

    train(resolve_train_config(args.config, args.overrides, args.resume))
    return 0


def resolve_train_config(config_path: str | None, overrides: list[str], resume: str | None):
    """The config of ``diffrl train``: the file (or, resuming without one, the run's own
    config.yaml), the overrides, and ``run.resume_from`` when resuming."""
    from diffrl.checkpoints import resolve_resume
    from diffrl.config import load_config
    from diffrl.errors import ConfigError

    overrides = list(overrides)
    if config_path is not None and "=" in config_path:  # only overrides were given
        overrides.insert(0, config_path)
        config_path = None
    if resume is not None:
        run_dir, _ = resolve_resume(resume)
        config_path = config_path or str(run_dir / "config.yaml")
        overrides.append(f"run.resume_from={resume}")
    if config_path is None:
        raise ConfigError("diffrl train needs a CONFIG file (or --resume RUN_DIR)")
    return load_config(config_path, overrides)


def _eval(args: argparse.Namespace) -> int:
    import json

    from diffrl.evaluation import evaluate, load_for_eval, markdown_table
    from diffrl.prompts import load_prompts

    source = load_prompts(args.prompts)
    reward_fn = rewards.get(args.reward)
    results = {}
    for model in args.models:
        pipe, run_config = load_for_eval(model)
        sample = run_config.sample if run_config is not None else None
        results[model] = evaluate(
            pipe,
            source.prompts,
            reward_fn,
            num_images=args.num_images,
            num_steps=args.num_steps or (sample.num_steps if sample else 20),
            guidance_scale=args.guidance_scale
            if args.guidance_scale is not None
            else (sample.guidance_scale if sample else 5.0),
            eta=args.eta if args.eta is not None else (sample.eta if sample else 1.0),
            seed=args.seed,
        )
    print(markdown_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl", description="RL fine-tuning and reward-guided sampling for diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="fine-tune with RL from a YAML config",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    train.add_argument(
        "--resume", metavar="PATH", help="run folder (its newest checkpoint) or checkpoint folder"
    )
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="score pipelines or trained runs on a fixed seeded prompt set")
    ev.add_argument("models", nargs="+", metavar="PIPELINE_OR_RUN", help="model name/path or run folder")
    ev.add_argument("--prompts", required=True, help="prompt set name, text file, or toy_heldout_single etc.")
    ev.add_argument("--reward", required=True, help="reward name or package.module:function")
    ev.add_argument("--num-images", type=int, default=64)
    ev.add_argument("--num-steps", type=int, default=None, help="default: the run's, else 20")
    ev.add_argument("--guidance-scale", type=float, default=None, help="default: the run's, else 5")
    ev.add_argument("--eta", type=float, default=None, help="default: the run's, else 1")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", default=None, help="also write the results here")
    ev.set_defaults(func=_eval)

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
    """Run a command; errors in the user's input print one line and return 2, a run stopped by a
    signal returns 128 + the signal number."""
    from diffrl.errors import DiffrlError, RunStopped

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DiffrlError, FileNotFoundError) as err:
        print(f"diffrl: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stopped:
        print(f"diffrl: {stopped}", file=sys.stderr)
        return 128 + stopped.signum


if __name__ == "__main__":
    sys.exit(main())
