"""Every method on Toy-GenEval, at an equal budget of reward queries and at equal wall time, and the
papers' claims checked against the measurements (issue #25).

Task: Toy-GenEval's training prompts (``toy_train_geneval``) with its partial-credit reward
(``toy_geneval``); each method trains with its own tiny config's sampler (4-8 steps: the denoising
reduction) and is scored on the held-out Toy-GenEval rows, per category and overall, with 20
steps of the deterministic sampler (DDIM / Euler ODE, eta 0; the LCM: its own 4 steps) and 8 images
per row from one fixed evaluation seed, so the seeds vary training only. Methods and models:

  tiny (DDIM)      DDPO, GRPO, D3PO, B²-DiffuRL, Diffusion-DPO, SePPO, RAFT
  tiny-lcm         RLCM
  tiny-flow (SD3)  Flow-GRPO, Flow-GRPO with a random SDE window, DiffusionNFT, RAFT
  sampling time    SVDD-PM, best-of-N, SMC on tiny (M = N = ``--M``, the reward as the value)

What a reward query buys: an image sampled and scored in an online epoch; for Diffusion-DPO and
SePPO one of the 4 scored samples per training prompt their pairs are chosen from (then their
configs' epochs); for the sampling-time methods a reward evaluation while sampling (reported per
image; they train nothing). Equal wall time (``--seconds`` S): each training method gets the epochs
that its equal-budget runs say fit into S. Each run is its own process (``--jobs`` at a time, one
thread each): peak memory is that process's (resident set on CPU), model calls are latent rows
through the UNet / transformer per reward query.

The claims (``CLAIMS``) are checked on these runs and on three small extra experiments: SVDD-PM
against best-of-N on JPEG compressibility, DDPO against B²-DiffuRL on the strict 0/1 GenEval
reward, Flow-GRPO trained with 20 instead of 8 steps; the reward-ensemble claim reads
``scripts/overoptimisation.py``'s result (``--overopt``: its ``overopt.json``, or a folder to run
it into). Each run's result is appended to ``OUT/runs.jsonl`` as it finishes, and a rerun into
the same folder continues after them; then ``OUT/compare.json`` and ``OUT/compare.md`` (the
tables the README shows) are written.

    python scripts/compare.py --out docs/compare --overopt docs/compare/overopt --readme README.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from compare_flow import VARIANTS, count_model_rows, epochs_within, mean_se
from measure import isolated_many, queries_per_epoch

ROOT = Path(__file__).resolve().parent.parent
TOY = ("prompts.source=toy_train_geneval", "reward.name=toy_geneval")
UNET_LORA = "model.lora_target_modules=[to_q, to_k, to_v, to_out.0]"
EVAL_STEPS, EVAL_IMAGES, EVAL_SEED = 20, 8, 0
SAMPLES_PER_PROMPT = 4
"""Offline data: images scored per training prompt to choose a pair from."""
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HEADERS = ("Single", "Two", "Counting", "Colors", "Position", "Attribution")


@dataclass(frozen=True)
class Method:
    model: str
    kind: str
    """online (an epoch samples and scores), offline (scored pairs first) or guided (sampling time)."""
    config: str = ""
    overrides: tuple[str, ...] = field(default=())


METHODS: dict[str, Method] = {
    "DDPO": Method("tiny", "online", "ddpo/tiny_alignment.yaml", TOY),
    "GRPO (DDIM)": Method("tiny", "online", "grpo/tiny_geneval.yaml"),
    "D3PO": Method("tiny", "online", "d3po/tiny_alignment.yaml", TOY),
    "B²-DiffuRL": Method("tiny", "online", "b2diffurl/tiny_alignment.yaml", TOY),
    "Diffusion-DPO": Method("tiny", "offline", "dpo/tiny_alignment.yaml"),
    "SePPO": Method("tiny", "offline", "seppo/tiny_alignment.yaml"),
    "RAFT (DDIM)": Method(
        "tiny", "online", "raft/tiny_flow_geneval.yaml", ("model.pretrained=tiny", UNET_LORA)
    ),
    "RLCM": Method("tiny-lcm", "online", "rlcm/tiny_alignment.yaml", TOY),
    "Flow-GRPO": Method("tiny-flow", "online", VARIANTS["GRPO (full)"][0], tuple(VARIANTS["GRPO (full)"][1])),
    "Flow-GRPO, random window": Method(
        "tiny-flow", "online", VARIANTS["GRPO, random window"][0], tuple(VARIANTS["GRPO, random window"][1])
    ),
    "DiffusionNFT": Method("tiny-flow", "online", "nft/tiny_flow_geneval.yaml"),
    "RAFT (flow)": Method("tiny-flow", "online", "raft/tiny_flow_geneval.yaml"),
    "SVDD-PM": Method("tiny", "guided"),
    "best-of-N": Method("tiny", "guided"),
    "SMC": Method("tiny", "guided"),
}
REUSABLE = {
    "GRPO (full)": "Flow-GRPO",
    "GRPO, random window": "Flow-GRPO, random window",
    "NFT": "DiffusionNFT",
}
"""compare_flow.py variants that are the same runs as rows here (same configs, budget, evaluation)."""
EXTRAS = {
    "DDPO, strict reward": ("DDPO", ("reward.kwargs={strict: true}",)),
    "B²-DiffuRL, strict reward": ("B²-DiffuRL", ("reward.kwargs={strict: true}",)),
    "Flow-GRPO, 20 training steps": ("Flow-GRPO", ("sample.num_steps=20",)),
}
"""Claim experiments: name -> (method whose config it starts from, further overrides)."""


def config_of(method: str, seed: int, out: str, epochs: int | None, extra: tuple[str, ...] = (), data=None):
    """The method's tiny config on the comparison's task and seed (``epochs`` None: the config's)."""
    from diffrl.config import load_config

    m = METHODS[method]
    overrides = [
        *m.overrides, *extra, f"run.seed={seed}", "run.save_freq=1000000", f"run.output_dir={out}",
        "run.name=run", "monitor.enabled=false", *([f"run.num_epochs={epochs}"] if epochs else []),
    ]  # fmt: skip
    if m.kind == "offline":
        overrides += [*TOY, f"dpo.data={data}", "run.save_freq=1", "run.keep_last=7"]
    return load_config(ROOT / "configs" / m.config, overrides)


def eval_settings(method: str, config=None) -> tuple[int, float]:
    """(steps, guidance) the held-out evaluation samples with: 20 (the LCM: its own) at the
    guidance the method trains with."""
    if config is None:
        return EVAL_STEPS, 5.0
    steps = config.sample.num_steps if METHODS[method].model == "tiny-lcm" else EVAL_STEPS
    return steps, config.sample.guidance_scale


def held_out(pipe, steps: int, guidance: float, seed: int = EVAL_SEED, **kwargs) -> dict:
    from diffrl.evaluation import toy_geneval_heldout

    return toy_geneval_heldout(pipe, guidance, steps, EVAL_IMAGES, seed, **kwargs)


def build_pairs(seed: int, out: Path, queries: int) -> tuple[str, int]:
    """Diffusion-DPO/SePPO data from ``queries`` scored samples of Toy-GenEval training prompts;
    returns (folder, queries used)."""
    from build_tiny_preferences import write_toy_preferences

    from diffrl.pipelines import load_pipeline
    from diffrl.prompts import load_prompts

    prompts = load_prompts("toy_train_geneval").prompts
    count = max(1, queries // SAMPLES_PER_PROMPT)
    chosen = [prompts[(seed * 7919 + i) % len(prompts)] for i in range(count)]
    write_toy_preferences(
        load_pipeline("tiny"), chosen, out, samples=SAMPLES_PER_PROMPT, num_steps=4, winners="best",
        seed=seed, reward="toy_geneval",
    )  # fmt: skip
    return str(out), count * SAMPLES_PER_PROMPT


def train_method(
    method: str, seed: int, budget: int, epochs: int | None, extra: tuple[str, ...] = ()
) -> dict:
    """One training run (in its own process): ``epochs`` given, or as many as ``budget`` reward
    queries buy; then its held-out evaluation."""
    import torch

    from diffrl.files import read_jsonl
    from diffrl.trainer import train

    torch.manual_seed(seed)
    rows = count_model_rows()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        data, queries = None, 0
        if METHODS[method].kind == "offline":
            data, queries = build_pairs(seed, Path(out) / "pairs", budget)
        config = config_of(method, seed, out, None, extra, data)
        if epochs is None and METHODS[method].kind == "online":
            epochs = max(1, budget // queries_per_epoch(config))
        config = config_of(method, seed, out, epochs, extra, data)
        pipe = train(config)
        wall = time.perf_counter() - start
        calls = rows[0]
        records = read_jsonl(Path(out) / "run" / "metrics.jsonl")
        heldout = held_out(pipe, *eval_settings(method, config))
    if METHODS[method].kind == "online":
        queries = sum(r.get("num_samples", 0) + r.get("num_dropped", 0) for r in records)
    timed = [r.get("time_sampling", 0) + r.get("time_reward", 0) + r["time_training"] for r in records]
    return {
        "epochs": config.run.num_epochs, "queries": queries, "wall_seconds": wall,
        "epoch_seconds": statistics.median(timed[1:] or timed), "model_rows": calls,
        "rows_per_query": calls / max(1, queries), "guidance": config.sample.guidance_scale,
        "eval_steps": eval_settings(method, config)[0], "model": METHODS[method].model, "heldout": heldout,
    }  # fmt: skip


def guided_sampler(method: str, pipe, reward_fn, m: int, settings, counts: dict):
    """``sample(prompts, generator) -> images`` of a sampling-time method, adding its UNet calls and
    reward queries to ``counts``."""
    from diffrl.guidance import svdd

    def sample(prompts, generator):
        if method == "best-of-N":
            out = svdd.best_of_n(pipe, prompts, reward_fn, settings, n=m, generator=generator)
            queries = len(prompts) * m
        else:
            value = svdd.posterior_mean_value(reward_fn)
            if method == "SVDD-PM":
                out = svdd.svdd(pipe, prompts, value, settings, num_candidates=m, generator=generator)
            else:
                out = svdd.smc(pipe, prompts, value, settings, num_particles=m, generator=generator)
            queries = len(prompts) * m * (settings.num_steps - 1)
        counts["rows"] += out.unet_calls
        counts["queries"] += queries
        counts["images"] += len(prompts)
        return out.images

    return sample


def guided_method(method: str, seed: int, m: int, reward: str = "toy_geneval") -> dict:
    """A sampling-time method on the held-out rows (20 DDIM steps, eta 1, guidance 5) from
    evaluation seed ``seed``; with another ``reward``, its mean on the held-out one-object prompts."""
    from diffrl import rewards
    from diffrl.pipelines import load_pipeline
    from diffrl.types import SamplerSettings

    pipe, reward_fn = load_pipeline("tiny"), rewards.get(reward)
    settings = SamplerSettings(num_steps=EVAL_STEPS, guidance_scale=5.0, eta=1.0)
    counts = {"rows": 0, "queries": 0, "images": 0}
    sample = guided_sampler(method, pipe, reward_fn, m, settings, counts) if m > 1 else None
    start = time.perf_counter()
    if reward == "toy_geneval":
        result = {"heldout": held_out(pipe, EVAL_STEPS, 5.0, seed, eta=1.0, sample=sample)}
    else:
        result = {"reward": smooth_reward(pipe, reward_fn, settings, sample, seed)}
    return {
        **result, "wall_seconds": time.perf_counter() - start, "guidance": 5.0, "eval_steps": EVAL_STEPS,
        "queries_per_image": counts["queries"] / max(1, counts["images"]),
        "rows_per_image": counts["rows"] / max(1, counts["images"]),
    }  # fmt: skip


def smooth_reward(pipe, reward_fn, settings, sample, seed: int, count: int = 64) -> float:
    """Mean ``reward_fn`` of ``count`` held-out one-object images from ``sample`` (None: plain)."""
    import torch

    from diffrl.prompts import load_prompts
    from diffrl.rollout import sample_trajectories

    prompts = load_prompts("toy_heldout_single").prompts
    chosen = [prompts[i % len(prompts)] for i in range(count)]
    generator = torch.Generator().manual_seed(1000 + seed)
    images = (
        sample(chosen, generator)
        if sample
        else sample_trajectories(pipe, chosen, settings, generator=generator).images
    )
    return reward_fn(images, chosen, [{} for _ in chosen]).mean().item()


def base_model(model: str, steps: int, guidance: float, eta: float = 0.0) -> dict:
    from diffrl.pipelines import load_pipeline

    return {"heldout": held_out(load_pipeline(model), steps, guidance, eta=eta)}


def reused_runs(path: Path, budget: int) -> list[dict]:
    """compare_flow.py's equal-budget runs of the variants that are rows here."""
    runs = json.loads(path.read_text())["runs"]
    return [
        {**r, "method": REUSABLE[r["variant"]], "model_rows": r["transformer_rows"], "eval_steps": EVAL_STEPS,
         "model": "tiny-flow", "reused_from": str(path)}
        for r in runs
        if r["variant"] in REUSABLE and r["setting"] == "budget" and r["queries"] == budget
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------- tables


def base_key(model: str, steps: int, guidance: float, eta: float = 0.0) -> str:
    return f"{model}|{steps}|{guidance:g}|{eta:g}"


def row_of(runs: list[dict]) -> dict:
    """Mean ± standard error over seeds of the held-out scores; means of the costs."""
    keys = runs[0]["heldout"].keys()
    costs = ("queries", "wall_seconds", "rows_per_query", "peak_memory_mb", "epochs", "queries_per_image",
             "rows_per_image")  # fmt: skip
    return {
        "heldout": {k: mean_se([r["heldout"][k] for r in runs]) for k in keys},
        **{k: statistics.mean(r[k] for r in runs) for k in costs if runs[0].get(k) is not None},
        "seeds": len(runs),
    }


def table(runs: list[dict], bases: dict, setting: str, title: str) -> tuple[list[dict], str]:
    """Flow-GRPO Table 2's layout: model, overall, the six tasks; then the costs."""
    lines = [
        f"**{title}**",
        "",
        "| model | method | Overall | " + " | ".join(HEADERS) + " | reward queries | wall (s) | model rows / query | peak MB |",
        "|---|---|---|" + "---|" * len(HEADERS) + "---|---|---|---|",
    ]  # fmt: skip
    rows = []
    for key, base in bases.items():
        model, steps, guidance, eta = key.split("|")
        h = base["heldout"]
        sampler = f"{steps} steps, guidance {guidance}" + (", η 1" if eta == "1" else "")
        lines.append(
            f"| {model} ({sampler}) | base | {h['overall']:.3f} | "
            + " | ".join(f"{h[c]:.3f}" for c in CATEGORIES)
            + " | – | – | – | – |"
        )
    for method, m in METHODS.items():
        mine = [r for r in runs if r["method"] == method and r["setting"] in (setting, "sampling")]
        if not mine:
            continue
        row = {"method": method, "model": m.model, **row_of(mine)}
        rows.append(row)
        h = row["heldout"]
        if m.kind == "guided":
            queries, per = f"{row['queries_per_image']:.0f} / image", f"{row['rows_per_image']:.0f} / image"
        else:
            queries, per = f"{row['queries']:.0f}", f"{row['rows_per_query']:.1f}"
        lines.append(
            f"| {m.model} | {method} | {h['overall'][0]:.3f} ± {h['overall'][1]:.3f} | "
            + " | ".join(f"{h[c][0]:.3f}" for c in CATEGORIES)
            + f" | {queries} | {row['wall_seconds']:.0f} | {per} | {row['peak_memory_mb']:.0f} |"
        )
    return rows, "\n".join(lines)


# ---------------------------------------------------------------------------------------- claims


def difference(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """a − b with the standard error of independent means."""
    return a[0] - b[0], (a[1] ** 2 + b[1] ** 2) ** 0.5


def verdict(d: tuple[float, float], kind: str = "greater") -> str:
    """``greater``: d > 2 s.e. holds; ``equal``: |d| ≤ 2 s.e. holds."""
    if kind == "equal":
        return "holds" if abs(d[0]) <= 2 * d[1] else "does not hold here"
    if d[0] > 2 * d[1]:
        return "holds"
    return "does not hold here (within noise)" if d[0] > -2 * d[1] else "does not hold here (reversed)"


def testable(gains: list[tuple[float, float]], because: str) -> str | None:
    """None when one of the effects a claim compares (gains over a baseline) exceeds 2 standard
    errors, else the verdict that the claim cannot be tested here, ``because``."""
    return None if any(g[0] > 2 * g[1] for g in gains) else f"not testable here: {because}"


def gain(row: dict, bases: dict) -> tuple[float, float]:
    """Held-out overall after training minus the base model's with the same evaluation sampler."""
    key = base_key(row["model"], int(row["eval_steps"]), row["guidance"])
    return row["heldout"]["overall"][0] - bases[key]["heldout"]["overall"], row["heldout"]["overall"][1]


def f(pair) -> str:
    return f"{pair[0]:+.3f} ± {pair[1]:.3f}"


def claims(runs: list[dict], bases: dict, overopt: dict | None) -> list[dict]:
    """One dict per claim: claim, source, measurement, verdict."""

    def rows(method, setting="budget"):
        mine = [r for r in runs if r["method"] == method and r["setting"] in (setting, "sampling")]
        return {
            "method": method,
            **row_of(mine),
            **{k: mine[0][k] for k in ("guidance", "eval_steps", "model")},
        }

    out = []
    smooth = {m: mean_se([r["reward"] for r in runs if r["method"] == m and r["setting"] == "smooth"])
              for m in ("SVDD-PM", "best-of-N", "plain")}  # fmt: skip
    d = difference(smooth["SVDD-PM"], smooth["best-of-N"])
    out.append({
        "claim": "SVDD-PM beats best-of-N at equal compute on a smooth reward",
        "source": "Li et al. 2024 (SVDD), Table 1: compressibility",
        "measurement": f"JPEG compressibility, 64 held-out one-object images, M = N = {runs_arg(runs, 'M')}: "
        f"SVDD-PM {smooth['SVDD-PM'][0]:.3f}, best-of-N {smooth['best-of-N'][0]:.3f}, plain "
        f"{smooth['plain'][0]:.3f}; difference {f(d)}",
        "verdict": testable([difference(smooth[m], smooth["plain"]) for m in ("SVDD-PM", "best-of-N")],
                            "neither beats plain sampling") or verdict(d),
    })  # fmt: skip
    sparse = {m: gain(rows(f"{m}, strict reward"), bases) for m in ("DDPO", "B²-DiffuRL")}
    d = difference(sparse["B²-DiffuRL"], sparse["DDPO"])
    out.append({
        "claim": "B²-DiffuRL beats DDPO on sparse rewards",
        "source": "Hu et al. 2025 (B²-DiffuRL), Sec. 5",
        "measurement": f"held-out overall gain trained on the strict 0/1 GenEval reward at equal budget: "
        f"B²-DiffuRL {f(sparse['B²-DiffuRL'])}, DDPO {f(sparse['DDPO'])}; difference {f(d)}",
        "verdict": testable(list(sparse.values()), "neither raises the held-out score at this budget")
        or verdict(d),
    })  # fmt: skip
    ddpo, rlcm = rows("DDPO"), rows("RLCM")
    d = difference(rlcm["heldout"]["overall"], ddpo["heldout"]["overall"])
    ratio = rlcm["wall_seconds"] / ddpo["wall_seconds"]
    holds = d[0] > -2 * d[1] and ratio < 0.5
    out.append({
        "claim": "RLCM reaches DDPO's reward with far less compute",
        "source": "Oertell et al. 2024 (RLCM), Fig. 3",
        "measurement": f"equal budget: RLCM held-out overall {rlcm['heldout']['overall'][0]:.3f} in "
        f"{rlcm['wall_seconds']:.0f} s, DDPO {ddpo['heldout']['overall'][0]:.3f} in {ddpo['wall_seconds']:.0f} s "
        f"(wall ratio {ratio:.2f}; difference {f(d)}); gains over their own base: RLCM {f(gain(rlcm, bases))}, "
        f"DDPO {f(gain(ddpo, bases))}",
        "verdict": testable([gain(ddpo, bases)], "DDPO does not raise the held-out score at this budget")
        or ("holds" if holds else "does not hold here"),
    })  # fmt: skip
    d3po = rows("D3PO")
    d = difference(gain(d3po, bases), gain(ddpo, bases))
    out.append({
        "claim": "D3PO ≈ DDPO without a reward model",
        "source": "Yang et al. 2024 (D3PO), Sec. 5.1",
        "measurement": f"held-out overall gain at equal budget (D3PO from the reward's pairwise preferences only): "
        f"D3PO {f(gain(d3po, bases))}, DDPO {f(gain(ddpo, bases))}; difference {f(d)}",
        "verdict": testable([gain(ddpo, bases)], "DDPO does not raise the held-out score at this budget")
        or verdict(d, "equal"),
    })  # fmt: skip
    eight, twenty = rows("Flow-GRPO"), rows("Flow-GRPO, 20 training steps")
    d = difference(eight["heldout"]["overall"], twenty["heldout"]["overall"])
    out.append({
        "claim": "Flow-GRPO's denoising reduction costs no final reward",
        "source": "Liu et al. 2025 (Flow-GRPO), Sec. 4.3, Fig. 6",
        "measurement": f"held-out overall (20-step ODE) after equal epochs trained with 8 steps "
        f"{eight['heldout']['overall'][0]:.3f} in {eight['wall_seconds']:.0f} s vs 20 steps "
        f"{twenty['heldout']['overall'][0]:.3f} in {twenty['wall_seconds']:.0f} s; difference {f(d)}",
        "verdict": testable([gain(twenty, bases)], "training with 20 steps does not raise it either")
        or ("holds" if d[0] > -2 * d[1] else "does not hold here"),
    })  # fmt: skip
    nft, grpo = rows("DiffusionNFT"), rows("Flow-GRPO")
    d = difference(gain(nft, bases), gain(grpo, bases))
    out.append({
        "claim": "DiffusionNFT is more sample-efficient than Flow-GRPO",
        "source": "Zheng et al. 2025 (DiffusionNFT), Fig. 1",
        "measurement": f"held-out overall gain at an equal budget of {nft['queries']:.0f} reward queries: "
        f"NFT {f(gain(nft, bases))}, Flow-GRPO {f(gain(grpo, bases))}; difference {f(d)}",
        "verdict": testable([gain(nft, bases), gain(grpo, bases)], "neither gains at this budget") or verdict(d),
    })  # fmt: skip
    if overopt is not None:
        ends = {arm: mean_se([r["verifier"][-1] for r in runs_]) for arm, runs_ in overopt["results"].items()}
        starts = mean_se([r["verifier"][0] for r in overopt["results"]["single proxy"]])
        epochs = overopt["results"]["single proxy"][0]["epochs"][-1]
        best = max(("WCO ensemble", "UWO ensemble"), key=lambda a: ends[a][0])
        d = difference(ends[best], ends["single proxy"])
        out.append({
            "claim": "Reward-model ensembles (WCO, UWO) reduce over-optimisation",
            "source": "Coste et al. 2024, Sec. 5",
            "measurement": f"verifier after {epochs} GRPO epochs on a learned proxy: single {ends['single proxy'][0]:.3f}, "
            f"WCO {ends['WCO ensemble'][0]:.3f}, UWO {ends['UWO ensemble'][0]:.3f}, single + KL "
            f"{ends['single proxy + KL'][0]:.3f}; best ensemble − single {f(d)}",
            "verdict": testable([difference(starts, ends["single proxy"])], "the single proxy is not over-optimised")
            or verdict(d),
        })  # fmt: skip
    return out


def runs_arg(runs: list[dict], key: str):
    return next(r[key] for r in runs if key in r)


def claims_markdown(rows: list[dict]) -> str:
    lines = ["| claim | source | measured here (mean ± s.e., 3 seeds) | verdict |", "|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['source']} | {c['measurement']} | {c['verdict']} |" for c in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def plan(args) -> tuple[list[tuple], list[tuple]]:
    """(jobs, their labels): the base models, every equal-budget run, the guided and claim runs."""
    jobs, labels = [], []

    def add(label, *call):
        jobs.append(call)
        labels.append(label)

    evals = {("tiny", EVAL_STEPS, 5.0, 0.0), ("tiny", EVAL_STEPS, 5.0, 1.0), ("tiny-flow", EVAL_STEPS, 5.0, 0.0),
             ("tiny-flow", EVAL_STEPS, 1.0, 0.0), ("tiny-lcm", 4, 5.0, 0.0)}  # fmt: skip
    for key in sorted(evals):
        add(("base", base_key(*key)), base_model, *key)
    reused = {r["method"] for r in args.reused}
    for seed in range(args.seeds):  # seed-major: an interrupted comparison has every method's first seeds
        for method in args.methods:
            if METHODS[method].kind == "guided":
                add((method, "sampling", seed), guided_method, method, EVAL_SEED + seed, args.M)
            elif method not in reused:
                add((method, "budget", seed), train_method, method, seed, args.budget, None)
        if args.claims:
            for method, m in (("SVDD-PM", args.M), ("best-of-N", args.M), ("plain", 1)):
                add((method, "smooth", seed), guided_method, method, seed, m, "jpeg_compressibility")
            for name, (method, extra) in EXTRAS.items():
                add((name, "budget", seed), train_method, method, seed, args.budget, None, extra)
    return jobs, labels


def execute(calls: list[tuple], labels: list[tuple], args, log: Path) -> list[dict]:
    """Run the ``calls`` whose label ``log`` (append-only JSONL) does not hold yet, appending each
    result as it finishes (a failed run is printed and left out, so a rerun retries it); returns
    the logged results of every label that has one."""
    from diffrl.files import append_jsonl, read_jsonl

    finished = {tuple(r["label"]): r for r in read_jsonl(log)} if log.is_file() else {}
    todo = [(call, label) for call, label in zip(calls, labels) if label not in finished]

    def done(index: int, result: dict) -> None:
        label = todo[index][1]
        if "error" in result:
            print(f"compare: {label} failed: {result['error']}", file=sys.stderr, flush=True)
            return
        finished[label] = {"label": list(label), **result}
        append_jsonl(log, finished[label])
        print(
            json.dumps({k: v for k, v in finished[label].items() if k != "heldout"}),
            file=sys.stderr,
            flush=True,
        )

    isolated_many([call for call, _ in todo], args.jobs, done)
    return [finished[label] for label in labels if label in finished]


BEGIN, END = "<!-- compare.py: begin -->", "<!-- compare.py: end -->"


def update_readme(path: Path, text: str) -> None:
    """Replace what stands between the ``BEGIN`` and ``END`` markers of ``path`` with ``text``
    (written atomically; a file without both markers is refused, naming them)."""
    from diffrl.files import atomic_write_bytes

    page = path.read_text()
    if BEGIN not in page or END not in page:
        raise SystemExit(f"compare: {path} has no {BEGIN} ... {END} block to write the tables into")
    head, rest = page.split(BEGIN, 1)
    atomic_write_bytes(path, f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}".encode())


def as_run(result: dict, M: int) -> dict:
    method, setting, seed = result["label"]
    return {"method": method, "setting": setting, "seed": seed, "M": M, **result}


def load_overopt(path: Path) -> dict:
    """``overoptimisation.py``'s result: ``path`` itself when it is a ``.json`` file, else the
    ``overopt.json`` of the folder ``path``, which that script is first run into unless an earlier
    run finished there."""
    if path.suffix != ".json":
        if not (path / "overopt.json").is_file():
            script = ROOT / "scripts" / "overoptimisation.py"
            subprocess.run([sys.executable, str(script), "--out", str(path)], check=True)
        path = path / "overopt.json"
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=1280, help="reward queries per training run")
    parser.add_argument("--seconds", type=float, default=60.0, help="equal wall time per run (0: skip)")
    parser.add_argument("--M", type=int, default=4, help="SVDD-PM candidates, best-of-N's N, SMC particles")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--no-claims", dest="claims", action="store_false", help="skip the claim experiments")
    parser.add_argument(
        "--overopt",
        default=None,
        help="overoptimisation.py's overopt.json, or a folder to run it into (default: skip that claim)",
    )
    parser.add_argument("--reuse", default=None, help="a compare_flow.json whose equal-budget runs to reuse")
    parser.add_argument("--readme", default=None, help=f"a page whose {BEGIN} block receives the tables")
    parser.add_argument(
        "--out",
        required=True,
        help="folder for runs.jsonl, compare.json and compare.md; "
        "a rerun into it continues after the runs its runs.jsonl holds",
    )
    args = parser.parse_args()  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    args.reused = reused_runs(Path(args.reuse), args.budget) if args.reuse else []

    jobs, labels = plan(args)
    results = execute(jobs, labels, args, log)
    bases = {r["label"][1]: r for r in results if r["label"][0] == "base"}
    runs = [as_run(r, args.M) for r in results if r["label"][0] != "base"]
    runs += [{**r, "setting": "budget"} for r in args.reused]
    if args.seconds > 0:
        timed, timed_labels = [], []
        for method in args.methods:
            budget_runs = [r for r in runs if r["method"] == method and r["setting"] == "budget"]
            if METHODS[method].kind != "guided" and budget_runs:
                epochs = epochs_within(budget_runs, args.seconds)
                for seed in range(args.seeds):
                    timed.append((train_method, method, seed, args.budget, epochs))
                    timed_labels.append((method, "time", seed))
        runs += [as_run(r, args.M) for r in execute(timed, timed_labels, args, log)]
    overopt = load_overopt(Path(args.overopt)) if args.overopt else None
    budget_rows, budget_md = table(
        runs, bases, "budget", f"Equal budget: {args.budget} reward queries, {args.seeds} seeds"
    )
    text = [budget_md]
    tables = {"budget": budget_rows}
    if args.seconds > 0:
        tables["time"], md = table(
            runs, bases, "time", f"Equal wall time: {args.seconds:.0f} s, {args.seeds} seeds"
        )
        text.append(md)
    checked = claims(runs, bases, overopt) if args.claims else []
    if checked:
        text.append("**The papers' claims**\n\n" + claims_markdown(checked))
    (out / "compare.md").write_text("\n\n".join(text) + "\n")
    if args.readme:
        update_readme(Path(args.readme), "\n\n".join(text) + "\n")
    (out / "compare.json").write_text(
        json.dumps({"args": {k: v for k, v in vars(args).items() if k != "reused"}, "bases": bases,
                    "tables": tables, "claims": checked, "runs": runs}, indent=1)
    )  # fmt: skip
    print("\n\n".join(text))


if __name__ == "__main__":
    main()
