"""Which flow RL is cheapest for a given gain (issue #23): on the shipped ``tiny-flow``, Flow-GRPO
(full), GRPO with an SDE window (fixed, random, sliding, branched) and DiffusionNFT, at an equal
budget of reward queries and at equal wall time, ``--seeds`` seeds each.

Every variant trains on Toy-GenEval's training prompts with the partial-credit reward
(``configs/grpo/tiny_flow_geneval.yaml``, ``configs/nft/tiny_flow_geneval.yaml``; both sample 32
images an epoch, so epochs are reward queries / 32) and is scored on the held-out Toy-GenEval rows
(overall and per category) with the 20-step Euler ODE and 8 images per row, one fixed evaluation
seed, so seeds vary training only. Each run is its own process; its transformer calls are counted
as latent rows through the transformer (CFG's two halves count twice) and divided by its reward
queries, next to its wall time and peak memory.

Equal wall time (``--seconds`` S): each variant gets the epochs that its equal-budget runs say fit
into S (their seconds per epoch, the rest of their wall time as a fixed cost).

    python scripts/compare_flow.py --seeds 3 --epochs 40 --seconds 120 --out runs/compare_flow
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from measure import isolated

ROOT = Path(__file__).resolve().parent.parent
GRPO = "grpo/tiny_flow_geneval.yaml"
FULL = ["grpo.sde_window.size=0", "train.timestep_fraction=0.5", "train.timestep_selection=first"]
WINDOW = ["train.timestep_fraction=1.0", "grpo.sde_window.size=2"]
RANDOM = [*WINDOW, "grpo.sde_window.placement=random", "grpo.sde_window.range=[0, 4]"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "GRPO (full)": (GRPO, FULL),
    "GRPO, fixed window": (GRPO, [*WINDOW, "grpo.sde_window.placement=fixed", "grpo.sde_window.start=0"]),
    "GRPO, random window": (GRPO, RANDOM),
    "GRPO, sliding window": (
        GRPO,
        [
            *WINDOW,
            "grpo.sde_window.placement=sliding",
            "grpo.sde_window.start=0",
            "grpo.sde_window.period=25",
        ],
    ),
    "GRPO, branched window": (GRPO, [*RANDOM, "grpo.sde_window.branches=true"]),
    "NFT": ("nft/tiny_flow_geneval.yaml", []),
}
"""Name -> (config under configs/, overrides). The GRPO config ships the random window; every
variant spells its own settings out. Windows of W = 2 actions (Flow-GRPO-Fast's default) within the
first half of the 8 steps, where the full run trains its 4 highest-noise steps."""
EVAL_STEPS, EVAL_IMAGES, EVAL_SEED = 20, 8, 0


def count_model_rows() -> list[int]:
    """Patch the UNet and SD3 transformer classes of this process to count the latent rows they
    evaluate for rollouts and training (the run's fixed-seed sample grids are not counted)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from diffrl.run import Run

    rows, paused, grid = [0], [False], Run.grid

    def counting(cls, name):
        forward = cls.forward

        def counted(self, *args, **kwargs):
            if not paused[0]:
                rows[0] += (kwargs[name] if name in kwargs else args[0]).shape[0]
            return forward(self, *args, **kwargs)

        cls.forward = counted

    def uncounted_grid(self, *args, **kwargs):
        paused[0] = True
        try:
            return grid(self, *args, **kwargs)
        finally:
            paused[0] = False

    counting(SD3Transformer2DModel, "hidden_states")
    counting(UNet2DConditionModel, "sample")
    Run.grid = uncounted_grid
    return rows


def held_out(pipe, guidance: float) -> dict:
    """Held-out Toy-GenEval per category, overall and the partial credit, sampled at the
    classifier-free ``guidance`` the run trained with (NFT trains CFG-free: guidance 1)."""
    from diffrl.evaluation import toy_geneval_heldout

    return toy_geneval_heldout(pipe, guidance, EVAL_STEPS, EVAL_IMAGES, EVAL_SEED)


def train_variant(variant: str, seed: int, epochs: int, evaluate: bool = True) -> dict:
    """One training run of ``variant`` (in its own process) and, with ``evaluate``, its held-out
    evaluation (``bench.py`` (g) takes only the counts)."""
    import torch

    from diffrl.config import load_config
    from diffrl.files import read_jsonl
    from diffrl.trainer import train

    torch.manual_seed(seed)
    rows = count_model_rows()
    config_file, overrides = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            ROOT / "configs" / config_file,
            [*overrides, f"run.seed={seed}", f"run.num_epochs={epochs}", f"run.save_freq={epochs}",
             f"run.output_dir={out}", "run.name=run", "monitor.enabled=false"],
        )  # fmt: skip
        start = time.perf_counter()
        pipe = train(config)
        wall = time.perf_counter() - start
        calls = rows[0]
        records = read_jsonl(Path(out) / "run" / "metrics.jsonl")
    queries = sum(r["num_samples"] + r["num_dropped"] for r in records)
    epoch_seconds = [r["time_sampling"] + r["time_reward"] + r["time_training"] for r in records]
    tenth = max(1, len(records) // 10)
    rewards = [r["reward_mean"] for r in records]
    return {
        "variant": variant, "seed": seed, "epochs": epochs, "queries": queries, "wall_seconds": wall,
        "epoch_seconds": statistics.median(epoch_seconds), "transformer_rows": calls,
        "rows_per_query": calls / queries,
        "reward_first": statistics.mean(rewards[:tenth]), "reward_last": statistics.mean(rewards[-tenth:]),
        "guidance": config.sample.guidance_scale,
        **({"heldout": held_out(pipe, config.sample.guidance_scale)} if evaluate else {}),
    }  # fmt: skip


def guidance_of(variant: str) -> float:
    """The classifier-free guidance that ``variant`` samples (and is evaluated) with."""
    from diffrl.config import load_config

    config_file, overrides = VARIANTS[variant]
    return load_config(ROOT / "configs" / config_file, overrides).sample.guidance_scale


def base_model(guidance: float) -> dict:
    from diffrl.pipelines import load_pipeline

    return held_out(load_pipeline("tiny-flow"), guidance)


def epochs_within(runs: list[dict], seconds: float) -> int:
    """Epochs that fit into ``seconds``, from equal-budget runs' seconds per epoch and fixed cost."""
    per_epoch = statistics.mean(r["epoch_seconds"] for r in runs)
    fixed = statistics.mean(r["wall_seconds"] - r["epochs"] * r["epoch_seconds"] for r in runs)
    return max(1, int((seconds - fixed) / per_epoch))


def mean_se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], 0.0
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def summarize(runs: list[dict], setting: str) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant and r["setting"] == setting]
        if mine:
            keys = mine[0]["heldout"].keys()
            rows.append({
                "variant": variant,
                "heldout": {k: mean_se([r["heldout"][k] for r in mine]) for k in keys},
                **{k: statistics.mean(r[k] for r in mine) for k in ("epochs", "queries", "wall_seconds",
                                                                  "rows_per_query", "peak_memory_mb", "guidance",
                                                                  "reward_first", "reward_last")},
            })  # fmt: skip
    return rows


CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def markdown(rows: list[dict], bases: dict[float, dict], title: str) -> str:
    """One table: a base row per guidance (the variants are evaluated at their own), then a row per
    variant with the mean ± standard error over seeds."""
    present = [c for c in CATEGORIES if c in next(iter(bases.values()))]
    head = (
        "| variant | guidance | overall | "
        + " | ".join(present)
        + " | training reward, first → last tenth | queries | wall (s) | transformer rows / query | peak MB |"
    )
    lines = [f"**{title}**", "", head, "|" + "---|" * (len(present) + 8)]
    for guidance, base in sorted(bases.items(), reverse=True):
        lines.append(
            f"| base tiny-flow | {guidance:g} | "
            + " | ".join(f"{base[k]:.3f}" for k in ("overall", *present))
            + " | – | – | – | – | – |"
        )
    for r in rows:
        h = r["heldout"]
        cells = [f"{h['overall'][0]:.3f} ± {h['overall'][1]:.3f}", *(f"{h[c][0]:.3f}" for c in present)]
        lines.append(
            f"| {r['variant']} | {r['guidance']:g} | "
            + " | ".join(cells)
            + f" | {r['reward_first']:.3f} → {r['reward_last']:.3f} | {r['queries']:.0f} | {r['wall_seconds']:.0f} | {r['rows_per_query']:.1f} | {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40, help="equal budget: epochs of 32 reward queries")
    parser.add_argument("--seconds", type=float, default=0.0, help="equal wall time per run (0: skip)")
    parser.add_argument("--out", required=True, help="folder for compare_flow.json and compare_flow.md")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def run(variant, seed, epochs, setting) -> dict:
        result = {**isolated(train_variant, variant, seed, epochs), "setting": setting}
        print(json.dumps(result), file=sys.stderr, flush=True)
        return result

    bases = {g: isolated(base_model, g) for g in sorted({guidance_of(v) for v in args.variants})}
    runs = [run(v, s, args.epochs, "budget") for v in args.variants for s in range(args.seeds)]
    if args.seconds > 0:
        for v in args.variants:
            epochs = epochs_within([r for r in runs if r["variant"] == v], args.seconds)
            runs += [run(v, s, epochs, "time") for s in range(args.seeds)]
    tables = [
        markdown(
            summarize(runs, "budget"),
            bases,
            f"Equal budget: {args.epochs * 32} reward queries, {args.seeds} seeds",
        )
    ]
    if args.seconds > 0:
        tables.append(
            markdown(
                summarize(runs, "time"), bases, f"Equal wall time: {args.seconds:.0f} s, {args.seeds} seeds"
            )
        )
    text = "\n\n".join(tables) + "\n"
    (out / "compare_flow.json").write_text(
        json.dumps({"base": {str(g): b for g, b in bases.items()}, "runs": runs}, indent=1)
    )
    (out / "compare_flow.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
