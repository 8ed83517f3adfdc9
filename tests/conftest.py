"""Shared fixtures: tiny pipelines built in code, once per session. Nothing is downloaded."""

import os
from pathlib import Path

# Triton kernels run on CPU only in interpreter mode, which must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The interpreter is slow: outside tests/test_kernels.py (which selects the kernels itself, and checks
# a DDPO step with both) the suite runs the torch references.
os.environ.setdefault("DIFFRL_KERNELS", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker per core (pytest -n 2, pyproject's addopts): a second torch thread per worker only
    # oversubscribes. Subprocesses keep torch's default, as a user's command would.
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd():
    from diffrl.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_lcm():
    from diffrl.testing import tiny_lcm_pipeline

    pipe = tiny_lcm_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


TRAINING_CONFIGS = sorted(
    p for p in (Path(__file__).parent.parent / "configs").glob("*/*.yaml") if p.parent.name != "accelerate"
)
"""Every shipped ``diffrl train`` config (configs/accelerate holds accelerate's launch configs)."""
