"""Every method on the embedded tiny model, at an equal budget of reward queries and at equal wall time.

Task: the toy world's training prompts (``--train-prompts``, default toy_train_single) with the
sampler every tiny config uses (``--steps`` 4, guidance 5; DDIM eta 1, or the LCM's steps for
RLCM), scored by ``shapes_alignment``; evaluated on the held-out prompts (``--heldout-prompts``)
with one fixed evaluation seed, so the seeds vary training only. Each (method, seed, setting)
runs in its own process, which is how its peak memory is measured (resident set on CPU, peak
allocated on CUDA).

What a reward query buys each method (``--budget`` Q):

  DDPO, D3PO, B²-DiffuRL, RLCM  ``Q // images per epoch`` training epochs of its tiny config
                                (each image sampled in an epoch is scored once).
  Diffusion-DPO                 Q/4 preference pairs: 4 samples of a training prompt scored,
                                best ≻ worst (ties skipped); then its config's epochs.
  SePPO                         the same data, winners only (the losers are its references' samples).
  SVDD-MC                       Q rollouts of the base model labelled with their final reward, a
                                value net fitted to them, then SVDD sampling (M = ``--M``) guided
                                by it, no reward at sampling time.

Equal wall time (``--seconds`` S): each method is given the number of epochs (SVDD: rollouts) that
its equal-budget runs say fit into S (their time per epoch, and the rest of their wall time as a
fixed cost: loading, data, sample grids); the wall time it actually took is reported beside.

Per method: held-out mean reward after training, mean ± standard error over the seeds; the base
model's held-out reward with the same sampler; diversity of the held-out images; reward queries;
wall time; peak memory. Writes a markdown table (stdout and ``--markdown``) and ``--json``.

    python scripts/compare.py --seeds 3 --budget 1024 --seconds 60 --json compare.json --markdown compare.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from measure import isolated, queries_per_epoch

from diffrl.types import SamplerSettings

ROOT = Path(__file__).resolve().parent.parent

ONLINE = {
    "DDPO": "ddpo/tiny_alignment.yaml",
    "D3PO": "d3po/tiny_alignment.yaml",
    "B²-DiffuRL": "b2diffurl/tiny_alignment.yaml",
    "RLCM": "rlcm/tiny_alignment.yaml",
}
OFFLINE = {"Diffusion-DPO": "dpo/tiny_alignment.yaml", "SePPO": "seppo/tiny_alignment.yaml"}
METHODS = [*ONLINE, *OFFLINE, "SVDD-MC"]
SAMPLES_PER_PROMPT = 4
"""Offline data: images scored per training prompt to choose a pair from."""


def train_config(method: str, args, seed: int, out: str, epochs: int | None, data: str | None):
    """The method's tiny config on the comparison's task, prompts and seed, with ``epochs`` (None:
    the config's own)."""
    from diffrl.config import load_config

    overrides = [
        f"prompts.source={args.train_prompts}",
        f"sample.num_steps={args.steps}",
        f"run.seed={seed}",
        *([f"run.num_epochs={epochs}"] if epochs is not None else []),
        "run.save_freq=1000000",
        f"run.output_dir={out}",
        "run.name=run",
    ]
    if method in OFFLINE:
        overrides += [
            f"dpo.data={data}",
            f"dpo.sample_steps={args.steps}",
            "run.save_freq=1",
            "run.keep_last=7",
        ]
    return load_config(ROOT / "configs" / {**ONLINE, **OFFLINE}[method], overrides)


def held_out(pipe, args) -> dict:
    """``evaluate`` on the held-out prompts with the task's sampler and the fixed evaluation seed."""
    from diffrl import rewards
    from diffrl.evaluation import evaluate
    from diffrl.prompts import load_prompts

    prompts = load_prompts(args.heldout_prompts).prompts
    return evaluate(
        pipe,
        prompts,
        rewards.get("shapes_alignment"),
        num_images=args.num_images,
        num_steps=args.steps,
        guidance_scale=5.0,
        eta=1.0,
        seed=args.eval_seed,
    )


def seeded_prompts(args, seed: int, first: int, stop: int) -> list[str]:
    """Training prompts number ``first..stop-1`` of the seed's pass through the training set
    (cycled, from a seed-dependent start)."""
    from diffrl.prompts import load_prompts

    prompts = load_prompts(args.train_prompts).prompts
    return [prompts[(seed * 7919 + i) % len(prompts)] for i in range(first, stop)]


def build_pairs(args, seed: int, out: Path, queries: int) -> tuple[str, int]:
    """Diffusion-DPO/SePPO data from ``queries`` scored samples; returns (folder, queries used)."""
    from build_tiny_preferences import write_toy_preferences

    from diffrl.pipelines import load_pipeline

    count = max(1, queries // SAMPLES_PER_PROMPT)
    write_toy_preferences(
        load_pipeline("tiny"),
        seeded_prompts(args, seed, 0, count),
        out,
        samples=SAMPLES_PER_PROMPT,
        num_steps=args.steps,
        winners="best",
        seed=seed,
    )
    return str(out), count * SAMPLES_PER_PROMPT


def run_training(method: str, args, seed: int, epochs: int | None) -> dict:
    """One training method: at ``args.budget`` queries (``epochs`` None) or with ``epochs`` given."""
    import torch

    from diffrl.files import read_jsonl
    from diffrl.trainer import train

    torch.manual_seed(seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        data, queries, prepare = None, 0, 0.0
        if method in OFFLINE:
            data, queries = build_pairs(args, seed, Path(out) / "pairs", args.budget)
            prepare = time.perf_counter() - start
        config = train_config(method, args, seed, out, None, data)
        if epochs is None:
            epochs = (
                config.run.num_epochs
                if method in OFFLINE
                else max(1, args.budget // queries_per_epoch(config))
            )
        config = train_config(method, args, seed, out, epochs, data)
        if method in ONLINE:
            queries = epochs * queries_per_epoch(config)
        result = held_out(train(config), args)
        records = read_jsonl(Path(out) / "run" / "metrics.jsonl")
    wall = time.perf_counter() - start
    timed = [r.get("time_sampling", 0) + r.get("time_reward", 0) + r["time_training"] for r in records]
    return {
        "epochs": epochs,
        "queries": queries,
        "prepare_seconds": prepare,
        "epoch_seconds": statistics.median(timed[1:] or timed),
        "wall_seconds": wall,
        "reward": result["reward_mean"],
        "diversity": result["diversity"],
    }


def run_svdd(args, seed: int, rollouts: int) -> dict:
    """SVDD-MC: ``rollouts`` scored base-model chains → value net → guided held-out samples."""
    import torch

    from diffrl import rewards
    from diffrl.evaluation import diversity
    from diffrl.guidance import svdd, value
    from diffrl.pipelines import load_pipeline
    from diffrl.prompts import load_prompts

    start = time.perf_counter()
    pipe, reward_fn = load_pipeline("tiny"), rewards.get("shapes_alignment")
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for first in range(0, rollouts, 32):
        prompts = seeded_prompts(args, seed, first, min(rollouts, first + 32))
        chunks.append(
            value.value_targets(
                pipe,
                prompts,
                reward_fn,
                SamplerSettings(num_steps=args.steps, guidance_scale=5.0),
                generator=generator,
            )
        )
    data = [torch.cat(parts) for parts in zip(*chunks)]
    net = value.train_value_net(data, epochs=20, seed=seed)
    prepare = time.perf_counter() - start
    heldout = load_prompts(args.heldout_prompts).prompts
    chosen = [heldout[i % len(heldout)] for i in range(args.num_images)]
    out = svdd.svdd(
        pipe,
        chosen,
        value.value_net_value(net),
        SamplerSettings(num_steps=args.steps, guidance_scale=5.0),
        num_candidates=args.M,
        generator=torch.Generator().manual_seed(args.eval_seed),
    )
    values = reward_fn(out.images, chosen, [{} for _ in chosen])
    return {
        "epochs": None,
        "queries": rollouts,
        "prepare_seconds": prepare,
        "rollouts_per_second": rollouts / prepare,
        "wall_seconds": time.perf_counter() - start,
        "reward": values.mean().item(),
        "diversity": diversity(out.images),
    }


def job(method: str, args, seed: int, setting: str, plan: dict | None) -> dict:
    """One method, one seed, one setting (run in its own process)."""
    if method == "SVDD-MC":
        result = run_svdd(args, seed, plan["rollouts"] if plan else args.budget)
    else:
        result = run_training(method, args, seed, plan["epochs"] if plan else None)
    return {"method": method, "seed": seed, "setting": setting, **result}


def time_plan(method: str, budget_runs: list[dict], seconds: float) -> dict:
    """Epochs (SVDD: rollouts) that fit into ``seconds``, from the method's equal-budget runs: their
    time per epoch (per rollout) and the rest of their wall time (loading, data, sample grids) as
    a fixed cost."""
    if method == "SVDD-MC":
        rate = statistics.mean(r["rollouts_per_second"] for r in budget_runs)
        fixed = statistics.mean(r["wall_seconds"] - r["queries"] / rate for r in budget_runs)
        return {"rollouts": max(32, int(rate * (seconds - fixed)))}
    per_epoch = statistics.mean(r["epoch_seconds"] for r in budget_runs)
    fixed = statistics.mean(r["wall_seconds"] - r["epochs"] * r["epoch_seconds"] for r in budget_runs)
    return {"epochs": max(1, int((seconds - fixed) / per_epoch))}


def base_rewards(args) -> dict[str, dict]:
    """Held-out ``evaluate`` results of the untrained models (tiny; tiny-lcm for RLCM), by name."""
    from diffrl.pipelines import load_pipeline

    return {name: held_out(load_pipeline(name), args) for name in ("tiny", "tiny-lcm")}


def summarize(runs: list[dict], base: dict, setting: str) -> list[dict]:
    """One row per method: mean ± standard error over seeds of the held-out reward, and means."""
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method and r["setting"] == setting]
        if not mine:
            continue
        reward = [r["reward"] for r in mine]
        model = "tiny-lcm" if method == "RLCM" else "tiny"
        rows.append(
            {
                "method": method,
                "setting": setting,
                "base_reward": base[model]["reward_mean"],
                "reward_mean": statistics.mean(reward),
                "reward_stderr": statistics.stdev(reward) / math.sqrt(len(reward))
                if len(reward) > 1
                else 0.0,
                "diversity": statistics.mean(r["diversity"] for r in mine),
                "queries": statistics.mean(r["queries"] for r in mine),
                "epochs": mine[0]["epochs"],
                "wall_seconds": statistics.mean(r["wall_seconds"] for r in mine),
                "peak_memory_mb": max(r["peak_memory_mb"] for r in mine),
                "seeds": len(mine),
            }
        )
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [
        f"**{title}**",
        "",
        "| method | held-out reward (base → trained) | diversity | reward queries | epochs | wall (s) | peak memory (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['base_reward']:.3f} → {r['reward_mean']:.3f} ± {r['reward_stderr']:.3f} "
            f"| {r['diversity']:.3f} | {r['queries']:.0f} | {r['epochs'] if r['epochs'] is not None else '–'} "
            f"| {r['wall_seconds']:.0f} | {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=1024, help="reward queries per method and seed")
    parser.add_argument("--seconds", type=float, default=60.0, help="wall time per method and seed (0: skip)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--M", type=int, default=8, help="SVDD candidates per step")
    parser.add_argument("--train-prompts", default="toy_train_single")
    parser.add_argument("--heldout-prompts", default="toy_heldout_single")
    parser.add_argument("--num-images", type=int, default=192, help="held-out images per evaluation")
    parser.add_argument("--eval-seed", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()

    def run(method, seed, setting, plan=None) -> dict:
        result = isolated(job, method, args, seed, setting, plan)
        print(json.dumps(result), file=sys.stderr, flush=True)
        return result

    base = base_rewards(args)
    runs = [run(m, seed, "budget") for m in args.methods for seed in range(args.seeds)]
    if args.seconds > 0:
        for method in args.methods:
            plan = time_plan(method, [r for r in runs if r["method"] == method], args.seconds)
            runs += [run(method, seed, "time", plan) for seed in range(args.seeds)]
    tables = {
        "budget": summarize(runs, base, "budget"),
        "time": summarize(runs, base, "time"),
    }
    text = "\n\n".join(
        [
            markdown(tables["budget"], f"Equal budget: {args.budget} reward queries, {args.seeds} seeds"),
            *(
                [markdown(tables["time"], f"Equal wall time: {args.seconds:.0f} s, {args.seeds} seeds")]
                if args.seconds > 0
                else []
            ),
        ]
    )
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "base": base, "tables": tables, "runs": runs}, indent=2)
        )


if __name__ == "__main__":
    main()
