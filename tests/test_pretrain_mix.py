"""The pretraining scripts' GenEval-task mix: ``--task-weights`` of scripts/pretrain_tiny_flow.py and
the task shares ``training_prompts`` draws, against the binomial bound."""

import collections
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import pretrain_tiny  # noqa: E402
import pretrain_tiny_flow  # noqa: E402

from diffrl import toyworld as tw  # noqa: E402


def test_task_weights_replace_entries_of_the_shipped_mix():
    weights = pretrain_tiny_flow.parse_weights("position=0.15,color_attr=0.07")
    expected = dict(pretrain_tiny.GENEVAL_TASK_WEIGHTS, position=0.15, color_attr=0.07)
    assert weights == expected
    assert pretrain_tiny_flow.parse_weights("") == pretrain_tiny.GENEVAL_TASK_WEIGHTS


@pytest.mark.parametrize(
    "text, message",
    [
        ("positon=0.1", "unknown task 'positon'"),
        ("position=x", "position='x' is not a non-negative number"),
        ("position=-1", "position='-1' is not a non-negative number"),
        ("position=inf", "position='inf' is not a non-negative number"),
        (",".join(f"{t}=0" for t in pretrain_tiny.GENEVAL_TASK_WEIGHTS), "every task's weight is 0"),
    ],
)
def test_bad_task_weights_are_refused_in_one_line(text, message):
    with pytest.raises(SystemExit, match=message):
        pretrain_tiny_flow.parse_weights(text)


def test_training_prompts_draw_the_tasks_in_proportion_to_their_weights():
    """All GenEval scenes (geneval_fraction 1), weights 1 : 3 on two tasks and 0 elsewhere: every
    prompt is a training row of those two tasks, attribution's share within 4 binomial standard
    deviations of 3/4."""
    n = 4000
    weights = dict.fromkeys(pretrain_tiny.GENEVAL_TASK_WEIGHTS, 0.0) | {"position": 1.0, "color_attr": 3.0}
    prompts = pretrain_tiny.training_prompts(n, torch.Generator().manual_seed(0), 0.0, 1.0, weights)
    train = {r["prompt"] for r in tw.geneval_rows("train")}
    assert set(prompts) <= train
    tags = collections.Counter(tw.geneval_row(p)["tag"] for p in prompts)
    assert set(tags) == {"position", "color_attr"}
    assert abs(tags["color_attr"] / n - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5, tags
