"""Run folders and checkpoints: atomic, resumable, pruned.

A checkpoint is the folder ``<run>/checkpoints/epoch_XXXX`` holding the trainable weights
(``trainable.safetensors``), the optimizer state (``optimizer.pt``, read back with
``weights_only=True``), each process's RNG streams (``rng_rank{r}.pt``) and ``state.json`` (the
epoch it completed, the stat tracker). It is written under a ``.tmp`` name and renamed only when
complete, so a crash never leaves a partial checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^epoch_(\d{4,})$")


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    """Folder of the checkpoint taken after ``epoch`` (0-based) completed."""
    return run_dir / "checkpoints" / f"epoch_{epoch:04d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp`` folders are ignored)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(path: str | Path) -> tuple[Path, Path | None]:
    """``(run_dir, checkpoint)`` for a checkpoint folder or a run folder (its latest checkpoint).

    A run folder that was stopped before its first checkpoint (it has ``config.yaml`` but no
    complete checkpoint) gives ``checkpoint=None``: the run starts again from epoch 0.
    """
    path = Path(path).expanduser()
    if (path / "state.json").is_file():
        return path.parent.parent, path
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return path, checkpoints[-1]
    if (path / "config.yaml").is_file():
        return path, None
    raise FileNotFoundError(
        f"resume_from {path}: not a run folder (no config.yaml) and no complete checkpoint in {path / 'checkpoints'}"
    )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name, detached and contiguous."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    model: torch.nn.Module,
    optimizer,
    rng: dict,
    state: dict,
    rank: int,
    is_main: bool,
    barrier,
) -> Path | None:
    """Write the checkpoint after ``epoch``; every process calls it (``barrier`` syncs them).

    Returns the final folder on the main process, else None.
    """
    final = checkpoint_dir(run_dir, epoch)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    if is_main:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, epoch=epoch)))
    barrier()
    if not is_main:
        return None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, optimizer, rank: int) -> tuple[dict, dict]:
    """Restore weights and optimizer in place; returns ``(state, rng)`` for this process."""
    weights = load_file(str(checkpoint / "trainable.safetensors"))
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise ValueError(
            f"checkpoint {checkpoint} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}"
        )
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    rng_file = checkpoint / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file}: resuming needs the same number of processes as the checkpointed run"
        )
    rng = torch.load(rng_file, weights_only=True)
    return json.loads((checkpoint / "state.json").read_text()), rng
