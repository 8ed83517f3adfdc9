"""Weighted sums and reward-model ensembles (mean, WCO, UWO) by hand, each member's value in the
metadata (which a run logs as ``reward_component_<label>``)."""

import pytest
import torch

from diffrl import rewards
from diffrl.errors import RewardError


@pytest.fixture
def members(tmp_path, monkeypatch):
    """Three member rewards with known values: the mean pixel, its square, and a constant 0.3."""
    (tmp_path / "members.py").write_text(
        "import torch\n"
        "def mean(images, prompts, metadata):\n    return images.mean(dim=(1, 2, 3))\n"
        "def square(images, prompts, metadata):\n    return images.mean(dim=(1, 2, 3)) ** 2\n"
        "def const(value=0.3):\n    return lambda images, prompts, metadata: torch.full((len(prompts),), value)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return [
        {"name": "members:mean", "label": "m", "weight": 2.0},
        {"name": "members:square", "label": "s", "weight": -1.0},
        {"name": "members:const", "kwargs": {"value": 0.3}, "label": "c"},
    ]


def _images():
    levels = torch.tensor([0.1, 0.5, 0.9])
    return levels.view(3, 1, 1, 1).expand(3, 3, 4, 4).clone()


def test_weighted_sum_by_hand_and_its_components(members):
    reward = rewards.get("weighted", rewards=members)
    metadata = [{}, {}, {}]
    values = reward(_images(), ["p"] * 3, metadata)
    x = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(values, 2 * x - x**2 + 0.3)
    assert [m["component_s"] for m in metadata] == pytest.approx((x**2).tolist())
    assert [m["component_c"] for m in metadata] == pytest.approx([0.3] * 3)


@pytest.mark.parametrize("objective", ["mean", "wco", "uwo"])
def test_ensemble_objectives_by_hand(members, objective):
    reward = rewards.get("ensemble", rewards=members, objective=objective, uncertainty_weight=2.0)
    values = reward(_images(), ["p"] * 3, [{}, {}, {}])
    for i, x in enumerate([0.1, 0.5, 0.9]):
        r = [x, x * x, 0.3]
        mean = sum(r) / 3
        expected = {
            "mean": mean,
            "wco": min(r),
            "uwo": mean - 2.0 * sum((v - mean) ** 2 for v in r) / 3,
        }[objective]
        assert values[i].item() == pytest.approx(expected, abs=1e-6)


def test_bad_members_are_named(members):
    with pytest.raises(RewardError, match=r"rewards\[1\]: expected \{name, kwargs, weight, label\}"):
        rewards.get("weighted", rewards=[members[0], {"nam": "x"}])
    with pytest.raises(RewardError, match="label 'members:mean' used twice"):
        rewards.get("weighted", rewards=[{"name": "members:mean"}, {"name": "members:mean"}])
    with pytest.raises(RewardError, match="'best' is not one of"):
        rewards.get("ensemble", rewards=members, objective="best")
