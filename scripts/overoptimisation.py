"""Reward over-optimisation on the toy world, in one command (issue #24; Gao et al. 2023, *Scaling
Laws for Reward Model Overoptimization*; Coste et al. 2024, *Reward Model Ensembles Help Mitigate
Overoptimization*).

A learned proxy (small CNNs fitted on a limited, noisy set of verifier labels,
``scripts/train_proxy_rewards.py``) stands in for a learned reward model; the exact verifier
(``shapes_alignment``) is the gold reward that the runs never optimise. Four arms, the same
config (``configs/overopt/single.yaml``) and budget, ``--seeds`` seeds each:

  single proxy        GRPO against one proxy member (member 0)
  single proxy + KL   the same with ``train.kl_beta`` (``--kl``)
  WCO ensemble        against the minimum over the members (worst-case optimisation)
  UWO ensemble        against mean − λ·variance over the members (``--uwo-lambda``)

Every ``eval.every`` epochs each run scores fixed evaluation seeds with the gold verifier
(``eval_verifier``) and with the single proxy (``eval_proxy``, the same yardstick for every arm).
The hacking monitor runs as in any run; its first flagged epoch is reported. Writes
``OUT/overopt.json``, ``OUT/overopt.md`` (the table) and ``OUT/overopt.png`` (verifier and proxy
per epoch, mean over seeds).

    python scripts/overoptimisation.py --out runs/overopt       # about 40 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "overopt" / "single.yaml"
ARMS = ("single proxy", "single proxy + KL", "WCO ensemble", "UWO ensemble")


def proxy_spec(weights: str, member: int, label: str) -> str:
    """One ``proxy`` member as a YAML reward entry."""
    return f"{{name: proxy, kwargs: {{weights: '{weights}', member: {member}}}, label: {label}}}"


def arm_overrides(arm: str, weights: str, members: int, args) -> list[str]:
    """Config overrides that turn the single-proxy config into ``arm``."""
    ensemble = ", ".join(proxy_spec(weights, k, f"m{k}") for k in range(members))
    return {
        "single proxy": ["reward.name=proxy", f"reward.kwargs={{weights: '{weights}', member: 0}}"],
        "single proxy + KL": [
            "reward.name=proxy",
            f"reward.kwargs={{weights: '{weights}', member: 0}}",
            f"train.kl_beta={args.kl}",
        ],
        "WCO ensemble": ["reward.name=ensemble", f"reward.kwargs={{objective: wco, rewards: [{ensemble}]}}"],
        "UWO ensemble": [
            "reward.name=ensemble",
            f"reward.kwargs={{objective: uwo, uncertainty_weight: {args.uwo_lambda}, rewards: [{ensemble}]}}",
        ],
    }[arm]


def run_arm(arm: str, seed: int, weights: str, members: int, args) -> Path:
    """One training run (in this process, one thread); returns its run folder."""
    import torch

    from diffrl.config import load_config
    from diffrl.trainer import train

    torch.set_num_threads(1)
    name = f"{arm.replace(' ', '_').replace('+', 'and')}_s{seed}"
    overrides = [
        *arm_overrides(arm, weights, members, args),
        f"eval.rewards=[{{name: shapes_alignment, label: verifier}}, {proxy_spec(weights, 0, 'proxy')}]",
        f"run.seed={seed}",
        f"run.num_epochs={args.epochs}",
        f"run.output_dir={args.out}/runs",
        f"run.name={name}",
        *args.overrides,
    ]
    train(load_config(CONFIG, overrides))
    return Path(args.out) / "runs" / name


def curves(run_dir: Path) -> dict:
    """The run's evaluation curves ``{epochs, verifier, proxy}`` and its first flagged epoch."""
    from diffrl.files import read_jsonl

    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval_verifier" in r]
    flagged = [r["epoch"] for r in rows if r.get("hacking")]
    return {
        "epochs": [r["epoch"] for r in evals],
        "verifier": [r["eval_verifier"] for r in evals],
        "proxy": [r["eval_proxy"] for r in evals],
        "first_flag": flagged[0] if flagged else None,
    }


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """Per arm, over its seeds: mean ± std of the evaluation proxy and verifier at the start and
    the end, the verifier's change, and the first flagged epoch of each seed."""

    def ms(values):
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    rows = []
    for arm, runs in results.items():
        rows.append(
            {
                "arm": arm,
                "proxy_start": ms([r["proxy"][0] for r in runs]),
                "proxy_end": ms([r["proxy"][-1] for r in runs]),
                "verifier_start": ms([r["verifier"][0] for r in runs]),
                "verifier_end": ms([r["verifier"][-1] for r in runs]),
                "verifier_change": ms([r["verifier"][-1] - r["verifier"][0] for r in runs]),
                "first_flags": [r["first_flag"] for r in runs],
            }
        )
    return rows


