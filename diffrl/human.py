"""Human feedback for D3PO: saved rollouts and the labels people give them.

With ``d3po.preferences: human`` every epoch's rollouts (each process's own) are written to

    RUN_DIR/rollouts/epoch_EEEE/rank_R/
        rollout.safetensors   latents [N, T+1, C, h, w], log_probs [N, T], prompt_embeds [N, L, D],
                              negative_prompt_embeds [N, L, D] (when guided), the pooled ones
                              [N, P] (SD3, FLUX), timesteps [T], parents [N] (group of each
                              sample), rewards [N] (NaN: dropped)
        rollout.json          prompts, the groups (prompt, member sample indices, image files),
                              the reward metadata of each sample
        images/NNNN.png       the decoded images
        labels.jsonl          the labels, appended one line per choice (``diffrl label``)

The folder is written whole into a temporary folder and renamed, so it is either complete or
absent. A label line is ``{"group": g, "best": i, "worst": j}`` (i, j: positions in the group's
image list) or ``{"group": g, "tie": true}``; the last line for a group wins, so a choice can be
corrected. The paper's human path scores images and compares every pair (Sec. 5.1); here a label
names the best and the worst image of a group, which decides the pairs of a group of k images as
best ≻ every other and every other ≻ worst (2k − 3 decided pairs; the rest are ties).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffrl.algorithms.d3po import Pairs, group_pairs
from diffrl.errors import InputFileError
from diffrl.files import atomic_write_bytes, read_jsonl
from diffrl.rewards.jpeg import to_uint8
from diffrl.types import Text, Trajectory

ROLLOUT_FILES = ("rollout.safetensors", "rollout.json")
TEXT_TENSORS = (
    "prompt_embeds",
    "pooled_prompt_embeds",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
"""The names in rollout.safetensors of a trajectory's :class:`~diffrl.types.Text` tensors, in its order."""


def rollout_folder(run_dir: str | Path, epoch: int, rank: int) -> Path:
    """Where process ``rank`` keeps the rollouts of ``epoch``."""
    return Path(run_dir) / "rollouts" / f"epoch_{epoch:04d}" / f"rank_{rank}"


def is_saved(folder: Path) -> bool:
    """Whether ``folder`` holds a complete saved rollout."""
    return all((folder / name).is_file() for name in ROLLOUT_FILES)


