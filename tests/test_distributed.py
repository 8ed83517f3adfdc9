"""Two CPU processes (torchrun, gloo): LoRA gradients are all-reduced and rewards gathered."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def _torchrun(tmp_path, config: str, *overrides: str, port: int) -> None:
    """Train with two CPU processes (gloo); each saves its trainable weights into tmp_path."""
    env = dict(
        os.environ,
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
