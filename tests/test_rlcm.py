"""RLCM: DDPO's objective on a latent consistency model's sampler (configs, the trainer's policy
re-scoring on LCM rollouts, early errors, and a short run on the shipped tiny LCM)."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from diffrl import load_pipeline, rewards
from diffrl.cli import main
from diffrl.config import ConfigError, load_config
from diffrl.evaluation import evaluate
from diffrl.learner import step_log_prob
from diffrl.pipelines import SHIPPED_PIPELINES
from diffrl.prompts import load_prompts
from diffrl.rollout import sample_trajectories
from diffrl.types import SamplerSettings
from tests.alignment import assert_raised, train_and_compare

ROOT = Path(__file__).parent.parent


def test_rlcm_defaults_fill_only_unset_keys():
    config = load_config(None, ["algorithm=rlcm", "train.learning_rate=3e-4"])
    assert (config.sample.num_steps, config.sample.guidance_scale) == (8, 8.0)
    assert (config.train.clip_range, config.train.adv_clip_max, config.train.max_grad_norm) == (
        1e-4,
        10.0,
        5.0,
    )
    assert (config.model.lora_rank, config.model.lora_alpha) == (8, 8.0)
    assert config.train.learning_rate == 3e-4  # the user's value wins
    assert load_config(None).sample.num_steps == 50  # DDPO keeps its own
    assert load_config(None, ["algorithm=rlcm", "sample.eta=0"]).sample.eta == 0  # eta is DDIM's
    with pytest.raises(ConfigError, match="sample.num_steps: RLCM needs H >= 2"):
        load_config(None, ["algorithm=rlcm", "sample.num_steps=1"])


def test_trainer_rescoring_of_lcm_rollouts_gives_ratio_one(tiny_lcm):
    """The trainer's step_log_prob (per-sample shuffled timesteps) on stored LCM actions."""
    config = load_config(None, ["algorithm=rlcm", "sample.num_steps=4", "sample.guidance_scale=6"])
    traj = sample_trajectories(
        tiny_lcm,
        ["a red circle"] * 3,
        SamplerSettings(num_steps=4, guidance_scale=6.0),
        generator=torch.Generator().manual_seed(0),
    )
    data = traj
    accelerator = Accelerator(cpu=True)
    idx = torch.arange(3)
    with torch.no_grad():
        for j in range(3):
            step = (torch.arange(3) + j) % 3  # every sample at a different step
            log_prob = step_log_prob(tiny_lcm.unet, tiny_lcm, data, idx, step, config, accelerator)
            torch.testing.assert_close(log_prob, data.log_probs[idx, step], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("algorithm", "model", "message"),
    [
        ("rlcm", "tiny-sd", "is not a latent consistency model"),
        ("ddpo", "tiny-lcm-random", "is a latent consistency model; train it with algorithm: rlcm"),
    ],
)
def test_algorithm_and_model_kind_must_agree(tmp_path, capsys, algorithm, model, message):
    code = main(
        [
            "train",
            str(ROOT / "configs" / "ddpo" / "tiny_compressibility.yaml"),
            f"algorithm={algorithm}",
            f"model.pretrained={model}",
            f"run.output_dir={tmp_path}",
        ]
    )
    assert code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_shipped_tiny_lcm_is_small_and_within_0_1_of_its_50_step_teacher():
    folder = SHIPPED_PIPELINES["tiny-lcm"]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20 * 2**20
    lcm = load_pipeline("tiny-lcm")
    assert isinstance(lcm, LatentConsistencyModelPipeline) and isinstance(lcm.scheduler, LCMScheduler)
    assert lcm.unet.config.time_cond_proj_dim is not None  # guidance is a UNet input, not CFG
    prompts = load_prompts("toy_heldout_single").prompts
    reward_fn = rewards.get("shapes_alignment")
    common = dict(num_images=64, guidance_scale=5.0, eta=0.0, seed=0)
    student = evaluate(lcm, prompts, reward_fn, num_steps=4, **common)
    teacher = evaluate(load_pipeline("tiny"), prompts, reward_fn, num_steps=50, **common)
    print(f"4-step LCM {student['reward_mean']:.3f}, 50-step teacher {teacher['reward_mean']:.3f}")
    assert student["reward_mean"] >= teacher["reward_mean"] - 0.1


@pytest.mark.slow
def test_short_rlcm_run_raises_alignment_on_the_tiny_lcm(tmp_path):
    prompts = load_prompts("toy_train_pair").prompts[::20]  # 18 fixed prompts
    before, after, _ = train_and_compare(
        "tiny-lcm", "rlcm/tiny_alignment.yaml", prompts, tmp_path, "run.num_epochs=30"
    )
    assert_raised(before, after)
