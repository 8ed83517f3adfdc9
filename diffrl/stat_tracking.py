"""Per-prompt reward statistics for advantage normalisation (DDPO, Black et al. 2024, Sec. 4.3).

Each prompt keeps a deque of its last ``buffer_size`` rewards; a reward's advantage is
(r - mu_p) / (sigma_p + 1e-6) over that deque, or over the whole batch while the prompt has fewer
than ``min_count`` rewards. The state is plain data so it can go into a checkpoint.
"""

from __future__ import annotations

from collections import deque

import torch

EPS = 1e-6


def normalize(rewards: torch.Tensor) -> torch.Tensor:
    """Whole-batch normalisation (r - mean) / (std + 1e-6), population std, computed in float64
    (rewards near float32's range do not overflow); ``[N]`` -> ``[N]`` float32."""
    rewards = rewards.double()
    return ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + EPS)).float()


class PerPromptStatTracker:
    """Running per-prompt reward statistics with a fallback to batch statistics."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add a batch's rewards, then return their advantages.

        Args:
            prompts: N prompts; rewards: ``[N]`` float.
        Returns:
            ``[N]`` float32 advantages (statistics in float64).
        """
        rewards = rewards.double()
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        advantages = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[index].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = history.mean(), history.std(unbiased=False)
            advantages[index] = (rewards[index] - mean) / (std + EPS)
        return advantages.float()

    def state_dict(self) -> dict:
        """Plain-data state: the buffers as lists."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}
