"""Overhead of diffrl's rollout and training step over the bare UNet calls they need.

On the built-in tiny pipeline (where Python overhead is most visible), measured side by side and
interleaved (A, B, A, B, ...) in one process; each ratio is the median over repeats of the ratio of
two runs made back to back (the machine's speed drifts by up to 30% between seconds, not within a pair).
The ratios are of CPU seconds with one torch thread (``--threads``), which time another process's
use of the cores does not enter; the wall-clock ratios are reported beside them:

  (a) rollout: ``sample_trajectories`` (prompt encoding, T guided UNet calls, T policy steps with
      log-probs, VAE decode) / the T bare guided UNet forwards on the same inputs; also against
      those forwards plus a bare VAE decode of the final latents (the model calls any rollout makes);
  (b) training: one DDPO minibatch (T trained timesteps: guided forward, log-prob, PPO loss,
      backward, clip, Adam step) / the T bare UNet forward+backward passes on the same inputs.
      (a) and (b) run on the tiny SD pipeline (DDIM) and again on the shipped ``tiny-flow`` SD3 pipeline
      Flow-GRPO SDE with CFG, LoRA on the transformer; against the bare transformer calls).

  (c) branch sampling (B²-DiffuRL): images/s of ``sample_branches`` (batch/K trunks, K branches
      from the middle step) against plain sampling of the same number of images.

  (d) reward-guided sampling at equal UNet evaluations per image (M·T): plain sampling (T), best-of-N,
      SMC, SVDD-PM and SVDD-MC on the shipped tiny model against ``shapes_alignment`` (held-out
      prompts): mean reward, diversity, wall time.

  (e) every training method's full epochs (sampling, rewards, updates) through
      ``diffrl.trainer.train`` on the shipped tiny models (RLCM: tiny-lcm with H consistency
      steps; the others: tiny with T DDIM steps), the same images per epoch (D3PO's groups and
      B²-DiffuRL's branches included; Diffusion-DPO and SePPO: one pass over the same pairs):
      images/s sampling and for the whole epoch, seconds per 1,000 reward queries, peak memory
      (each method in its own process; medians over epochs after the first).

  (f) SVDD-PM's cost against M (candidates per step): UNet and reward evaluations per image,
      images/s, mean reward, peak memory.

  (g) every flow RL variant of ``compare_flow.py`` (Flow-GRPO full, SDE windows fixed / random /
      sliding / branched, DiffusionNFT) on ``tiny-flow``: transformer calls (latent rows; CFG's
      halves count twice) per reward query, rollouts and training together, and seconds per epoch,
      over ``--epochs`` epochs in its own process.

Target: (a), (b) <= 1.05. Usage: python scripts/bench.py [--steps 20] [--batch 8] [--branches 4] [--repeats 9]
[--M 8] [--lcm-steps 4] [--epochs 4] [--svdd-M 1 2 4 8 16] [--threads 1] [--json out.json]; ``--only-overhead``
runs (a) and (b) alone, ``--only-flow-calls`` (g) alone
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from measure import isolated, queries_per_epoch

from diffrl import rewards
from diffrl.algorithms import Batch, ddpo
from diffrl.config import load_config
from diffrl.evaluation import diversity
from diffrl.files import read_jsonl
from diffrl.guidance import svdd, value
from diffrl.learner import Learner, NonFiniteGuard, make_optimizer, prepare_denoiser
from diffrl.pipelines import inspect_pipeline, load_pipeline
from diffrl.prompts import load_prompts
from diffrl.rollout import sample_branches, sample_trajectories
from diffrl.run import Streams
from diffrl.trainer import train
from diffrl.transitions import denoiser, family
from diffrl.types import SamplerSettings

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bare_model(pipe, traj):
    """The denoiser called as bare as the pipeline needs it on the guided (doubled) batch of
    ``traj``: ``call(x [2B, C, h, w], t [2B]) -> output`` (a UNet with the negative and prompt
    embeddings; SD3's transformer with those and the pooled ones)."""
    text = traj.text
    embeds = torch.cat([text.negative, text.embeds])
    if family(pipe) != "flow":
        return lambda x, t: pipe.unet(x, t, encoder_hidden_states=embeds).sample
    pooled = torch.cat([text.negative_pooled, text.pooled])
    return lambda x, t: pipe.transformer(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]


def bench(steps: int, batch: int, branches: int, repeats: int, model: str = "tiny-sd") -> dict:
    """(a)-(c) on ``model`` (``tiny-sd``: DDIM; ``tiny-flow``: the Flow-GRPO SDE with CFG)."""
    flow = inspect_pipeline(model).family == "flow"
    settings = SamplerSettings(num_steps=steps, eta=0.7 if flow else 1.0)
    config = load_config(
        None,
        [
            f"model.pretrained={model}",
            f"sample.num_steps={steps}",
            f"sample.eta={settings.eta}",
            f"sample.batch_size={batch}",
            "sample.num_batches_per_epoch=1",
            f"train.batch_size={batch}",
            "train.timesteps_per_pass=1",  # (b) compares with one bare forward+backward per timestep
            "train.ratio_tolerance=1e9",  # (b) re-trains one stored batch: after a repeat it is off-policy
        ],
    )
    pipe = load_pipeline(model)
    params = prepare_denoiser(pipe, config, torch.float32)
    optimizer = make_optimizer(params, config)
    unet, prompts = denoiser(pipe), [f"a red circle {i}" for i in range(batch)]
    generator = torch.Generator().manual_seed(0)
    traj = sample_trajectories(pipe, prompts, settings, generator=generator)
    call = bare_model(pipe, traj)
    inputs = [torch.cat([traj.latents[:, j]] * 2) for j in range(steps)]
    t2 = [torch.full((2 * batch,), t.item(), dtype=traj.timesteps.dtype) for t in traj.timesteps]

    def rollout():
        sample_trajectories(pipe, prompts, settings, generator=generator)

    @torch.no_grad()
    def bare_forward():
        for x, t in zip(inputs, t2):
            call(x, t)

    batch_data = Batch(
        members=torch.arange(batch)[:, None],
        trained=torch.ones(batch, dtype=torch.bool),
        rewards=torch.zeros(batch),
        values={"advantages": torch.randn(batch)},
    )

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    streams = Streams.seeded(0, 0)

    learner = Learner(unet, pipe, optimizer, params, accelerator, NonFiniteGuard(limit=1000), config)

    def train_step():
        learner.train_epoch(ddpo.loss, batch_data, traj, streams, 0, "bench")

    trunks = prompts[: max(1, batch // branches)]

    def branched():
        sample_branches(
            pipe,
            trunks,
            settings,
            branch_step=steps // 2,
            num_branches=branches,
            generator=generator,
        )

    def plain():
        sample_trajectories(pipe, prompts[: len(trunks)] * branches, settings, generator=generator)

    final = traj.latents[:, -1] / pipe.vae.config.scaling_factor + (
        pipe.vae.config.get("shift_factor") or 0.0
    )

    @torch.no_grad()
    def bare_decode():
        pipe.vae.decode(final)

    def bare_backward():
        for x, t in zip(inputs, t2):
            call(x, t).float().pow(2).mean().backward()
        optimizer.zero_grad()

    cases = {
        "rollout": rollout,
        "bare_forward": bare_forward,
        "bare_decode": bare_decode,
        "train_step": train_step,
        "bare_backward": bare_backward,
        "branch_sampling": branched,
        "plain_sampling": plain,
    }
    for fn in cases.values():  # warm-up
        fn()
    wall, cpu = {name: [] for name in cases}, {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            seconds, cpu_seconds = _timed(fn)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)

    def ratios(times: dict) -> dict:
        """Each repeat's A and B ran back to back: the median of their ratios cancels the drift."""

        def paired(a, b):
            return statistics.median(x / y for x, y in zip(times[a], times[b]))

        return {
            "rollout_ratio": paired("rollout", "bare_forward"),
            "rollout_ratio_with_decode": statistics.median(
                r / (f + d) for r, f, d in zip(times["rollout"], times["bare_forward"], times["bare_decode"])
            ),
            "train_ratio": paired("train_step", "bare_backward"),
            "branch_speedup": paired("plain_sampling", "branch_sampling"),
        }

    return {
        "model": model,
        "steps": steps,
        "batch": batch,
        "repeats": repeats,
        "median_seconds": {k: statistics.median(v) for k, v in wall.items()},
        **ratios(cpu),
        "wall_clock": ratios(wall),
        "branch_images": len(trunks) * branches,
    }


def bench_guidance(m: int, steps: int = 4, seed: int = 0) -> list[dict]:
    """Table (d): each guided sampler makes one image per prompt with about M·T UNet evaluations."""
    pipe = load_pipeline("tiny")
    reward_fn = rewards.get("shapes_alignment")
    prompts = load_prompts("toy_heldout_single").prompts[::2]
    train_prompts = load_prompts("toy_train_single").prompts
    start = time.perf_counter()
    data = value.value_targets(
        pipe,
        train_prompts * 3,
        reward_fn,
        SamplerSettings(num_steps=steps, guidance_scale=5.0),
        generator=torch.Generator().manual_seed(seed),
    )
    net, value_seconds = value.train_value_net(data, epochs=20, seed=seed), time.perf_counter() - start
    settings = SamplerSettings(num_steps=steps, guidance_scale=5.0)
    pm, mc = svdd.posterior_mean_value(reward_fn), value.value_net_value(net)
    methods = {
        "plain": lambda g: svdd.svdd(pipe, prompts, pm, settings, num_candidates=1, generator=g),
        f"best-of-{m}": lambda g: svdd.best_of_n(pipe, prompts, reward_fn, settings, n=m, generator=g),
        f"SMC ({m} particles, alpha 0.1)": lambda g: svdd.smc(
            pipe, prompts, pm, settings, num_particles=m, alpha=0.1, generator=g
        ),
        f"SVDD-PM (M={m})": lambda g: svdd.svdd(pipe, prompts, pm, settings, num_candidates=m, generator=g),
        f"SVDD-MC (M={m})": lambda g: svdd.svdd(pipe, prompts, mc, settings, num_candidates=m, generator=g),
    }
    rows = []
    for name, run in methods.items():
        start = time.perf_counter()
        out = run(torch.Generator().manual_seed(seed))
        seconds = time.perf_counter() - start
        values = reward_fn(out.images, prompts, [{} for _ in prompts])
        rows.append(
            {
                "method": name,
                "unet_per_image": out.unet_calls / len(prompts),
                "reward_mean": values.mean().item(),
                "reward_stderr": (values.std() / len(values) ** 0.5).item(),
                "diversity": diversity(out.images),
                "seconds": seconds,
            }
        )
    rows.append({"method": "(SVDD-MC value net training)", "seconds": value_seconds})
    return rows


METHOD_CONFIGS = {
    "DDPO": "ddpo/tiny_alignment.yaml",
    "D3PO": "d3po/tiny_alignment.yaml",
    "B²-DiffuRL": "b2diffurl/tiny_alignment.yaml",
    "RLCM": "rlcm/tiny_alignment.yaml",
    "Diffusion-DPO": "dpo/tiny_alignment.yaml",
    "SePPO": "seppo/tiny_alignment.yaml",
}


def method_epochs(method: str, steps: int, images: int, epochs: int, data: str) -> dict:
    """Table (e), one row (run in its own process): ``epochs`` full epochs of the method's tiny
    config through ``diffrl.trainer.train`` with ``images`` sampled and scored per online epoch
    (D3PO's groups and B²-DiffuRL's branches included) or one pass over the pairs in ``data``."""
    from diffrl import algorithms

    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"sample.num_steps={steps}",
            "sample.num_batches_per_epoch=1",
            "prompts.source=toy_train_single",
            f"run.num_epochs={epochs}",
            "run.save_freq=1",
            f"run.output_dir={out}",
            "run.name=bench",
            f"dpo.data={data}",
            f"dpo.sample_steps={steps}",
        ]
        config = load_config(ROOT / "configs" / METHOD_CONFIGS[method], overrides)
        algorithm = algorithms.get(config.algorithm)
        per_image = 1 if algorithm.offline else algorithm.plan(config, 0).num_branches
        config = load_config(
            ROOT / "configs" / METHOD_CONFIGS[method],
            [*overrides, f"sample.batch_size={images // per_image}"],
        )
        train(config)
        records = read_jsonl(Path(out) / "bench" / "metrics.jsonl")[1:]  # the first epoch warms up
    offline = method in ("Diffusion-DPO", "SePPO")
    epoch_seconds = statistics.median(
        r.get("time_sampling", 0) + r.get("time_reward", 0) + r["time_training"] for r in records
    )
    # an offline epoch trains on winner and loser (SePPO: its reference's sample) of every pair
    count = 2 * records[0]["num_pairs"] if offline else queries_per_epoch(config)
    sampling = None if offline else statistics.median(r["time_sampling"] for r in records)
    return {
        "method": method,
        "model": config.model.pretrained,
        "steps": steps,
        "images_per_epoch": count,
        "epoch_seconds": epoch_seconds,
        "epoch_images_per_second": count / epoch_seconds,
        "sampling_images_per_second": None if sampling is None else count / sampling,
        "seconds_per_1000_queries": None if offline else epoch_seconds / count * 1000,
    }


def bench_methods(steps: int, lcm_steps: int, images: int, epochs: int) -> list[dict]:
    """Table (e): every training method's full epochs on the shipped tiny models (tiny-lcm with
    ``lcm_steps`` for RLCM, ``steps`` DDIM steps for the rest), each in its own process for its
    peak memory; the offline methods share pairs built from 2 × ``images`` training prompts."""
    from build_tiny_preferences import write_toy_preferences

    with tempfile.TemporaryDirectory() as data:  # 4-step samples: at 20 steps nearly all would tie
        write_toy_preferences(
            load_pipeline("tiny"), load_prompts("toy_train_single").prompts[: 2 * images], Path(data)
        )
        return [
            isolated(method_epochs, method, lcm_steps if method == "RLCM" else steps, images, epochs, data)
            for method in METHOD_CONFIGS
        ]


def svdd_at(m: int, steps: int) -> dict:
    """Table (f), one row (run in its own process): SVDD-PM with M candidates per step on the
    held-out one-object prompts: UNet and reward evaluations per image, images/s, mean reward."""
    pipe, reward_fn = load_pipeline("tiny"), rewards.get("shapes_alignment")
    prompts = load_prompts("toy_heldout_single").prompts[::2]
    value = svdd.posterior_mean_value(reward_fn)
    start = time.perf_counter()
    out = svdd.svdd(
        pipe,
        prompts,
        value,
        SamplerSettings(num_steps=steps, guidance_scale=5.0),
        num_candidates=m,
        generator=torch.Generator().manual_seed(0),
    )
    seconds = time.perf_counter() - start
    values = reward_fn(out.images, prompts, [{} for _ in prompts])
    return {
        "M": m,
        "unet_per_image": out.unet_calls / len(prompts),
        "reward_queries_per_image": m * (steps - 1) if m > 1 else 0,
        "images_per_second": len(prompts) / seconds,
        "reward_mean": values.mean().item(),
    }


def flow_calls(epochs: int) -> list[dict]:
    """Table (g): each flow variant's transformer rows per reward query over ``epochs`` epochs (its
    own process, no evaluation: :func:`compare_flow.train_variant`)."""
    from compare_flow import VARIANTS, train_variant

    return [isolated(train_variant, variant, 0, epochs, False) for variant in VARIANTS]


def print_flow_calls(rows: list[dict]) -> None:
    print("\ntransformer calls per reward query, tiny-flow (rollouts and training; CFG rows count twice)")
    print("| variant | transformer rows / reward query | s / epoch (32 queries) | peak memory (MB) |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['rows_per_query']:.1f} | {row['epoch_seconds']:.2f} | {row['peak_memory_mb']:.0f} |"
        )


def print_overhead(result: dict) -> None:
    """Tables (a) and (b) of one :func:`bench` result."""
    med, batch, wall = result["median_seconds"], result["batch"], result["wall_clock"]
    print(
        f"\n{result['model']}, T={result['steps']}, batch={batch}, median of {result['repeats']} interleaved repeats"
    )
    print("| measure | diffrl (s) | bare model (s) | ratio (CPU s) | ratio (wall s) | target |")
    print("|---|---|---|---|---|---|")
    rollout, train_step = med["rollout"], med["train_step"]
    rows = [
        ("rollout", "rollout_ratio", rollout, med["bare_forward"], "<= 1.05"),
        (
            "rollout vs bare model + VAE decode",
            "rollout_ratio_with_decode",
            rollout,
            med["bare_forward"] + med["bare_decode"],
            "",
        ),
        ("training step", "train_ratio", train_step, med["bare_backward"], "<= 1.05"),
    ]
    for name, key, ours, bare, target in rows:
        print(f"| {name} | {ours:.4f} | {bare:.4f} | {result[key]:.3f} | {wall[key]:.3f} | {target} |")
    print(f"(sampling: {batch / med['rollout']:.1f} images/s)")


def write_json(path: str | None, result: dict) -> None:
    """``result`` to ``path`` (``--json``) when one was given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument(
        "--flow-steps", type=int, default=10, help="sampler steps of the flow case (Flow-GRPO: 10)"
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--M", type=int, default=8)
    parser.add_argument("--lcm-steps", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--svdd-M", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--guided-steps", type=int, default=4, help="sampler steps of (d) and (f)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of (a)-(d)")
    parser.add_argument("--only-overhead", action="store_true", help="run tables (a) and (b) alone")
    parser.add_argument("--only-flow-calls", action="store_true", help="run table (g) alone")
    args = parser.parse_args()
    if args.only_flow_calls:
        print_flow_calls(flow_calls(args.epochs))
        return
    torch.set_num_threads(args.threads)
    result = bench(args.steps, args.batch, args.branches, args.repeats)
    print_overhead(result)
    result["flow"] = bench(args.flow_steps, args.batch, args.branches, args.repeats, model="tiny-flow")
    print_overhead(result["flow"])
    if args.only_overhead:
        write_json(args.json, result)
        return
    med = result["median_seconds"]
    images = result["branch_images"]
    print(
        f"\nbranch sampling, {images} images ({images // args.branches} trunks x {args.branches} branches from step "
        f"{args.steps // 2}): {images / med['branch_sampling']:.1f} images/s vs plain {images / med['plain_sampling']:.1f} "
        f"images/s ({result['branch_speedup']:.2f}x)"
    )
    result["guidance"] = bench_guidance(args.M, args.guided_steps)
    print(
        f"\nreward-guided sampling on the tiny model, {len(result['guidance']) - 1} methods, shapes_alignment"
    )
    print("| method | UNet evals / image | mean reward | diversity | wall (s) |")
    print("|---|---|---|---|---|")
    for row in result["guidance"]:
        if "reward_mean" in row:
            print(
                f"| {row['method']} | {row['unet_per_image']:.0f} | {row['reward_mean']:.3f} ± {row['reward_stderr']:.3f} "
                f"| {row['diversity']:.3f} | {row['seconds']:.1f} |"
            )
        else:
            print(f"| {row['method']} | | | | {row['seconds']:.1f} |")
    result["methods"] = bench_methods(args.steps, args.lcm_steps, args.batch * 4, args.epochs)
    print(
        f"\nfull training epochs of {args.batch * 4} images (shapes_alignment), median over {args.epochs - 1} epochs"
    )
    print(
        "| method | model | sampler steps | images / epoch | sampling images/s | epoch images/s "
        "| s / 1,000 reward queries | peak memory (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in result["methods"]:
        sampling, per_1000 = row["sampling_images_per_second"], row["seconds_per_1000_queries"]
        print(
            f"| {row['method']} | {row['model']} | {row['steps']} | {row['images_per_epoch']} "
            f"| {'–' if sampling is None else f'{sampling:.1f}'} | {row['epoch_images_per_second']:.1f} "
            f"| {'–' if per_1000 is None else f'{per_1000:.1f}'} | {row['peak_memory_mb']:.0f} |"
        )
    result["svdd"] = [isolated(svdd_at, m, args.guided_steps) for m in args.svdd_M]
    print(f"\nSVDD-PM against M ({args.guided_steps} steps, held-out one-object prompts)")
    print("| M | UNet evals / image | reward queries / image | images/s | mean reward | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    for row in result["svdd"]:
        print(
            f"| {row['M']} | {row['unet_per_image']:.0f} | {row['reward_queries_per_image']} "
            f"| {row['images_per_second']:.1f} | {row['reward_mean']:.3f} | {row['peak_memory_mb']:.0f} |"
        )
    result["flow_calls"] = flow_calls(args.epochs)
    print_flow_calls(result["flow_calls"])
    write_json(args.json, result)


if __name__ == "__main__":
    main()
