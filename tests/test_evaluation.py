import json
import math

import pytest
import torch

from diffrl.cli import main, resolve_train_config
from diffrl.evaluation import diversity, evaluate, load_for_eval
from diffrl.rollout import sample_trajectories
from diffrl.trainer import train
from diffrl.types import SamplerSettings

from .test_trainer import FAST, TINY


def test_diversity_by_hand():
    same = torch.rand(1, 3, 16, 16).expand(4, 3, 16, 16)
    assert diversity(same) == pytest.approx(0.0, abs=1e-6)
    a = torch.zeros(1, 3, 16, 16)
    a[..., :8] = 1.0  # left half bright
    b = torch.zeros(1, 3, 16, 16)
    b[..., :8, :] = 1.0  # top half bright; centred features of a and b are orthogonal
    assert diversity(torch.cat([a, b])) == pytest.approx(1.0, abs=1e-6)
    assert diversity(torch.cat([a, 1 - a])) == pytest.approx(2.0, abs=1e-6)  # anti-correlated


def test_evaluate_statistics_match_an_independent_computation(tiny_sd):
    prompts = ["a red circle", "a blue square", "a cat"]

    def brightness(images, prompts, metadata):
        for m, v in zip(metadata, images.mean(dim=(1, 2, 3)).tolist()):
            m["bright_half"] = float(v > 0.5)
        return images.mean(dim=(1, 2, 3))

    result = evaluate(
        tiny_sd,
        prompts,
        brightness,
        num_images=5,
        num_steps=3,
        guidance_scale=5.0,
        eta=1.0,
        seed=4,
        batch_size=2,
    )
    generator = torch.Generator().manual_seed(4)
    chosen = [prompts[i % 3] for i in range(5)]
    images = torch.cat(
        [
            sample_trajectories(
                tiny_sd, chosen[s : s + 2], SamplerSettings(num_steps=3), generator=generator
            ).images
            for s in range(0, 5, 2)
        ]
    )
    values = images.mean(dim=(1, 2, 3))
    assert result["reward_mean"] == pytest.approx(values.mean().item(), rel=1e-5)
    assert result["reward_stderr"] == pytest.approx(values.std().item() / math.sqrt(5), rel=1e-4)
    assert result["exact_match"] is None
    assert result["attributes"]["bright_half"] == pytest.approx((values > 0.5).float().mean().item())
    assert result["diversity"] == pytest.approx(diversity(images), rel=1e-5)


def test_eval_cli_compares_a_base_model_and_a_trained_run(tmp_path, capsys):
    trained = train(
        resolve_train_config(
            TINY,
            [
                *FAST,
                "run.num_epochs=1",
                "train.learning_rate=1e-2",
                f"run.output_dir={tmp_path}",
                "run.name=r",
            ],
            None,
        )
    )
    pipe, config = load_for_eval(str(tmp_path / "r"))
    assert config.run.name == "r"
    reference = sample_trajectories(
        trained, ["a cat"], SamplerSettings(num_steps=4), generator=torch.Generator().manual_seed(0)
    )
    loaded = sample_trajectories(
        pipe, ["a cat"], SamplerSettings(num_steps=4), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(loaded.images, reference.images, rtol=0, atol=1e-5)

    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "tiny-sd",
            str(tmp_path / "r"),
            "--prompts",
            "simple_animals",
            "--reward",
            "jpeg_compressibility",
            "--num-images",
            "4",
            "--num-steps",
            "3",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| model | reward (± s.e.) | exact match | diversity |" in table and str(tmp_path / "r") in table
    results = json.loads(out.read_text())
    assert set(results) == {"tiny-sd", str(tmp_path / "r")}
    assert all(r["num_images"] == 4 and r["reward_mean"] < 0 for r in results.values())
