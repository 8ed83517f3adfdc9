"""Several rewards as one: weighted sums, and reward-model ensembles with the conservative
objectives of Coste et al. (ICLR 2024, *Reward Model Ensembles Help Mitigate Overoptimization*,
Sec. 3.2), for K member rewards R_1..R_K of one image:

    mean:  R = (1/K) Σ_k R_k
    wco:   R = min_k R_k                                   (worst-case optimisation)
    uwo:   R = (1/K) Σ_k R_k − λ · (1/K) Σ_k (R_k − mean)² (uncertainty-weighted; the members'
                                                            population variance)

Each member is ``{name, kwargs, weight}`` (a registered name or ``package.module:function``); its
value is written into every sample's metadata as ``component_<label>`` (the label is the name, or
``label``), so that runs log each one as ``reward_component_<label>``.
"""

from __future__ import annotations

import torch

from diffrl.errors import RewardError

OBJECTIVES = ("mean", "wco", "uwo")


def _members(specs: list[dict]) -> list[tuple[str, float, object]]:
    """(label, weight, reward) for each ``{name, kwargs?, weight?, label?}``; errors name the entry."""
    from diffrl import rewards

    if not specs:
        raise RewardError("reward.kwargs.rewards: give at least one {name: ...} entry")
    members, labels = [], set()
    for i, spec in enumerate(specs):
        unknown = set(spec) - {"name", "kwargs", "weight", "label"}
        if "name" not in spec or unknown:
            raise RewardError(
                f"reward.kwargs.rewards[{i}]: expected {{name, kwargs, weight, label}}, got {sorted(spec)}"
            )
        label = spec.get("label", spec["name"])
        if label in labels:
            raise RewardError(f"reward.kwargs.rewards[{i}]: label {label!r} used twice; give each a label")
        labels.add(label)
        members.append(
            (label, float(spec.get("weight", 1.0)), rewards.get(spec["name"], **spec.get("kwargs", {})))
        )
    return members


def _scores(members, images, prompts, metadata) -> torch.Tensor:
    """``[K, B]``: each member on the batch, its values written to ``component_<label>``."""
    columns = []
    for label, _, reward in members:
        values = reward(images, prompts, metadata)
        for meta, value in zip(metadata, values.tolist()):
            meta[f"component_{label}"] = value
        columns.append(values)
    return torch.stack(columns)


def weighted(rewards: list[dict]):
    """Reward factory: Σ_k weight_k · R_k over ``rewards`` (each logged as a component)."""
    members = _members(rewards)
    weights = torch.tensor([w for _, w, _ in members])

    def reward(images, prompts, metadata):
        return (weights[:, None] * _scores(members, images, prompts, metadata)).sum(0)

    reward.min_size = max(m.min_size for *_, m in members)
    return reward


def ensemble(rewards: list[dict], objective: str = "mean", uncertainty_weight: float = 0.5):
    """Reward factory: the ensemble ``objective`` (mean, wco, uwo with λ = ``uncertainty_weight``;
    Coste et al.'s best-of-n default is 0.5) of ``rewards``, each logged as a component. Weights
    are not used by an ensemble."""
    if objective not in OBJECTIVES:
        raise RewardError(f"reward.kwargs.objective: {objective!r} is not one of {list(OBJECTIVES)}")
    members = _members(rewards)

    def reward(images, prompts, metadata):
        scores = _scores(members, images, prompts, metadata)
        if objective == "wco":
            return scores.min(0).values
        mean = scores.mean(0)
        return mean if objective == "mean" else mean - uncertainty_weight * scores.var(0, unbiased=False)

    reward.min_size = max(m.min_size for *_, m in members)
    return reward


__all__ = ["OBJECTIVES", "ensemble", "weighted"]