def save_rollouts(folder: Path, traj: Trajectory, rewards: torch.Tensor, metadata: list[dict]) -> None:
    """Write one process's epoch of rollouts (``traj`` with ``parents`` = groups, ``rewards [N]``,
    the rewards' metadata) to ``folder``, all at once (temporary folder, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    tensors = {
        "latents": traj.latents,
        "log_probs": traj.log_probs,
        "timesteps": traj.timesteps,
        "parents": traj.parents,
        "rewards": rewards.float(),
    }
    for name, tensor in zip(TEXT_TENSORS, traj.text.tensors()):
        if tensor is not None:
            tensors[name] = tensor
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "rollout.safetensors")
    )
    (tmp / "images").mkdir()
    for i, array in enumerate(to_uint8(traj.images)):
        Image.fromarray(array).save(tmp / "images" / f"{i:04d}.png")
    groups = []
    for g in torch.unique(traj.parents).tolist():
        members = (traj.parents == g).nonzero().flatten().tolist()
        groups.append(
            {
                "group": g,
                "prompt": traj.prompts[members[0]],
                "members": members,
                "images": [f"images/{i:04d}.png" for i in members],
            }
        )
    index = {"prompts": traj.prompts, "groups": groups, "metadata": metadata}
    atomic_write_bytes(tmp / "rollout.json", json.dumps(index, indent=1).encode())
    shutil.rmtree(folder, ignore_errors=True)  # a torn earlier attempt has no rollout files anyway
    tmp.rename(folder)


def load_rollouts(folder: Path) -> tuple[Trajectory, torch.Tensor, list[dict]]:
    """Read back :func:`save_rollouts`: (the trajectory, images from the PNGs; rewards ``[N]``; metadata)."""
    tensors = load_file(str(folder / "rollout.safetensors"))
    index = read_index(folder)
    images = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(folder / f"images/{i:04d}.png").convert("RGB")))
            for i in range(len(index["prompts"]))
        ]
    )
    traj = Trajectory(
        prompts=index["prompts"],
        text=Text(*(tensors.get(name) for name in TEXT_TENSORS)),
        latents=tensors["latents"],
        timesteps=tensors["timesteps"],
        log_probs=tensors["log_probs"],
        images=images.permute(0, 3, 1, 2).float() / 255,
        parents=tensors["parents"],
    )
    return traj, tensors["rewards"], index["metadata"]


def read_index(folder: Path) -> dict:
    """``rollout.json`` of a saved rollout folder."""
    return json.loads((folder / "rollout.json").read_text(encoding="utf-8"))


def check_label(record: dict, groups: list[dict]) -> str | None:
    """What is wrong with one label record against the folder's ``groups`` (None: nothing)."""
    g = record.get("group")
    if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < len(groups):
        return f"'group' must be an integer in [0, {len(groups)}), got {g!r}"
    if record.get("tie") is True:
        return None
    size = len(groups[g]["members"])
    best, worst = record.get("best"), record.get("worst")
    for key, value in (("best", best), ("worst", worst)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < size:
            return f"'{key}' must be an image position in [0, {size}) of group {g}, got {value!r}"
    if best == worst:
        return f"'best' and 'worst' are the same image ({best}) of group {g}"
    return None


def read_labels(folder: Path) -> dict[int, dict]:
    """The labels of a rollout folder, group -> its last label. A malformed or inconsistent line
    raises :class:`InputFileError` naming the file and line (a torn last line is skipped)."""
    path = folder / "labels.jsonl"
    groups = read_index(folder)["groups"]
    labels = {}
    for number, record in enumerate(read_jsonl(path, strict=True), start=1):
        problem = check_label(record, groups)
        if problem:
            raise InputFileError(f"{path}: label {number}: {problem}")
        labels[record["group"]] = record
    return labels


def label_pairs(groups: torch.Tensor, folder: Path) -> Pairs:
    """D3PO's pairs of a saved epoch from its labels.

    Args:
        groups: ``[N]`` group id of each sample (``parents`` of the saved trajectory).

    Every pair (a, b) of a group (as :func:`diffrl.algorithms.d3po.group_pairs` orders them) gets
    h = [1, −1] when a is the group's best or b its worst, [−1, 1] in the mirrored case, and
    [0, 0] for two middle images, a tie label or an unlabeled group.
    """
    labels, index = read_labels(folder), read_index(folder)
    first, second = group_pairs(groups)
    h = torch.zeros(first.shape[0], 2)
    for p, (a, b) in enumerate(zip(first.tolist(), second.tolist())):
        label = labels.get(int(groups[a]))
        if label is None or label.get("tie"):
            continue
        members = index["groups"][label["group"]]["members"]
        best, worst = members[label["best"]], members[label["worst"]]
        if a == best or b == worst:
            h[p] = torch.tensor([1.0, -1.0])
        elif b == best or a == worst:
            h[p] = torch.tensor([-1.0, 1.0])
    return Pairs(first, second, h)


def rollout_folders(run_dir: str | Path) -> list[Path]:
    """Every complete saved rollout folder of a run, in epoch then rank order."""
    root = Path(run_dir) / "rollouts"
    folders = [f for f in root.glob("epoch_*/rank_*") if is_saved(f)]
    return sorted(folders, key=lambda f: (f.parent.name, int(f.name.split("_")[1])))


def unlabeled(folder: Path) -> list[int]:
    """Groups of a saved rollout folder that have no label yet."""
    labels = read_labels(folder)
    return [g["group"] for g in read_index(folder)["groups"] if g["group"] not in labels]
