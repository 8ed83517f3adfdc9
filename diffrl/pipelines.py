"""Loading diffusion pipelines by name: Stable Diffusion 1.x/2.x, latent consistency models,
SD3/SD3.5 and FLUX.1, and the built-in models that ship with diffrl (no download)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from diffrl import testing
from diffrl.errors import PipelineNotFoundError

BUILTIN_PIPELINES: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-sd": testing.tiny_sd_pipeline,
    "tiny-lcm-random": testing.tiny_lcm_pipeline,
    "tiny-sd3-random": testing.tiny_sd3_pipeline,
    "tiny-flux-random": testing.tiny_flux_pipeline,
}
"""Names that :func:`load_pipeline` resolves without any file: randomly initialised tiny models."""

_BUILTIN_FAMILIES = {
    "tiny-sd": "ddim",
    "tiny-lcm-random": "lcm",
    "tiny-sd3-random": "flow",
    "tiny-flux-random": "flow",
}

ASSETS = Path(__file__).parent / "assets"
SHIPPED_PIPELINES = {
    "tiny": ASSETS / "tiny",
    "tiny-lcm": ASSETS / "tiny-lcm",
    "tiny-flow": ASSETS / "tiny-flow",
}
"""Pretrained pipelines shipped inside the package (diffusers folders, loaded with from_pretrained).
``tiny``: a ~2M-parameter text-to-image model of the toy world (scripts/pretrain_tiny.py);
``tiny-lcm``: its latent consistency distillation (scripts/distill_tiny_lcm.py); ``tiny-flow``: a
rectified-flow ``StableDiffusion3Pipeline`` of the same world on ``tiny``'s VAE
(scripts/pretrain_tiny_flow.py)."""

FLOW_PIPELINES = {"StableDiffusion3Pipeline": StableDiffusion3Pipeline, "FluxPipeline": FluxPipeline}
"""Flow-matching pipeline classes (``model_index.json``'s ``_class_name``) and what loads them."""

DENOISERS = defaultdict(
    lambda: UNet2DConditionModel,
    StableDiffusion3Pipeline=SD3Transformer2DModel,
    FluxPipeline=FluxTransformer2DModel,
)
"""The denoiser class of each pipeline class (a UNet unless named)."""


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

    family: str
    """The sampler family: ``ddim`` (SD 1.x/2.x), ``lcm`` (latent consistency model, LCMScheduler)
    or ``flow`` (SD3/SD3.5, FLUX: a flow-matching transformer)."""
    vae_scale_factor: int
    """Pixels per latent cell along each side (8 for Stable Diffusion)."""
    resolution: int
    """Native image side in pixels (denoiser sample size x VAE factor)."""
    latent_channels: int = 4
    """Channels of the latents the denoiser works on (unpacked: FLUX's 64 packed are 16)."""


def _family(index: dict) -> str:
    name = index.get("_class_name", "")
    if name in FLOW_PIPELINES:
        return "flow"
    return "lcm" if "LatentConsistency" in name or "LCM" in str(index.get("scheduler", "")) else "ddim"


def inspect_pipeline(
    name_or_path: str, *, revision: str | None = None, local_files_only: bool = False
) -> PipelineInfo:
    """Resolve a pipeline name and read its ``model_index.json``, ``vae/config.json`` and the
    denoiser's ``config.json`` (``unet/`` or ``transformer/``) without loading weights, so that a
    missing model or an incompatible resolution is reported before anything heavy starts. Raises
    :class:`PipelineNotFoundError`."""
    if name_or_path in BUILTIN_PIPELINES:
        return PipelineInfo(_BUILTIN_FAMILIES[name_or_path], 4, testing.TINY_RESOLUTION)
    name_or_path = str(SHIPPED_PIPELINES.get(name_or_path, name_or_path))
    index = _read_model_index(name_or_path, revision, local_files_only)
    family = _family(index)
    part = "transformer" if family == "flow" else "unet"
    try:
        vae = AutoencoderKL.load_config(
            name_or_path, subfolder="vae", revision=revision, local_files_only=local_files_only
        )
        model = DENOISERS[index.get("_class_name", "")].load_config(
            name_or_path, subfolder=part, revision=revision, local_files_only=local_files_only
        )
    except (OSError, ValueError) as err:
        raise PipelineNotFoundError(
            f"{name_or_path}: its vae/config.json or {part}/config.json cannot be read ({err})"
        ) from err
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    sample_size = model.get("sample_size", 128)  # FLUX's transformer has none: its pipeline's default
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    channels = model.get("in_channels", 4)
    if index.get("_class_name") == "FluxPipeline":  # 2x2-packed: 64 token channels, 16 latent ones
        channels //= 4
    return PipelineInfo(family, factor, sample_size * factor, channels)


def load_pipeline(
    name_or_path: str,
    *,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    local_files_only: bool = False,
    **kwargs,
) -> DiffusionPipeline:
    """Load a pipeline ready for diffrl: SD with a ``DDIMScheduler``, an LCM with its
    ``LCMScheduler``, SD3/SD3.5 (``StableDiffusion3Pipeline``) or FLUX.1 (``FluxPipeline``) with
    their own ``FlowMatchEulerDiscreteScheduler``.

    Args:
        name_or_path: a shipped model (``tiny``, ``tiny-lcm``, ``tiny-flow``), a built-in random test model
            (``tiny-sd``, ``tiny-lcm-random``, ``tiny-sd3-random``, ``tiny-flux-random``), a local
            diffusers folder, or a hub id (``CompVis/stable-diffusion-v1-4``,
            ``SimianLuo/LCM_Dreamshaper_v7``, ``stabilityai/stable-diffusion-3.5-medium``,
            ``black-forest-labs/FLUX.1-dev``).
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
        family = inspect_pipeline(name_or_path, revision=revision, local_files_only=local_files_only).family
        common = dict(revision=revision, torch_dtype=torch_dtype, local_files_only=local_files_only, **kwargs)
        if family == "flow":
            pipe = FLOW_PIPELINES[index["_class_name"]].from_pretrained(name_or_path, **common)
        else:
            cls = LatentConsistencyModelPipeline if family == "lcm" else StableDiffusionPipeline
            pipe = cls.from_pretrained(
                name_or_path, safety_checker=None, requires_safety_checker=False, **common
            )
            scheduler_cls = LCMScheduler if family == "lcm" else DDIMScheduler
            pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
