"""Evaluation of a pipeline or a trained run on a fixed, seeded prompt set: mean reward and its
standard error, exact-match rate (for rewards that report one), and diversity."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from diffrl.config import load_config
from diffrl.pipelines import inspect_pipeline, load_pipeline
from diffrl.rollout import sample_trajectories
from diffrl.transitions import denoiser
from diffrl.types import SamplerSettings


def check_model(name_or_run: str):
    """What :func:`load_for_eval` would load, found without loading weights (so a missing model
    or a run without weights fails first): ``(run config | None, trained weights folder | None)``.
    Raises :class:`~diffrl.errors.PipelineNotFoundError` or ``FileNotFoundError``."""
    run = Path(name_or_run)
    if not (run / "config.yaml").is_file():
        inspect_pipeline(name_or_run)
        return None, None
    config = load_config(run / "config.yaml")
    inspect_pipeline(config.model.pretrained, revision=config.model.revision)
    weights = next((run / name for name in ("lora", "unet", "transformer") if (run / name).is_dir()), None)
    if weights is None:
        raise FileNotFoundError(
            f"{run}: a run folder without trained weights (no lora/, unet/ or transformer/)"
        )
    return config, weights


def load_for_eval(name_or_run: str):
    """A pipeline by name/path, or a run folder's trained model: its base ``model.pretrained`` with
    ``lora/`` loaded through diffusers (or its fully fine-tuned ``unet/`` or ``transformer/``).
    Returns ``(pipe, run config | None)``."""
    config, weights = check_model(name_or_run)
    if config is None:
        return load_pipeline(name_or_run), None
    pipe = load_pipeline(config.model.pretrained, revision=config.model.revision)
    if weights.name == "lora":
        pipe.load_lora_weights(str(weights))
    else:
        setattr(pipe, weights.name, type(denoiser(pipe)).from_pretrained(str(weights)))
    return pipe, config


def diversity(images: torch.Tensor) -> float:
    """1 - mean pairwise cosine similarity of image features, ``[N, 3, H, W]`` -> float.

    Features are the images average-pooled to 16x16 and centred per image (so a shared
    background does not count as similarity). 0 when all images are equal.
    """
    n = images.shape[0]
    if n < 2:
        return 0.0
    features = F.adaptive_avg_pool2d(images.float(), 16).flatten(1)
    features = F.normalize(features - features.mean(dim=1, keepdim=True), dim=1)
    similarity = features @ features.T
    off_diagonal = (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))
    return float(1 - off_diagonal)


@torch.no_grad()
def evaluate(
    pipe,
    prompts: list[str],
    reward_fn,
    *,
    num_images: int,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    seed: int,
    batch_size: int = 32,
) -> dict:
    """Sample ``num_images`` images for ``prompts`` (cycled in order) from generator ``seed``; score them.

    Returns ``{"reward_mean", "reward_stderr", "exact_match" (or None), "diversity", "num_images",
    "attributes": {name: mean}}``.
    """
    chosen = [prompts[i % len(prompts)] for i in range(num_images)]
    generator = torch.Generator().manual_seed(seed)
    images, rewards, metadata = [], [], []
    for start in range(0, num_images, batch_size):
        batch = chosen[start : start + batch_size]
        traj = sample_trajectories(
            pipe,
            batch,
            SamplerSettings(num_steps=num_steps, guidance_scale=guidance_scale, eta=eta),
            generator=generator,
        )
        meta = [{} for _ in batch]
        rewards.append(reward_fn(traj.images, batch, meta))
        images.append(traj.images)
        metadata += meta
    rewards = torch.cat(rewards)
    keys = sorted({k for m in metadata for k, v in m.items() if isinstance(v, (int, float))})
    attributes = {k: sum(m[k] for m in metadata if k in m) / sum(k in m for m in metadata) for k in keys}
    return {
        "num_images": num_images,
        "reward_mean": rewards.mean().item(),
        "reward_stderr": (rewards.std().item() / math.sqrt(num_images)) if num_images > 1 else 0.0,
        "exact_match": attributes.pop("exact_match", None),
        "diversity": diversity(torch.cat(images)),
        "attributes": attributes,
    }


def markdown_table(rows: dict[str, dict]) -> str:
    """Results of :func:`evaluate` for several models as one markdown table."""
    names = sorted({a for r in rows.values() for a in r["attributes"]})
    head = ["model", "reward (± s.e.)", "exact match", "diversity", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in rows.items():
        exact = "—" if r["exact_match"] is None else f"{r['exact_match']:.3f}"
        cells = [
            model,
            f"{r['reward_mean']:.4f} ± {r['reward_stderr']:.4f}",
            exact,
            f"{r['diversity']:.3f}",
            *(f"{r['attributes'].get(n, float('nan')):.3f}" for n in names),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SUITES = {"toy-geneval": "the toy world's GenEval rows (toyworld.geneval_rows('heldout'))"}


def load_suite(name_or_file: str) -> list[dict]:
    """A GenEval suite: ``toy-geneval`` or a GenEval-layout JSONL file (:func:`diffrl.geneval.read_suite`)."""
    from diffrl import geneval, toyworld

    if name_or_file == "toy-geneval":
        return toyworld.geneval_rows("heldout")
    return geneval.read_suite(name_or_file)


def suite_detector(name: str):
    """``(detector, thresholds)`` for :func:`evaluate_suite`: ``toy``, the toy world's detector
    (:func:`diffrl.rewards.shapes.detect_batch`) at its thresholds, or ``owlv2``, OWLv2 boxes and
    CLIP colours for real images at GenEval's (0.9 counting, 0.3 otherwise)."""
    if name == "toy":
        from diffrl.rewards.shapes import TOY_THRESHOLDS, detect_batch

        return detect_batch, TOY_THRESHOLDS
    from diffrl.rewards.geneval_detector import owlv2_detector, rows_detector

    return rows_detector(owlv2_detector()), (0.9, 0.3)


