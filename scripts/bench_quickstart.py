"""The quickstart, measured: wall time of `diffrl train configs/ddpo/tiny_alignment.yaml` and the
held-out gain it buys over the shipped pretrained model.

Runs the training as a user would (a subprocess, all cores), then `diffrl eval`'s evaluation of
the pretrained model and the trained run on the toy world's held-out and train single-object
prompts, at the run's sampler settings. Targets: about 10 minutes on 2 CPU cores; held-out exact
match +0.15 or more; mean shapes_alignment up.

    python scripts/bench_quickstart.py [--config configs/ddpo/tiny_alignment.yaml] [--images 192] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from diffrl import rewards
from diffrl.config import load_config
from diffrl.evaluation import evaluate, load_for_eval, markdown_table
from diffrl.prompts import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/ddpo/tiny_alignment.yaml")
    parser.add_argument("--output-dir", default="runs/bench_quickstart")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    config = load_config(args.config, [f"run.output_dir={args.output_dir}"])
    run_dir = Path(args.output_dir) / config.run.name

    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "diffrl.cli",
            "train",
            args.config,
            f"run.output_dir={args.output_dir}",
            "run.overwrite=true",  # a rerun replaces its run
        ],  # fmt: skip
        check=True,
    )
    wall = time.perf_counter() - start

    reward_fn = rewards.get(config.reward.name)
    s = config.sample
    results = {}
    for split in ("toy_heldout_single", "toy_train_single"):
        prompts = load_prompts(split).prompts
        for label, model in (("pretrained", config.model.pretrained), ("trained", str(run_dir))):
            pipe, _ = load_for_eval(model)
            results[f"{label} / {split}"] = evaluate(
                pipe,
                prompts,
                reward_fn,
                num_images=args.images,
                num_steps=s.num_steps,
                guidance_scale=s.guidance_scale,
                eta=s.eta,
                seed=1234,
            )
    gain = (
        results["trained / toy_heldout_single"]["exact_match"]
        - results["pretrained / toy_heldout_single"]["exact_match"]
    )
    print(markdown_table(results))
    print(
        f"\nquickstart wall time: {wall / 60:.1f} min; held-out exact-match gain: {gain:+.3f} (target >= +0.15)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"wall_seconds": wall, "heldout_exact_gain": gain, "results": results}, indent=1)
            + "\n"
        )


if __name__ == "__main__":
    main()
