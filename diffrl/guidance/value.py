"""SVDD-MC's value network (Li, Uehara et al. 2024, Sec. 4.2, Eq. 6 with α → 0): a small
network v(x_t, t, prompt) regressed on rollouts of the pretrained model, its safetensors file
format, and the value function :func:`diffrl.guidance.svdd.svdd` takes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffrl.errors import InputFileError
from diffrl.rollout import sample_trajectories
from diffrl.types import SamplerSettings


class ValueNet(nn.Module):
    """v(x_t, t, prompt) for SVDD-MC: a small conv net on the latents plus a timestep channel,
    with the mean-pooled prompt embedding added to its features; ``[B, C, h, w]`` -> ``[B]``.
    The head predicts the standardized reward; ``shift``/``scale`` (the training targets' mean and
    std) map it back to reward units."""

    def __init__(
        self,
        latent_channels: int = 4,
        text_dim: int = 768,
        width: int = 64,
        shift: float = 0.0,
        scale: float = 1.0,
    ):
        super().__init__()
        self.config = {
            "latent_channels": latent_channels,
            "text_dim": text_dim,
            "width": width,
            "shift": shift,
            "scale": scale,
        }
        self.features = nn.Sequential(
            nn.Conv2d(latent_channels + 1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.text = nn.Linear(text_dim, width)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """latents ``[B, C, h, w]``, timesteps ``[B]`` (0..1000), text ``[B, D]`` -> values ``[B]``."""
        b, _, h, w = latents.shape
        t = (timesteps.float() / 1000).view(-1, 1, 1, 1).expand(b, 1, h, w)
        features = self.features(torch.cat([latents.float(), t.to(latents.device)], dim=1))
        standardized = self.head(features + self.text(text.float())).squeeze(-1)
        return standardized * self.config["scale"] + self.config["shift"]


def save_value_net(net: ValueNet, path: str | Path) -> None:
    """Weights as safetensors, the architecture in its metadata."""
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"diffrl_value_net": json.dumps(net.config)})


def load_value_net(path: str | Path) -> ValueNet:
    """A :class:`ValueNet` saved by :func:`save_value_net` (safetensors only)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise InputFileError(f"{path}: no such value-net file (make one with diffrl train-value)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("diffrl_value_net")
    except SafetensorError as err:
        raise InputFileError(f"{path}: not a safetensors file ({err})") from err
    if meta is None:
        raise InputFileError(f"{path}: not a diffrl value net (no diffrl_value_net metadata)")
    net = ValueNet(**json.loads(meta))
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def value_net_value(net: ValueNet):
    """SVDD-MC: the learned value of each state."""

    def value(pipe, latents, timestep, noise_pred, prompts, prompt_embeds):
        t = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(latents.shape[0])
        return net(latents, t, prompt_embeds.float().mean(dim=1)).float()

    return value


@torch.no_grad()
def value_targets(pipe, prompts: list[str], reward_fn, settings: SamplerSettings, *, generator):
    """Rollouts of the pretrained model as regression data: every intermediate state x_{t_j}
    (j = 1..T-1; ``settings`` with eta > 0) labelled with its chain's final reward. Returns (latents ``[N(T-1), C, h, w]``,
    timesteps ``[N(T-1)]``, pooled text ``[N(T-1), D]``, rewards ``[N(T-1)]``)."""
    traj = sample_trajectories(pipe, prompts, settings, generator=generator)
    r = reward_fn(traj.images, prompts, [{} for _ in prompts]).float()
    n, steps = len(prompts), settings.num_steps - 1
    latents = traj.latents[:, 1 : settings.num_steps].reshape(n * steps, *traj.latents.shape[2:])
    timesteps = traj.timesteps[1:].repeat(n)
    text = traj.text.embeds.float().mean(dim=1).repeat_interleave(steps, dim=0)
    return latents, timesteps, text, r.repeat_interleave(steps)


def train_value_net(
    data, *, epochs: int = 200, lr: float = 1e-3, batch_size: int = 256, seed: int = 0
) -> ValueNet:
    """Fit a :class:`ValueNet` by least squares on :func:`value_targets` data (SVDD Eq. 6, α → 0)."""
    latents, timesteps, text, rewards = data
    torch.manual_seed(seed)
    std = rewards.std().item()
    net = ValueNet(
        latents.shape[1], text.shape[1], shift=rewards.mean().item(), scale=std if std > 0 else 1.0
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(rewards), generator=generator).split(batch_size):
            error = (net(latents[idx], timesteps[idx], text[idx]) - rewards[idx]) / net.config["scale"]
            loss = error.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()
