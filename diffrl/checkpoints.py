"""Checkpoints: atomic, verified, resumable, pruned.

A checkpoint is the folder ``<run>/checkpoints/epoch_XXXX`` holding the trainable weights
(``trainable.safetensors``), the moving average of them when the run keeps one
(``ema.safetensors``, :mod:`diffrl.ema`), the optimizer state (``optimizer.pt``, read back with
``weights_only=True``; under FSDP each process's shards, ``optimizer_rank{r}.pt``), each process's RNG streams (``rng_rank{r}.pt``), ``state.json`` (the
epoch it completed, the algorithm's state) and, written last, ``manifest.json``: the size and
SHA-256 of every other file. It is written under a ``.tmp`` name and renamed only when complete,
so a crash never leaves a partial checkpoint that resume would pick up; a checkpoint damaged
afterwards (a truncated copy, a flipped bit, a deleted file) fails its manifest, and resuming a
run takes the newest checkpoint that verifies, saying which it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from diffrl.errors import InputFileError
from diffrl.sharding import copy_full, local_tensor, reshard, sharded, whole_on_cpu

_NAME = re.compile(r"^epoch_(\d{4,})$")
MANIFEST = "manifest.json"


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    """Folder of the checkpoint taken after ``epoch`` (0-based) completed."""
    return run_dir / "checkpoints" / f"epoch_{epoch:04d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run (a manifest, or a ``state.json`` from before manifests),
    oldest first; ``.tmp`` folders are ignored. Cheap: nothing is hashed (see :func:`verify`)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if _NAME.match(p.name) and ((p / MANIFEST).is_file() or (p / "state.json").is_file())
    ]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """``folder/manifest.json``: size and SHA-256 of every file in ``folder`` (written last)."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` is not complete (a file missing, of the wrong size or hash; an
    unreadable manifest), or None when every file its manifest lists verifies. A checkpoint from
    before manifests (``state.json``, no manifest) passes; its files are checked as they load."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return None if (checkpoint / "state.json").is_file() else f"{MANIFEST} is missing"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        listed = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    for name in ("state.json", "trainable.safetensors"):
        if name not in listed:
            return f"{MANIFEST} does not list {name}"
    if "optimizer.pt" not in listed and "optimizer_rank0.pt" not in listed:
        return f"{MANIFEST} lists no optimizer state (optimizer.pt)"
    for name, (size, digest) in listed.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {size}"
        if _sha256(path) != digest:
            return f"{name} does not match its manifest's SHA-256 (damaged)"
    return None


_VERIFIED: dict = {}


