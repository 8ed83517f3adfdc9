"""An exponential moving average of the trained weights, the weights a run evaluates and exports
(``train.ema``), as Flow-GRPO's training code keeps one for its evaluations and checkpoints
(Liu et al. 2025; ``flow_grpo/ema.py`` and ``scripts/train_sd3.py`` of its public code).

After the n-th optimizer step taken, every ``every``-th one (n = every, 2·every, ...) moves the
average towards the weights θ:

    θ̄ ← d_n θ̄ + (1 − d_n) θ,    d_n = min((1 + n) / (10 + n), decay)

so the average follows the weights closely early in training (d_1 = 0.18) and settles at ``decay``
(Flow-GRPO: 0.9 every 8 steps). The average starts at the weights before training. Sampling for
training stays on the trained weights θ (the rollouts must be on-policy); the fixed-seed grids
after training, the exported ``lora/`` (or full weights) and the pipeline :func:`diffrl.train`
returns hold θ̄. Checkpoints keep both, so a resumed run continues the same average.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from diffrl.errors import InputFileError
from diffrl.sharding import copy_full, reshard, whole_on_cpu

STEPS_KEY = "__optimizer_steps__"
"""Key of the optimizer-step count among :meth:`EMA.state_dict`'s tensors."""


class EMA:
    """The moving average ``shadow`` (float32 copies) of ``module``'s trained parameters (those
    that require grad; under FSDP its shards, resharded around swaps: :func:`diffrl.sharding.reshard`)."""

    def __init__(self, module: torch.nn.Module, decay: float, every: int):
        self.owner = module
        trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in trained]
        self.params = [p for _, p in trained]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay, self.every, self.steps = decay, every, 0

    def weight(self, n: int) -> float:
        """d_n, the weight of the old average at the n-th optimizer step."""
        return min((1 + n) / (10 + n), self.decay)

    @torch.no_grad()
    def update(self) -> None:
        """Count one optimizer step taken; on every ``every``-th, θ̄ ← d_n θ̄ + (1 − d_n) θ."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.blend(self.weight(self.steps))

    @torch.no_grad()
    def blend(self, weight: float) -> None:
        """θ̄ ← w θ̄ + (1 − w) θ with the given ``weight`` w."""
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - weight)

    @torch.no_grad()
    def _swap(self) -> None:
        reshard(self.owner)
        for p, s in zip(self.params, self.shadow):
            held = p.detach().clone()
            p.copy_(s)
            s.copy_(held)
        reshard(self.owner)

    @contextmanager
    def applied(self):
        """The parameters hold the average inside the block and their own values again after it."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Put the average into the parameters for good (training is over)."""
        reshard(self.owner)
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    def state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The average by parameter name (whole tensors on the CPU; FSDP2 shards gathered, so every
        process calls it, and those with ``keep=False`` keep nothing), and the optimizer-step
        count under :data:`STEPS_KEY`."""
        return {**whole_on_cpu(zip(self.names, self.shadow), keep), STEPS_KEY: torch.tensor(self.steps)}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Restore :meth:`state_dict`; ``source`` (a file) names what is missing."""
        missing = [n for n in [*self.names, STEPS_KEY] if n not in state]
        if missing:
            raise InputFileError(f"{source}: lacks {len(missing)} averaged tensors, e.g. {missing[0]}")
        for name, s in zip(self.names, self.shadow):
            copy_full(s, state[name])
        self.steps = int(state[STEPS_KEY])
