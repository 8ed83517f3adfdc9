"""Run by test_reliability in a subprocess: ``diffrl train`` that kills itself with SIGKILL at a
chosen point, as a crash, an OOM kill or a preempted machine would.

    python fault_train.py POINT COUNT CONFIG [key=value ...]

POINT is where the process dies, on the COUNT-th call of the function behind it: ``sampling``
(a sampling batch starts), ``reward`` (a reward call starts), ``training`` (a PPO loss term),
``checkpoint`` (the trainable weights of a checkpoint are written, the rest is not) or
``metrics`` (an epoch's metrics line is written, its checkpoint is not).
"""

import os
import signal
import sys

import diffrl.algorithms.ddpo
import diffrl.checkpoints
import diffrl.collect
import diffrl.rewards
import diffrl.run
from diffrl.cli import main

POINTS = {
    "sampling": (diffrl.collect, "sample_branches", "before"),
    "reward": (diffrl.rewards, "score", "before"),
    "training": (diffrl.algorithms.ddpo, "ppo_loss", "before"),
    "checkpoint": (diffrl.checkpoints, "save_file", "after"),
    "metrics": (diffrl.run, "append_jsonl", "after"),
}


def die_on_call(module, name: str, when: str, count: int) -> None:
    """Replace ``module.name`` by a wrapper that SIGKILLs this process on its ``count``-th call."""
    original, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls[0] == count and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, wrapper)


if __name__ == "__main__":
    point, count = sys.argv[1], int(sys.argv[2])
    module, name, when = POINTS[point]
    die_on_call(module, name, when, count)
    sys.exit(main(["train", *sys.argv[3:]]))
