"""Finding and reading weight files: local paths first, then the hub cache or the hub."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def resolve_file(name_or_path: str, filename: str) -> Path:
    """A local file, or ``filename`` from the hub repo ``name_or_path`` (cache first).

    Raises ``FileNotFoundError`` naming the missing file and how to provide it offline.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise FileNotFoundError(f"{path / filename}: no such file")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name_or_path, filename))
    except Exception as err:  # offline, missing repo or file: all end the same way for the user
        raise FileNotFoundError(
            f"could not get {filename!r} from the hub repo {name_or_path!r} ({type(err).__name__}). "
            f"Offline, download it elsewhere and pass its local path instead of {name_or_path!r}."
        ) from err


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or from a torch file with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def from_pretrained(cls, name_or_path: str, what: str, **kwargs):
    """``cls.from_pretrained(name_or_path)`` (a transformers model or processor), with one clear
    error when it cannot be found: offline, a hub id that is not cached names itself and what to pass."""
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"could not load the {what} {name_or_path!r} ({reason}). Offline, download it elsewhere "
            "and pass its local folder instead."
        ) from err