def newest_complete(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of ``run_dir`` that verifies, and the newer ones skipped with why.
    Memoised on every checkpoint file's name, size and time, so the checks before and at resume
    hash each file once."""
    checkpoints = list_checkpoints(run_dir)
    key = tuple(
        (str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
        for p in checkpoints
        for f in sorted(p.iterdir())
    )
    if key not in _VERIFIED:
        skipped, found = [], None
        for checkpoint in reversed(checkpoints):
            problem = verify(checkpoint)
            if problem is None:
                found = checkpoint
                break
            skipped.append((checkpoint, problem))
        _VERIFIED[key] = found, skipped
    return _VERIFIED[key]


def resolve_resume(path: str | Path, report: bool = False) -> tuple[Path, Path | None]:
    """``(run_dir, checkpoint)`` for a checkpoint folder or a run folder (its newest complete
    checkpoint; with ``report``, each newer damaged one skipped is named on stderr).

    A run folder that was stopped before its first checkpoint (it has ``config.yaml`` but no
    checkpoint) gives ``checkpoint=None``: the run starts again from epoch 0. Raises
    :class:`InputFileError` naming the file when the named checkpoint, or every checkpoint of the
    run, is damaged.
    """
    path = Path(path).expanduser()
    if _NAME.match(path.name) and path.parent.name == "checkpoints" and path.is_dir():
        problem = verify(path)
        if problem:
            raise InputFileError(f"resume_from {path}: not a complete checkpoint: {problem}")
        return path.parent.parent, path
    checkpoint, skipped = newest_complete(path)
    if report:
        for bad, problem in skipped:
            print(f"diffrl: resume: skipping {bad}: {problem}", file=sys.stderr, flush=True)
    if checkpoint is not None:
        return path, checkpoint
    if skipped:
        reasons = "; ".join(f"{bad.name}: {problem}" for bad, problem in skipped)
        raise InputFileError(f"resume_from {path}: no checkpoint verifies ({reasons})")
    if (path / "config.yaml").is_file():
        return path, None
    raise FileNotFoundError(
        f"resume_from {path}: not a run folder (no config.yaml) and no complete checkpoint in {path / 'checkpoints'}"
    )


def trainable_state(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name: whole tensors on the CPU, each FSDP2 shard
    gathered in turn (:mod:`diffrl.sharding`; a collective, so every process calls it, and only
    one tensor at a time is whole on the device). ``keep=False`` (the processes that write
    nothing) takes part in the gathers and keeps nothing."""
    reshard(model)
    return whole_on_cpu(((n, p) for n, p in model.named_parameters() if p.requires_grad), keep)


def optimizer_file(model: torch.nn.Module, rank: int) -> str:
    """Where a process's optimizer state goes: ``optimizer.pt`` (the main process's, identical on
    all), or under FSDP each process's own shards, ``optimizer_rank{r}.pt``."""
    return f"optimizer_rank{rank}.pt" if sharded(model) else "optimizer.pt"


def local_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with each FSDP2-sharded state tensor as this process's part."""
    state = optimizer.state_dict()
    state["state"] = {
        i: {k: local_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
        for i, entry in state["state"].items()
    }
    return state


def load_optimizer_state(optimizer, state: dict) -> None:
    """Inverse of :func:`local_optimizer_state`: each per-element state tensor of a sharded
    parameter becomes a shard laid out like its parameter again."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, DTensor):
                entry = optimizer.state.get(p, {})
                for k, v in entry.items():
                    if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.dim() > 0:
                        entry[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False)


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
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path | None:
    """Write the checkpoint after ``epoch``; every process calls it (``barrier`` syncs them).
    ``tensors`` maps more safetensors files of the main process to their contents (``ema.safetensors``).

    Returns the final folder on the main process, else None.
    """
    final = checkpoint_dir(run_dir, epoch)
    tmp = final.with_name(final.name + ".tmp")
    weights = trainable_state(model, keep=is_main)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    if sharded(model):
        torch.save(local_optimizer_state(optimizer), tmp / optimizer_file(model, rank))
    if is_main:
        save_file(weights, str(tmp / "trainable.safetensors"))
        if not sharded(model):
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, epoch=epoch)))
        for name, contents in (tensors or {}).items():
            save_file(contents, str(tmp / name))
    barrier()
    if not is_main:
        return None
    write_manifest(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _read(path: Path, kind: str, read):
    """``read(path)``, a damaged or missing file raising :class:`InputFileError` naming it."""
    try:
        return read(path)
    except (OSError, SafetensorError, RuntimeError, ValueError, EOFError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputFileError(f"{path}: cannot be read as {kind} ({message})") from err


def load_tensors(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``checkpoint/name`` (one of :func:`save_checkpoint`'s ``tensors``); a missing
    or damaged file is an :class:`InputFileError` naming it."""
    return _read(checkpoint / name, "safetensors tensors", lambda p: load_file(str(p)))


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, optimizer, rank: int) -> tuple[dict, dict]:
    """Restore weights and optimizer in place (under FSDP each process takes its shards of the
    whole weights and reads its own optimizer file); returns ``(state, rng)`` for this process."""
    weights = _read(checkpoint / "trainable.safetensors", "safetensors weights", lambda p: load_file(str(p)))
    reshard(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = set(trainable) - set(weights)
    if missing:
        raise InputFileError(
            f"checkpoint {checkpoint} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}"
        )
    state = _read(checkpoint / "state.json", "JSON", lambda p: json.loads(p.read_text(encoding="utf-8")))
    optimizer_path = checkpoint / optimizer_file(model, rank)
    if not optimizer_path.is_file() and sharded(model):
        raise FileNotFoundError(
            f"{optimizer_path}: resuming under FSDP needs the checkpoint of an FSDP run with as many processes"
        )
    optimizer_state = _read(optimizer_path, "an optimizer state", lambda p: torch.load(p, weights_only=True))
    rng_file = checkpoint / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"{rng_file}: resuming needs the same number of processes as the checkpointed run"
        )
    rng = _read(rng_file, "random-stream states", lambda p: torch.load(p, weights_only=True))
    for name, p in trainable.items():
        copy_full(p, weights[name])
    _read(optimizer_path, "an optimizer state", lambda p: load_optimizer_state(optimizer, optimizer_state))
    return state, rng