def markdown(rows: list[dict], seeds: int, epochs: int) -> str:
    def f(pair):
        return f"{pair[0]:.3f} ± {pair[1]:.3f}"

    lines = [
        f"| arm ({seeds} seeds, {epochs} epochs) | proxy: start → end | verifier: start → end | verifier change | first flagged epoch |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        flags = ", ".join("—" if e is None else str(e) for e in r["first_flags"])
        lines.append(
            f"| {r['arm']} | {f(r['proxy_start'])} → {f(r['proxy_end'])} | {f(r['verifier_start'])} → "
            f"{f(r['verifier_end'])} | {r['verifier_change'][0]:+.3f} ± {r['verifier_change'][1]:.3f} | {flags} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Verifier and proxy (mean over seeds) per epoch, one line per arm, side by side."""
    from PIL import Image

    from diffrl.files import line_chart, save_png

    panels = []
    for key, title in (("verifier", "verifier (gold) per epoch"), ("proxy", "single proxy per epoch")):
        series = {}
        for arm, runs in results.items():
            length = max(runs[0]["epochs"]) + 1
            values: list[float | None] = [None] * length
            for i, epoch in enumerate(runs[0]["epochs"]):
                values[epoch] = statistics.mean(r[key][i] for r in runs)
            series[arm] = values
        panels.append(line_chart(series, title))
    canvas = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * panel.width, 0))
    save_png(canvas, path)


def ensure_proxy(args) -> str:
    """The proxy ensemble file: ``--proxy`` if given, else fitted once into ``OUT/proxy.safetensors``."""
    if args.proxy:
        return args.proxy
    path = Path(args.out) / "proxy.safetensors"
    if not path.is_file():
        import subprocess
        import sys

        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "train_proxy_rewards.py"), "--out", str(path),
             "--members", str(args.members)],
            check=True,
        )  # fmt: skip
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--proxy", help="an existing proxy ensemble file (default: fit one into OUT)")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--kl", type=float, default=0.3, help="train.kl_beta of the KL arm")
    parser.add_argument("--uwo-lambda", type=float, default=5.0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="further config overrides of every run")  # fmt: skip
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    weights = ensure_proxy(args)

    jobs = [(arm, seed) for arm in args.arms for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {job: pool.submit(run_arm, *job, weights, args.members, args) for job in jobs}
        dirs = {job: future.result() for job, future in futures.items()}
    results = {arm: [curves(dirs[(arm, s)]) for s in range(args.seeds)] for arm in args.arms}
    rows = summarize(results)
    table = markdown(rows, args.seeds, args.epochs)
    out = Path(args.out)
    (out / "overopt.json").write_text(json.dumps({"results": results, "summary": rows}, indent=1))
    (out / "overopt.md").write_text(table)
    plot(results, out / "overopt.png")
    print(table)
    print(f"wrote {out / 'overopt.md'}, {out / 'overopt.json'}, {out / 'overopt.png'}")


if __name__ == "__main__":
    main()
