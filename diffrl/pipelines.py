"""Loading diffusion pipelines by name: Stable Diffusion 1.x/2.x, latent consistency models,
and the built-in models that ship with diffrl (no download)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
)

from diffrl import testing

BUILTIN_PIPELINES: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-sd": testing.tiny_sd_pipeline,
    "tiny-lcm": testing.tiny_lcm_pipeline,
}
"""Names that :func:`load_pipeline` resolves without any file: randomly initialised tiny models."""

ASSETS = Path(__file__).parent / "assets"
SHIPPED_PIPELINES = {"tiny": ASSETS / "tiny"}
"""Pretrained pipelines shipped inside the package (diffusers folders, loaded with from_pretrained).
``tiny``: a ~2M-parameter text-to-image model of the toy world (scripts/pretrain_tiny.py)."""


class PipelineNotFoundError(OSError):
    """The named pipeline is neither built in, a local diffusers folder, nor in the hub cache."""


def _read_model_index(name_or_path: str, revision: str | None, local_files_only: bool) -> dict:
    """``model_index.json`` of a local folder or hub repo; a clear error when it can't be had."""
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not (path / "model_index.json").is_file():
        raise PipelineNotFoundError(
            f"{name_or_path}: not a diffusers pipeline folder (no model_index.json there)"
        )
    try:
        return DiffusionPipeline.load_config(
            str(path) if looks_local else name_or_path,
            revision=revision,
            local_files_only=local_files_only,
        )
    except (OSError, ValueError) as err:
        raise PipelineNotFoundError(
            f"{name_or_path}: could not load model_index.json from the hub or its cache ({type(err).__name__}). "
            "Offline, download the model elsewhere (e.g. `huggingface-cli download "
            f"{name_or_path} --local-dir DIR`), copy DIR here and pass its path instead of the hub id; "
            f"built-in names: {', '.join([*SHIPPED_PIPELINES, *BUILTIN_PIPELINES])}"
        ) from err


def load_pipeline(
    name_or_path: str,
    *,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    local_files_only: bool = False,
    **kwargs,
) -> DiffusionPipeline:
    """Load a pipeline ready for diffrl: SD with a ``DDIMScheduler``, or an LCM with its ``LCMScheduler``.

    Args:
        name_or_path: a shipped model (``tiny``), a built-in random test model (``tiny-sd``,
            ``tiny-lcm``), a local diffusers folder, or a
            hub id (``CompVis/stable-diffusion-v1-4``, ``SimianLuo/LCM_Dreamshaper_v7``).
        revision: hub revision; torch_dtype: weights dtype; device: where to move the pipeline.
        local_files_only: never touch the network (also implied by ``HF_HUB_OFFLINE=1``).
        **kwargs: passed to ``from_pretrained`` (``variant=...``).

    The safety checker is always off (rewards see raw images). Progress bars are disabled.
    """
    if name_or_path in SHIPPED_PIPELINES:
        name_or_path = str(SHIPPED_PIPELINES[name_or_path])
    if name_or_path in BUILTIN_PIPELINES:
        pipe = BUILTIN_PIPELINES[name_or_path]()
        if torch_dtype is not None:
            pipe.to(dtype=torch_dtype)
    else:
        index = _read_model_index(name_or_path, revision, local_files_only)
        is_lcm = "LatentConsistency" in index.get("_class_name", "") or "LCM" in str(
            index.get("scheduler", "")
        )
        cls = LatentConsistencyModelPipeline if is_lcm else StableDiffusionPipeline
        pipe = cls.from_pretrained(
            name_or_path,
            revision=revision,
            torch_dtype=torch_dtype,
            local_files_only=local_files_only,
            safety_checker=None,
            requires_safety_checker=False,
            **kwargs,
        )
        scheduler_cls = LCMScheduler if is_lcm else DDIMScheduler
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
