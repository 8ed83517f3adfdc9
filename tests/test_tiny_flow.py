"""The shipped ``tiny-flow`` model: an SD3 pipeline of the toy world that loads through plain
diffusers, samples at the T5 length it was trained at, and draws the toy world."""

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from diffrl import load_pipeline, rewards
from diffrl.evaluation import evaluate
from diffrl.pipelines import SHIPPED_PIPELINES, inspect_pipeline
from diffrl.prompts import load_prompts
from diffrl.rollout import sample_trajectories
from diffrl.text import t5_tokens
from diffrl.types import SamplerSettings

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def flow():
    return load_pipeline("tiny-flow")


def test_every_shipped_model_together_stays_small():
    files = [p for folder in SHIPPED_PIPELINES.values() for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 32 * 2**20
    assert not [p for p in files if p.suffix == ".bin"]


def test_tiny_flow_is_an_sd3_pipeline_with_word_level_t5(flow):
    assert isinstance(flow, StableDiffusion3Pipeline)
    assert isinstance(flow.transformer, SD3Transformer2DModel)
    assert isinstance(flow.scheduler, FlowMatchEulerDiscreteScheduler)
    assert inspect_pipeline("tiny-flow").family == "flow" and inspect_pipeline("tiny-flow").resolution == 32
    assert flow.tokenizer_3.tokenize("a photo of a red circle") == [
        "▁a",
        "▁photo",
        "▁of",
        "▁a",
        "▁red",
        "▁circle",
    ]
    assert t5_tokens(flow, None) == flow.tokenizer_3.model_max_length == 16


def test_diffrls_sampler_is_the_plain_pipeline_at_the_trained_t5_length(flow):
    """The ODE chain diffrl samples (T5 length read from the tokenizer) equals the pipeline's own
    ``__call__`` given ``max_sequence_length=16``, as the script's docstring tells diffusers users."""
    prompts = ["a photo of a red circle", "a photo of two squares"]
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    traj = sample_trajectories(
        flow, prompts, SamplerSettings(num_steps=6, guidance_scale=5.0, eta=0.0), latents=x_T
    )
    with torch.no_grad():
        want = flow(
            prompts,
            num_inference_steps=6,
            guidance_scale=5.0,
            latents=x_T,
            max_sequence_length=16,
            output_type="pt",
        ).images
    torch.testing.assert_close(traj.images, want, rtol=0, atol=2e-5)


def test_tiny_flow_draws_the_toy_world(flow):
    result = evaluate(
        flow,
        load_prompts("toy_heldout_single").prompts,
        rewards.get("shapes_alignment"),
        num_images=32,
        num_steps=20,
        guidance_scale=5.0,
        eta=0.0,
        seed=0,
    )
    assert result["reward_mean"] > 0.75  # a random render scores about 0.32, noise 0
    assert result["attributes"]["color"] > 0.9


@pytest.mark.slow
def test_grpo_with_the_tiny_flow_config_raises_a_learnable_reward(tmp_path, monkeypatch):
    """configs/grpo/tiny_flow_geneval.yaml (Flow-GRPO SDE, CFG, LoRA on the joint attention) on
    ``tiny-flow`` with image brightness as the reward: the reward must rise within 20 epochs."""
    from diffrl.cli import resolve_train_config
    from diffrl.files import read_jsonl
    from diffrl.trainer import train

    (tmp_path / "bright.py").write_text(
        "def brightness(images, prompts, metadata):\n    return images.mean(dim=(1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = [
        "reward.name=bright:brightness", "run.num_epochs=20", "run.save_freq=100", "train.ema=false",
        "train.learning_rate=5e-3", f"run.output_dir={tmp_path}",
    ]  # fmt: skip
    train(resolve_train_config(str(ROOT / "configs/grpo/tiny_flow_geneval.yaml"), overrides, None))
    rewards_ = [r["reward_mean"] for r in read_jsonl(tmp_path / "grpo_tiny_flow_geneval" / "metrics.jsonl")]
    assert sum(rewards_[-3:]) / 3 > sum(rewards_[:3]) / 3 + 0.02, rewards_
