"""The shipped tiny toy-world model: it loads like Stable Diffusion, draws the toy world, and DDPO
against the verifier improves it."""

from pathlib import Path

import pytest
from diffusers import DDIMScheduler, StableDiffusionPipeline

from diffrl import load_pipeline, rewards
from diffrl.cli import resolve_train_config
from diffrl.evaluation import evaluate
from diffrl.pipelines import SHIPPED_PIPELINES
from diffrl.prompts import load_prompts
from diffrl.trainer import train

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("tiny")


def test_shipped_weights_are_small_safetensors_loaded_through_from_pretrained(tiny):
    folder = SHIPPED_PIPELINES["tiny"]
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert {p.parent.name for p in folder.rglob("*.safetensors")} == {"unet", "vae", "text_encoder"}
    assert not list(folder.rglob("*.bin"))
    assert isinstance(tiny, StableDiffusionPipeline) and isinstance(tiny.scheduler, DDIMScheduler)
    assert tiny.tokenizer.tokenize("a small red circle on the left") == [
        "a</w>",
        "small</w>",
        "red</w>",
        "circle</w>",
        "on</w>",
        "the</w>",
        "left</w>",
    ]


def test_shipped_model_draws_the_toy_world(tiny):
    prompts = load_prompts("toy_heldout_single").prompts
    result = evaluate(
        tiny,
        prompts,
        rewards.get("shapes_alignment"),
        num_images=48,
        num_steps=20,
        guidance_scale=5.0,
        eta=0.0,
        seed=0,
    )
    # far above chance (~0.32 for a random render, 0 for noise); colour is learned first
    assert result["reward_mean"] > 0.75
    assert result["attributes"]["color"] > 0.9


@pytest.mark.slow
def test_short_ddpo_run_raises_alignment_above_the_pretrained_model(tmp_path, tiny):
    prompts = load_prompts("toy_train_single").prompts[::6]  # 16 fixed prompts
    reward_fn = rewards.get("shapes_alignment")
    settings = dict(num_images=96, num_steps=4, guidance_scale=5.0, eta=1.0, seed=7)
    before = evaluate(tiny, prompts, reward_fn, **settings)
    config = resolve_train_config(
        str(ROOT / "configs" / "ddpo" / "tiny_alignment.yaml"),
        [
            # a short, hotter run than the quickstart's (which trains 180 epochs at 2e-3 on 96 prompts)
            f"run.output_dir={tmp_path}",
            "run.num_epochs=40",
            "run.save_freq=100",
            "train.learning_rate=3e-3",
            f"prompts.source={prompts!r}".replace("'", '"'),
        ],
        None,
    )
    trained = train(config)
    after = evaluate(trained, prompts, reward_fn, **settings)
    margin = after["reward_mean"] - before["reward_mean"]
    print(f"shapes_alignment {before['reward_mean']:.3f} -> {after['reward_mean']:.3f}")
    assert margin > max(before["reward_stderr"], after["reward_stderr"]), (before, after)
