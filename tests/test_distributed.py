"""Two CPU processes (torchrun, gloo): LoRA gradients are all-reduced and rewards gathered; full
fine-tuning under accelerate's FSDP2 (the shipped configs/accelerate/fsdp.yaml) equals DDP's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def _torchrun(tmp_path, config: str, *overrides: str, port: int, env: dict | None = None) -> None:
    """Train with two CPU processes (gloo); each saves its trainable weights into tmp_path."""
    env = dict(
        os.environ,
        **(env or {}),
        DIFFRL_PROBE_DIR=str(tmp_path),
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(HERE / "dist_train.py"),
        str(HERE.parent / "configs" / config),
        *overrides,
        f"run.output_dir={tmp_path}",
        "run.name=dist",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _rank_weights(tmp_path):
    return [load_file(str(tmp_path / f"weights_rank{r}.safetensors")) for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_keep_identical_lora_and_gather_rewards(tmp_path):
    _torchrun(
        tmp_path,
        "ddpo/tiny_compressibility.yaml",
        "sample.num_steps=4",
        "sample.batch_size=4",
        "sample.num_batches_per_epoch=2",
        "train.batch_size=4",
        "run.num_epochs=2",
        "train.learning_rate=1e-2",
        "reward.name=reward_probe:logged_brightness",
        port=29517,
    )
    rank0, rank1 = _rank_weights(tmp_path)
    assert rank0.keys() == rank1.keys() and any("lora" in k for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k), "LoRA must have been updated"

    # each rank computed its own rewards; the logged epoch mean is over both ranks' samples
    # (batches of 4 are training samples; rank 0 also scores 16-image before/after grids)
    local = {
        r: [
            b
            for b in map(json.loads, (tmp_path / f"rewards_rank{r}.jsonl").read_text().splitlines())
            if len(b) == 4
        ]
        for r in (0, 1)
    }
    assert local[0] != local[1]
    metrics = [json.loads(x) for x in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1]
    for epoch, record in enumerate(metrics):
        values = [v for r in (0, 1) for batch in local[r][2 * epoch : 2 * epoch + 2] for v in batch]
        assert record["num_samples"] == len(values) == 16
        assert record["reward_mean"] == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert sorted(
        p.name for p in (tmp_path / "dist" / "checkpoints" / "epoch_0001").glob("rng_rank*.pt")
    ) == ["rng_rank0.pt", "rng_rank1.pt"]


@pytest.mark.slow
def test_two_processes_run_b2diffurl_with_unequal_selections(tmp_path):
    """Each process keeps a different number of selected samples; padding to whole optimizer steps
    keeps DDP in step (no hang) and the ranks' LoRA identical."""
    _torchrun(
        tmp_path,
        "b2diffurl/tiny_alignment.yaml",
        "reward.name=jpeg_compressibility",  # continuous: siblings never tie, so every epoch selects some
        "sample.batch_size=4",
        "train.batch_size=2",
        "run.num_epochs=3",
        "run.save_freq=3",
        port=29518,
    )
    rank0, rank1 = _rank_weights(tmp_path)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    metrics = [json.loads(x) for x in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert [m["branch_step"] for m in metrics] == [2, 2, 2]  # l(s) = 2 + floor(s * 3 / 40) for s < 14
    assert all(0 < m["num_trained"] <= 2 * 8 and m["num_samples"] == 2 * 4 * 4 for m in metrics), metrics


def _fsdp_environment() -> dict:
    """The environment ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` gives its
    processes (made by accelerate's own launcher code from the shipped file), with fp32 on the CPU."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(HERE.parent / "configs" / "accelerate" / "fsdp.yaml")]
    args = launch_command_parser().parse_args(
        [*argv, "--num_processes", "2", "--mixed_precision", "no", "x.py"]
    )
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}


FSDP_RUN = [
    "model.pretrained=tiny-sd3-random", "model.use_lora=false", "train.kl_beta=0", "sample.num_steps=4",
    "sample.batch_size=4", "sample.max_sequence_length=8", "train.batch_size=4",
    "train.gradient_accumulation_steps=1", "grpo.group_size=4", "reward.name=reward_probe:logged_brightness",
    "prompts.source=toy_train_single", "run.num_epochs=2", "run.save_freq=1", "run.deterministic=true",
    "train.learning_rate=0.1", "train.adam_epsilon=1.0",
]  # fmt: skip
"""A smooth reward (JPEG sizes jump with float noise in the images, and so would the advantages);
with eps = 1 Adam's step is about lr·g (no sign-like first steps that turn float noise in
near-zero gradients into ±lr), so the FSDP and DDP weights can be compared element by element."""


def _checkpoint(run, epoch: int, name: str = "trainable.safetensors") -> dict:
    return load_file(str(run / "checkpoints" / f"epoch_{epoch:04d}" / name))


@pytest.mark.slow
def test_fsdp_full_fine_tuning_matches_ddp_and_resumes_exactly(tmp_path):
    """Full fine-tuning of the tiny SD3 transformer with accelerate's FSDP2 from the shipped config
    on two CPU processes, with the moving average on: each process holds about half of the AdamW
    state; the gathered weights and average after two epochs equal DDP's up to float summation
    order; the exported transformer/ loads with from_pretrained and holds the average; a run
    resumed from the first checkpoint ends on the same weights and average bit for bit."""
    from diffusers import SD3Transformer2DModel

    fsdp = {**_fsdp_environment(), "DIFFRL_TEST_FSDP": "1"}
    config, settings = "grpo/tiny_geneval.yaml", [*FSDP_RUN, "train.ema=true", "train.ema_every=1"]
    _torchrun(tmp_path / "fsdp", config, *settings, port=29521, env=fsdp)
    _torchrun(tmp_path / "ddp", config, *settings, port=29522)
    run, ddp_run = tmp_path / "fsdp" / "dist", tmp_path / "ddp" / "dist"
    for name in ("trainable.safetensors", "ema.safetensors"):
        sharded, ddp = _checkpoint(run, 1, name), _checkpoint(ddp_run, 1, name)
        assert sharded.keys() == ddp.keys() and len(sharded) > 20
        for key in ddp:
            torch.testing.assert_close(sharded[key], ddp[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    trained, average = _checkpoint(run, 1), _checkpoint(run, 1, "ema.safetensors")
    moved = max((trained[k] - _checkpoint(run, 0)[k]).abs().max().item() for k in trained)
    assert moved > 1e-4, "full fine-tuning must have moved the weights"
    assert max((trained[k] - average[k]).abs().max().item() for k in trained) > 1e-5
    shards = [torch.load(run / "checkpoints" / "epoch_0001" / f"optimizer_rank{r}.pt") for r in (0, 1)]
    biggest = max(t.numel() for t in trained.values())
    halves = [sum(v["exp_avg"].numel() for v in s["state"].values()) for s in shards]
    assert sum(halves) == sum(t.numel() for t in trained.values()) and abs(halves[0] - halves[1]) < biggest
    exported = SD3Transformer2DModel.from_pretrained(run / "transformer")
    for name, p in exported.named_parameters():
        assert torch.equal(p.detach(), average[name]), name

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed / "dist")
    shutil.rmtree(resumed / "dist" / "checkpoints" / "epoch_0001")
    _torchrun(resumed, config, *settings, f"run.resume_from={resumed / 'dist'}", port=29523, env=fsdp)
    for name in ("trainable.safetensors", "ema.safetensors"):
        again, first = _checkpoint(resumed / "dist", 1, name), _checkpoint(run, 1, name)
        for key in first:
            assert torch.equal(again[key], first[key]), f"{name}: {key}"
