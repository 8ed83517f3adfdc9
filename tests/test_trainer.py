"""End-to-end DDPO runs on the built-in tiny pipeline (a few seconds each on CPU)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffrl.cli import main, resolve_train_config
from diffrl.config import ConfigError
from diffrl.files import read_jsonl
from diffrl.rollout import sample_trajectories
from diffrl.testing import tiny_sd_pipeline
from diffrl.trainer import train
from diffrl.types import SamplerSettings

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "ddpo" / "tiny_compressibility.yaml")
FAST = ["sample.num_steps=4", "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=4"]


def _run(tmp_path, name, *overrides, resume=None):
    args = [*FAST, f"run.output_dir={tmp_path}", f"run.name={name}", *overrides]
    return train(resolve_train_config(TINY, args, resume))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    code = main(
        ["train", TINY, *FAST, "run.num_epochs=2", "run.keep_last=1", f"run.output_dir={out}", "run.name=cli"]
    )
    assert code == 0
    return out / "cli"


def test_cli_run_writes_every_artifact(cli_run):
    assert resolve_train_config(str(cli_run / "config.yaml"), [], None).run.num_epochs == 2
    records = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for key in (
        "reward_mean",
        "reward_std",
        "loss",
        "approx_kl",
        "clipfrac",
        "learning_rate",
        "time_sampling",
        "time_reward",
        "time_training",
    ):
        assert all(isinstance(r[key], float) for r in records), key
    assert all(r["num_samples"] == 8 for r in records) and all(r["reward_mean"] < 0 for r in records)
    assert (cli_run / "samples" / "epoch_0000.png").is_file() and (
        cli_run / "samples" / "epoch_0001.png"
    ).is_file()
    assert (cli_run / "reward_curve.png").is_file()
    checkpoints = sorted(p.name for p in (cli_run / "checkpoints").iterdir())
    assert checkpoints == ["epoch_0001"]  # keep_last=1 pruned epoch_0000
    state = json.loads((cli_run / "checkpoints" / "epoch_0001" / "state.json").read_text())
    assert state["epoch"] == 1 and len(state["tracker"]["buffers"]) >= 1
    assert (cli_run / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_cli_reports_config_errors_before_loading(tmp_path, capsys):
    assert main(["train", TINY, "train.learning_rate=-1", f"run.output_dir={tmp_path}"]) == 2
    assert "train.learning_rate: must be > 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_train_help_explains_configs_and_overrides():
    out = subprocess.run(
        [sys.executable, "-m", "diffrl.cli", "train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "section.key=value" in out.stdout and "--resume" in out.stdout


def _samples(pipe, seed=3):
    return sample_trajectories(
        pipe,
        ["a red circle", "a blue square"],
        SamplerSettings(num_steps=4),
        generator=torch.Generator().manual_seed(seed),
    ).images


def test_lora_round_trip_through_plain_diffusers(tmp_path):
    """The exported LoRA, read by plain diffusers, gives the trained samples; the targets mix the
    attention projections that diffusers' old key format renames with one it does not (``ff.net.2``)."""
    targets = "model.lora_target_modules=[to_q, to_k, to_v, to_out.0, ff.net.2]"
    trained = _run(
        tmp_path, "lora", "run.num_epochs=2", "train.learning_rate=1e-2", "model.lora_alpha=8", targets
    )
    lora_file = tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors"
    weights = load_file(str(lora_file))
    assert weights and all("lora" in k for k in weights)
    base = tiny_sd_pipeline(0)
    base_images = _samples(base)
    base.load_lora_weights(str(tmp_path / "lora" / "lora"))
    reloaded_images, trained_images = _samples(base), _samples(trained)
    assert (trained_images - base_images).abs().max() > 1e-3, "training must have changed the samples"
    torch.testing.assert_close(reloaded_images, trained_images, rtol=0, atol=1e-5)


def test_resume_after_epoch_2_equals_uninterrupted_run(tmp_path):
    whole = _run(tmp_path, "whole", "run.num_epochs=4")
    _run(tmp_path, "split", "run.num_epochs=2")
    (tmp_path / "split" / "checkpoints" / "epoch_0003.tmp").mkdir()  # a torn write is never resumed from
    resumed = _run(tmp_path, "split", "run.num_epochs=4", resume=str(tmp_path / "split"))
    for (name, a), b in zip(whole.unet.named_parameters(), resumed.unet.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    whole_metrics, split_metrics = lines("whole"), lines("split")
    assert [r["epoch"] for r in split_metrics] == [0, 1, 2, 3]
    for a, b in zip(whole_metrics, split_metrics):
        assert a["reward_mean"] == b["reward_mean"] and a["loss"] == b["loss"]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        resolve_train_config(TINY, [], str(tmp_path))


def test_resume_from_a_checkpoint_folder_continues_at_next_epoch(cli_run, tmp_path):
    run = Path(shutil.copytree(cli_run, tmp_path / "cli"))
    config = resolve_train_config(None, ["run.num_epochs=3"], str(run / "checkpoints" / "epoch_0001"))
    assert config.run.resume_from.endswith("epoch_0001") and config.run.num_epochs == 3
    train(config)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]