@torch.no_grad()
def evaluate_suite(
    pipe,
    rows: list[dict],
    detector,
    thresholds: tuple[float, float],
    settings: SamplerSettings,
    *,
    images_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    sample=None,
) -> dict:
    """GenEval on ``pipe``: each row's prompt sampled ``images_per_prompt`` times (one generator
    seeded ``seed``, prompts in file order; by ``sample(prompts, generator) -> images [B, 3, H, W]``
    when given, e.g. a guided sampler, else by the pipeline's own sampler with ``settings``), ``detector(images [B, 3, H, W], rows) -> detections
    per image`` (the rows name the classes an open-vocabulary detector is asked for), GenEval's rule per image (:func:`diffrl.geneval.correct` after
    :func:`~diffrl.geneval.select` with ``thresholds``). Returns the per-task table of
    :func:`~diffrl.geneval.summarize` plus ``partial_credit`` (the mean training reward)."""
    from diffrl import geneval

    chosen = [row for row in rows for _ in range(images_per_prompt)]
    generator = torch.Generator().manual_seed(seed)
    flags, credits = [], []
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start : start + batch_size]
        prompts = [r["prompt"] for r in batch]
        images = (
            sample(prompts, generator)
            if sample is not None
            else sample_trajectories(pipe, prompts, settings, generator=generator).images
        )
        for row, detections in zip(batch, detector(images, batch)):
            by_class = geneval.select(detections, row["tag"], thresholds)
            flags.append(geneval.correct(by_class, row)[0])
            credits.append(geneval.partial_credit(by_class, row))
    table = geneval.summarize([r["tag"] for r in chosen], flags)
    table["partial_credit"] = sum(credits) / len(credits)
    return table


def toy_geneval_heldout(
    pipe,
    guidance_scale: float,
    num_steps: int = 20,
    images_per_prompt: int = 8,
    seed: int = 0,
    *,
    eta: float = 0.0,
    sample=None,
) -> dict:
    """Toy-GenEval on its held-out rows with the toy detector: accuracy per task, ``overall`` (the
    tasks' mean) and ``partial_credit``, sampled by the Euler ODE / DDIM at ``eta`` 0 (Flow-GRPO's
    evaluation; or ``sample``, as in :func:`evaluate_suite`) with ``guidance_scale`` from one
    generator seeded ``seed``."""
    from diffrl.rewards.shapes import TOY_THRESHOLDS, detect_batch

    settings = SamplerSettings(num_steps=num_steps, guidance_scale=guidance_scale, eta=eta)
    table = evaluate_suite(
        pipe, load_suite("toy-geneval"), detect_batch, TOY_THRESHOLDS, settings,
        images_per_prompt=images_per_prompt, seed=seed, sample=sample,
    )  # fmt: skip
    return {k: (v["accuracy"] if isinstance(v, dict) else v) for k, v in table.items()}
