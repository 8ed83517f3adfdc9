"""Tiny diffusers pipelines built in code, for tests and for trying rewards without a download.

``tiny_sd_pipeline`` returns a real :class:`diffusers.StableDiffusionPipeline` and
``tiny_lcm_pipeline`` a real :class:`diffusers.LatentConsistencyModelPipeline`: the same classes,
schedulers (SD 1.x betas) and code paths as the full-size models, at about 1-2M parameters.
Images are 32x32 RGB; latents are ``[B, 4, 8, 8]`` (VAE downsampling factor 4).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_RESOLUTION = 32
"""Default image side of the tiny pipelines, in pixels."""

_TEXT_DIM = 32
_MAX_TOKENS = 77

# Stable Diffusion 1.x noise schedule (the scheduler_config.json of SD 1.4/1.5).
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for the bytes 0..255 (GPT-2 scheme).

    Printable Latin-1 bytes map to themselves; the rest are shifted to code points from 256 on.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    alphabet, shift = {}, 0
    for b in range(256):
        if b in keep:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + shift)
            shift += 1
    return [alphabet[b] for b in range(256)]


def tiny_clip_tokenizer(directory: str | Path | None = None) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges): 256 byte symbols, each also with ``</w>``.

    The vocabulary and an empty merges file are written to ``directory`` (a fresh temp dir by
    default) and loaded with ``CLIPTokenizer.from_pretrained``, as a downloaded one would be.
    """
    folder = Path(directory or tempfile.mkdtemp(prefix="diffrl-tok-"))
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_alphabet()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": _MAX_TOKENS}))
    return CLIPTokenizer.from_pretrained(str(folder))


def _text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def _unet(time_cond_proj_dim: int | None = None) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )


def _components(seed: int, time_cond_proj_dim: int | None = None) -> dict:
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    return dict(
        tokenizer=tokenizer,
        text_encoder=_text_encoder(len(tokenizer)).eval(),
        unet=_unet(time_cond_proj_dim).eval(),
        vae=_vae().eval(),
        safety_checker=None,
        feature_extractor=None,
    )


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised ``StableDiffusionPipeline`` (~1.5M parameters) with SD's DDIM scheduler.

    Deterministic in ``seed``. Generates 32x32 images from ``[B, 4, 8, 8]`` latents.
    """
    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(**_components(seed), scheduler=scheduler, requires_safety_checker=False)


def tiny_lcm_pipeline(seed: int = 0) -> LatentConsistencyModelPipeline:
    """A randomly initialised ``LatentConsistencyModelPipeline``: its UNet takes a guidance
    embedding (``time_cond_proj_dim=32``), its scheduler is ``LCMScheduler`` on SD's betas."""
    scheduler = LCMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=True)
    return LatentConsistencyModelPipeline(
        **_components(seed, time_cond_proj_dim=32), scheduler=scheduler, requires_safety_checker=False
    )