@pytest.mark.slow
def test_reward_rises_with_full_finetuning(tmp_path, monkeypatch):
    """Brightness is learnable by the random tiny UNet: the mean reward must climb."""
    (tmp_path / "bright.py").write_text(
        "def brightness(images, prompts, metadata):\n    return images.mean(dim=(1, 2, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _run(
        tmp_path,
        "bright",
        "reward.name=bright:brightness",
        "run.num_epochs=8",
        "sample.num_steps=10",
        "sample.batch_size=8",
        "model.use_lora=false",
        "train.learning_rate=1e-3",
        "train.clip_range=1e-2",
        "stat_tracking.enabled=false",
        "run.keep_last=1",
    )
    rewards = [
        json.loads(x)["reward_mean"] for x in (tmp_path / "bright" / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.015, rewards
    assert (tmp_path / "bright" / "unet" / "config.json").is_file()


def test_xformers_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="model.attention=xformers"):
        _run(tmp_path, "x", "model.attention=xformers")


@pytest.mark.parametrize("per_pass", [1, 2, 3, 4])
def test_timesteps_per_pass_keeps_the_gradient_of_one_term_per_timestep(per_pass):
    """One accumulation window over 3 samples × 4 trained steps, with k steps per forward pass (3: passes
    of 3 and 1 steps): plain SGD at lr 1000 moves the weights by 1000 × the gradient of the mean over
    steps of the minibatch-mean term, computed here directly with autograd."""
    from accelerate import Accelerator

    from diffrl.algorithms import Batch
    from diffrl.config import load_config
    from diffrl.learner import Learner, NonFiniteGuard, prepare_denoiser
    from diffrl.run import Streams

    pipe = tiny_sd_pipeline(seed=0)
    config = load_config(
        None,
        [
            "model.pretrained=tiny-sd",
            "model.lora_rank=2",
            "sample.num_steps=4",
            "sample.batch_size=3",
            "train.batch_size=3",
            "train.max_grad_norm=1e9",
            f"train.timesteps_per_pass={per_pass}",
        ],
    )
    params = prepare_denoiser(pipe, config, torch.float32)
    torch.manual_seed(0)
    for p in params:  # LoRA's B starts at zero, which would leave A without gradient
        torch.nn.init.normal_(p, std=0.05)
    data = sample_trajectories(
        pipe, ["a", "b", "c"], SamplerSettings(num_steps=4), generator=torch.Generator().manual_seed(0)
    )
    accelerator = Accelerator(cpu=True)
    learner = Learner(
        pipe.unet, pipe, torch.optim.SGD(params, lr=1000.0), params, accelerator, NonFiniteGuard(10), config
    )
    everyone = torch.arange(3)
    pipe.scheduler.set_timesteps(4)
    expected = torch.autograd.grad(
        sum(learner.log_prob(data, everyone, torch.full((3,), s)).mean() for s in range(4)) / 4, params
    )
    before = [p.detach().clone() for p in params]
    batch = Batch(members=everyone[:, None], trained=torch.ones(3, dtype=torch.bool), rewards=torch.zeros(3))
    learner.train_epoch(
        lambda term, batch, config: (term.log_prob.mean(), {}), batch, data, Streams.seeded(0, 0), 0, "test"
    )
    for p, start, grad in zip(params, before, expected):  # float32 noise of different batch shapes
        torch.testing.assert_close(
            (start - p.detach()) / 1000, grad, rtol=0, atol=1e-4 * grad.abs().max().item()
        )


def test_merged_lora_computes_what_the_adapters_do_and_restores_the_base_weights_bit_for_bit():
    from diffrl.collect import lora_merged
    from diffrl.config import load_config
    from diffrl.learner import prepare_denoiser

    pipe = tiny_sd_pipeline(seed=0)
    params = prepare_denoiser(
        pipe, load_config(None, ["model.pretrained=tiny-sd", "model.lora_rank=2"]), torch.float32
    )
    torch.manual_seed(0)
    for p in params:
        torch.nn.init.normal_(p, std=0.1)
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    x, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, 77, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        adapters = pipe.unet(x, 500, encoder_hidden_states=embeds).sample
        with lora_merged(pipe.unet, True):
            merged = pipe.unet(x, 500, encoder_hidden_states=embeds).sample
            changed = [n for n, p in pipe.unet.named_parameters() if not torch.equal(p, weights[n])]
    assert changed and all("base_layer" in n for n in changed)  # the update was folded into the base weights
    torch.testing.assert_close(merged, adapters, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, weights[n]) for n, p in pipe.unet.named_parameters())


@pytest.mark.slow
def test_compiled_unet_trains_like_the_eager_one(tmp_path):
    """``model.compile``: the pipeline's own UNet compiled in place; one epoch's rewards and loss
    agree with the eager run's up to float noise, and its ratio check (sampling and training are
    compiled separately: a scalar timestep vs one per sample) passes."""
    eager = _run(tmp_path, "eager", "run.num_epochs=1")
    compiled = _run(tmp_path, "compiled", "run.num_epochs=1", "model.compile=true")
    assert compiled.unet._compiled_call_impl is not None and eager.unet._compiled_call_impl is None
    (a,), (b,) = (read_jsonl(tmp_path / run / "metrics.jsonl") for run in ("eager", "compiled"))
    assert b["reward_mean"] == pytest.approx(a["reward_mean"], abs=1e-4)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-6)
    trained = [(n, p) for n, p in compiled.unet.named_parameters() if p.requires_grad]
    assert trained and all(torch.isfinite(p).all() for _, p in trained)
