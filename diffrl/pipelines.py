"""Loading diffusion pipelines by name: Stable Diffusion 1.x/2.x, latent consistency models,
and the built-in models that ship with diffrl (no download)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from diffrl import testing
from diffrl.errors import PipelineNotFoundError

BUILTIN_PIPELINES: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-sd": testing.tiny_sd_pipeline,
    "tiny-lcm-random": testing.tiny_lcm_pipeline,
}
"""Names that :func:`load_pipeline` resolves without any file: randomly initialised tiny models."""

ASSETS = Path(__file__).parent / "assets"
SHIPPED_PIPELINES = {"tiny": ASSETS / "tiny", "tiny-lcm": ASSETS / "tiny-lcm"}
"""Pretrained pipelines shipped inside the package (diffusers folders, loaded with from_pretrained).
``tiny``: a ~2M-parameter text-to-image model of the toy world (scripts/pretrain_tiny.py);
``tiny-lcm``: its latent consistency distillation (scripts/distill_tiny_lcm.py)."""


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


@dataclass
class PipelineInfo:
    """What a pipeline is, read from its config files alone (no weights loaded)."""

    is_lcm: bool
    """A latent consistency model (LCMScheduler, guidance embedding) rather than SD with DDIM."""
    vae_scale_factor: int
    """Pixels per latent cell along each side (8 for Stable Diffusion)."""
    resolution: int
    """Native image side in pixels (UNet sample size x VAE factor)."""
    latent_channels: int = 4
    """Channels of the latents the UNet denoises."""


def inspect_pipeline(
    name_or_path: str, *, revision: str | None = None, local_files_only: bool = False
) -> PipelineInfo:
    """Resolve a pipeline name and read its ``model_index.json``, ``vae/config.json`` and
    ``unet/config.json`` without loading weights, so that a missing model or an incompatible
    resolution is reported before anything heavy starts. Raises :class:`PipelineNotFoundError`."""
    if name_or_path in BUILTIN_PIPELINES:
        return PipelineInfo(name_or_path == "tiny-lcm-random", 4, testing.TINY_RESOLUTION)
    name_or_path = str(SHIPPED_PIPELINES.get(name_or_path, name_or_path))
    index = _read_model_index(name_or_path, revision, local_files_only)
    is_lcm = "LatentConsistency" in index.get("_class_name", "") or "LCM" in str(index.get("scheduler", ""))
    try:
        vae = AutoencoderKL.load_config(
            name_or_path, subfolder="vae", revision=revision, local_files_only=local_files_only
        )
        unet = UNet2DConditionModel.load_config(
            name_or_path, subfolder="unet", revision=revision, local_files_only=local_files_only
        )
    except (OSError, ValueError) as err:
        raise PipelineNotFoundError(
            f"{name_or_path}: its vae/config.json or unet/config.json cannot be read ({err})"
        ) from err
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    sample_size = unet["sample_size"]
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return PipelineInfo(is_lcm, factor, sample_size * factor, unet.get("in_channels", 4))


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
        name_or_path: a shipped model (``tiny``, ``tiny-lcm``), a built-in random test model
            (``tiny-sd``, ``tiny-lcm-random``), a local diffusers folder, or a
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
        is_lcm = inspect_pipeline(name_or_path, revision=revision, local_files_only=local_files_only).is_lcm
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
