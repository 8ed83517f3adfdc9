"""Learned proxy rewards for over-optimisation studies (Gao et al. 2023; Coste et al. 2024): small
CNNs regressed on a limited, noisy set of verifier labels, as a stand-in for a learned reward model
that a policy can exploit while the exact verifier (the "gold" reward) says it got worse.

A member scores ``(image [3, 32, 32], prompt)``: a four-layer CNN on the image and a bag of hashed
prompt words (mean of their embeddings), concatenated, then an MLP. An ensemble file holds K
members trained on different bootstrap resamples (``scripts/train_proxy_rewards.py``); the
``proxy`` reward returns their mean, or one ``member`` (for the ``ensemble`` reward's WCO/UWO).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from diffrl.files import atomic_write_bytes

SIZE = 32
"""Image side the proxies read (images are area-resized to it)."""


def word_ids(prompts: list[str], buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hashed word ids and per-prompt offsets for ``nn.EmbeddingBag`` (crc32 of each lower-case
    word modulo ``buckets``: stable across processes, unlike ``hash``)."""
    ids, offsets = [], []
    for prompt in prompts:
        offsets.append(len(ids))
        ids += [zlib.crc32(w.encode()) % buckets for w in prompt.lower().split()] or [0]
    return torch.tensor(ids), torch.tensor(offsets)


class ProxyNet(nn.Module):
    """One proxy: ``(images [B, 3, 32, 32] in [0, 1], prompts) -> [B]``."""

    def __init__(self, buckets: int = 256, width: int = 32):
        super().__init__()
        self.buckets = buckets
        self.conv = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.words = nn.EmbeddingBag(buckets, 2 * width, mode="mean")
        self.head = nn.Sequential(nn.Linear(4 * width, 2 * width), nn.SiLU(), nn.Linear(2 * width, 1))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="area")
        ids, offsets = word_ids(prompts, self.buckets)
        text = self.words(ids.to(x.device), offsets.to(x.device))
        return self.head(torch.cat([self.conv(x * 2 - 1).flatten(1), text], dim=1)).squeeze(1)


def save_ensemble(path: str | Path, members: list[ProxyNet], info: dict) -> None:
    """K members in one ``.safetensors`` (``member{k}.`` prefixes), written atomically; ``info``
    (how they were trained) goes into its metadata with the architecture."""
    tensors = {
        f"member{k}.{n}": t.detach().contiguous()
        for k, m in enumerate(members)
        for n, t in m.state_dict().items()
    }
    meta = {"members": len(members), "buckets": members[0].buckets, "width": members[0].conv[0].out_channels}
    atomic_write_bytes(path, save(tensors, metadata={"proxy": json.dumps({**meta, **info})}))


def load_ensemble(path: str | Path) -> tuple[list[ProxyNet], dict]:
    """The members of an ensemble file and its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["proxy"])
    tensors = load_file(str(path))
    members = []
    for k in range(meta["members"]):
        net = ProxyNet(meta["buckets"], meta["width"])
        prefix = f"member{k}."
        net.load_state_dict({n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)})
        members.append(net.eval().requires_grad_(False))
    return members, meta


def proxy(weights: str, member: int | None = None, device: str = "cpu"):
    """Reward factory: the mean of the ensemble in ``weights`` (or its ``member``-th proxy).

    Returns ``(images [B, 3, H, W] in [0, 1], prompts, metadata) -> [B]`` float32."""
    members, meta = load_ensemble(weights)
    if member is not None:
        if not 0 <= member < len(members):
            from diffrl.errors import RewardError

            raise RewardError(f"reward 'proxy': member {member} of {weights}, which holds {len(members)}")
        members = [members[member]]
    members = [m.to(device) for m in members]

    @torch.no_grad()
    def reward(images, prompts, metadata):
        x = images.to(device)
        return torch.stack([m(x, list(prompts)) for m in members]).mean(0).cpu()

    return reward


def fit_member(
    images: torch.Tensor,
    prompts: list[str],
    labels: torch.Tensor,
    seed: int,
    steps: int,
    batch: int = 64,
    lr: float = 2e-3,
) -> ProxyNet:
    """One proxy regressed (MSE, AdamW) on a bootstrap resample (drawn from ``seed``) of
    ``images [N, 3, 32, 32]``, ``prompts [N]``, ``labels [N]``."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ProxyNet()
    sample = torch.randint(len(prompts), (len(prompts),), generator=generator)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        rows = sample[torch.randint(len(sample), (batch,), generator=generator)]
        loss = F.mse_loss(net(images[rows], [prompts[i] for i in rows.tolist()]), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval().requires_grad_(False)


__all__ = ["ProxyNet", "fit_member", "load_ensemble", "proxy", "save_ensemble", "word_ids"]
