"""The shipped tiny toy-world model: it loads like Stable Diffusion, draws the toy world, and DDPO
against the verifier improves it."""

from pathlib import Path

import pytest
from diffusers import DDIMScheduler, StableDiffusionPipeline

from diffrl import load_pipeline, rewards
from diffrl.evaluation import evaluate
from diffrl.pipelines import SHIPPED_PIPELINES
from diffrl.prompts import load_prompts
from tests.alignment import assert_raised, train_and_compare

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
def test_short_ddpo_run_raises_alignment_above_the_pretrained_model(tmp_path):
    prompts = load_prompts("toy_train_single").prompts[::6]  # 16 fixed prompts
    # a short, hotter run than the quickstart's (which trains 180 epochs at 1e-3 on 96 prompts)
    before, after, _ = train_and_compare(
        "tiny", "ddpo/tiny_alignment.yaml", prompts, tmp_path, "run.num_epochs=40", "train.learning_rate=3e-3"
    )
    assert_raised(before, after)
