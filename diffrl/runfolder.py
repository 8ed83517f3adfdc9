"""A run folder belongs to one run.

A new run refuses a folder that already holds a run (``config.yaml``, ``metrics.jsonl`` or
``checkpoints/``) unless ``run.overwrite: true`` (the old run folder is deleted first) or
``diffrl train --new-name`` (a free ``NAME-2``, ``NAME-3``, ... is used instead). Resuming keeps
the run's model, algorithm and shapes: only the keys in :data:`RESUMABLE` may differ from the
run's own config, and each resume that changes them appends its changes to
``RUN_DIR/resumes.jsonl``; the next resume applies them again after ``config.yaml``, which
always stays the config the run started with.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from diffrl.configfile import flatten
from diffrl.errors import ConfigError
from diffrl.files import append_jsonl, read_jsonl

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")
RESUMES = "resumes.jsonl"

RESUMABLE = (
    "run.num_epochs",
    "run.save_freq",
    "run.keep_last",
    "run.log_with",
    "run.deterministic",
    "reward.timeout",
    "reward.on_error",
    "train.learning_rate",
    "train.max_grad_norm",
    "train.max_nonfinite_steps",
    "train.ratio_tolerance",
    "train.timesteps_per_pass",
    "sample.merge_lora",
    "model.attention",
    "model.gradient_checkpointing",
    "model.compile",
)
"""Keys a resumed run may change; any other difference from the run's config is refused."""
WHERE = ("run.resume_from", "run.name", "run.output_dir", "run.overwrite")
"""Keys that say where a run is, not what it is: a resumed run is the folder it resumes."""


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds (part of) a run."""
    return any((folder / marker).exists() for marker in RUN_MARKERS)


def writable_folder(folder: str | Path, key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``folder`` is, or can be made as, a
    writable folder (tried with a temporary file in its nearest existing ancestor)."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {folder} cannot be a folder: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".diffrl-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{key}: {folder} cannot be written ({err.strerror or err} in {existing})") from err


def writable_file(path: str | Path, key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless a file can be written at ``path``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a folder; give a file name")
    writable_folder(path.parent, key)


def free_name(output_dir: str | Path, name: str) -> str:
    """``name``, or the first ``name-2``, ``name-3``, ... whose folder holds no run."""
    candidate, n = name, 1
    while holds_run(Path(output_dir) / candidate):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def check_new_run(config) -> None:
    """Before a new (not resumed) run loads anything: its folder can be written and holds no
    other run unless ``run.overwrite``."""
    r = config.run
    writable_folder(r.output_dir, "run.output_dir")
    folder = Path(r.output_dir) / r.name
    if holds_run(folder) and not r.overwrite:
        raise ConfigError(
            f"run.name: {folder} already holds a run; continue it with: diffrl train --resume {folder}   "
            "or start a new one with another run.name, --new-name (a free name), or run.overwrite=true "
            "(deletes it)"
        )


def clear_for_new_run(folder: Path) -> None:
    """``run.overwrite``: delete the run that ``folder`` holds (a folder holding no run is kept)."""
    if holds_run(folder):
        shutil.rmtree(folder)


def recorded_overrides(run_dir: Path) -> list[str]:
    """The ``key=value`` overrides earlier resumes of ``run_dir`` applied, oldest first."""
    overrides = []
    for record in read_jsonl(Path(run_dir) / RESUMES, strict=True):
        overrides += [f"{key}={json.dumps(value)}" for key, value in record.get("set", {}).items()]
    return overrides


def resume_changes(config, saved) -> dict:
    """``{key: (was, now)}`` where ``config`` differs from the run's ``saved`` config; raises
    :class:`ConfigError` naming the first key that a resume may not change."""
    from diffrl.config import to_dict

    now, was = flatten(to_dict(config)), flatten(to_dict(saved))
    changes = {k: (was.get(k), v) for k, v in now.items() if v != was.get(k) and k not in WHERE}
    for key, (before, after) in changes.items():
        if key not in RESUMABLE:
            raise ConfigError(
                f"{key}: the run being resumed has {before!r}, this config {after!r}; a resumed run keeps "
                f"its model, algorithm and shapes (start a new run to change it); a resume may change "
                f"{', '.join(RESUMABLE)}"
            )
    return changes


def saved_config(run_dir: Path):
    """The config a resume of ``run_dir`` continues: its ``config.yaml`` with the changes of
    earlier resumes applied."""
    from diffrl.config import load_config

    return load_config(Path(run_dir) / "config.yaml", recorded_overrides(run_dir))


def check_resume(config, run_dir: Path) -> dict:
    """:func:`resume_changes` of ``config`` against the run it resumes (none for a checkpoint
    whose run folder lost its ``config.yaml``)."""
    if not (Path(run_dir) / "config.yaml").is_file():
        return {}
    return resume_changes(config, saved_config(run_dir))


def record_resume(run_dir: Path, epoch: int, changes: dict) -> None:
    """Append this resume (the epoch it starts at, each changed key's old and new value) to
    ``RUN_DIR/resumes.jsonl``."""
    append_jsonl(
        Path(run_dir) / RESUMES,
        {
            "time": round(time.time(), 3),
            "start_epoch": epoch,
            "set": {k: after for k, (_, after) in changes.items()},
            "was": {k: before for k, (before, _) in changes.items()},
        },
    )
