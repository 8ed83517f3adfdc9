"""Tiny diffusers pipelines built in code, for tests and for trying rewards without a download.

``tiny_sd_pipeline`` returns a real :class:`diffusers.StableDiffusionPipeline`,
``tiny_lcm_pipeline`` a :class:`diffusers.LatentConsistencyModelPipeline`, ``tiny_sd3_pipeline`` a
:class:`diffusers.StableDiffusion3Pipeline` (two CLIP encoders with projection and a T5 encoder)
and ``tiny_flux_pipeline`` a :class:`diffusers.FluxPipeline` (CLIP + T5, packed latents, the
guidance embedding of FLUX.1-dev or none as FLUX.1-schnell): the same classes, schedulers and code
paths as the full-size models, at about 0.1-2M parameters. Images are 32x32 RGB; latents are
``[B, 4, 8, 8]`` (SD, SD3; VAE downsampling factor 4) or ``[B, 4, 8, 8]`` packed into 16 tokens of
16 channels (FLUX). Nothing is downloaded: the T5 tokenizer is a word-level ``T5TokenizerFast``
built from the byte alphabet.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

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

    The vocabulary and an empty merges file are written to ``directory`` (by default a temp dir,
    removed once the tokenizer has read them) and loaded with ``CLIPTokenizer.from_pretrained``, as a
    downloaded one would be.
    """
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="diffrl-tok-") as scratch:
            return tiny_clip_tokenizer(scratch)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_alphabet()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": _MAX_TOKENS}))
    return CLIPTokenizer.from_pretrained(str(folder))


def _text_encoder(vocab_size: int, cls=CLIPTextModel, **extra) -> CLIPTextModel:
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
        **extra,
    )
    return cls(config)


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


def _vae(**extra) -> AutoencoderKL:
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
        **extra,
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


_T5_DIM = 64
_T5_TOKENS = 32
"""max_sequence_length the tiny flow pipelines are built for (T5 tokens per prompt)."""


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer built in code the way T5's own is (a Unigram model, ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, "▁" word starts, ``</s>`` appended): its pieces are "▁" and the 256 byte symbols,
    so every prompt is spelled out character by character."""
    pieces = ["▁", *dict.fromkeys(_byte_alphabet())]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(piece, -1.0) for piece in pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _t5(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size, d_model=_T5_DIM, d_kv=16, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0
    )
    return T5EncoderModel(config)


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A randomly initialised ``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel`` (patch 2,
    2 layers, 4 heads of 8), two ``CLIPTextModelWithProjection`` (pooled 2 x 32) and a T5 encoder
    (width 64), a VAE with SD3's shift factor, ``FlowMatchEulerDiscreteScheduler`` with SD3's
    shift 3. Deterministic in ``seed``."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    clip = dict(cls=CLIPTextModelWithProjection, projection_dim=_TEXT_DIM)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 4,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _TEXT_DIM,
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5305).eval(),
        text_encoder=_text_encoder(len(tokenizer), **clip).eval(),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(len(tokenizer), **clip).eval(),
        tokenizer_2=tokenizer,
        text_encoder_3=_t5(len(tiny_t5_tokenizer())).eval(),
        tokenizer_3=tiny_t5_tokenizer(),
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A randomly initialised ``FluxPipeline``: a ``FluxTransformer2DModel`` (1 double + 1 single
    block, 2 heads of 16, RoPE axes 4/4/8) on 2x2-packed latents, CLIP (pooled 32) and T5 (width 64)
    encoders, FLUX's dynamic-shift ``FlowMatchEulerDiscreteScheduler``; with the guidance embedding
    of FLUX.1-dev, or without it as FLUX.1-schnell. Deterministic in ``seed``."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=_TEXT_DIM,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer.eval(),
        scheduler=scheduler,
        vae=_vae(shift_factor=0.1159, scaling_factor=0.3611).eval(),
        text_encoder=_text_encoder(len(tokenizer)).eval(),
        tokenizer=tokenizer,
        text_encoder_2=_t5(len(tiny_t5_tokenizer())).eval(),
        tokenizer_2=tiny_t5_tokenizer(),
    )
    pipe.default_sample_size = TINY_RESOLUTION // 4  # latent cells (FLUX's transformer has no sample_size)
    return pipe
