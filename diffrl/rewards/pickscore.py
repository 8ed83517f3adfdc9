"""PickScore (Kirstain et al. 2023, *Pick-a-Pic*, Sec. 4): CLIP ViT-H/14 fine-tuned on human
preferences between generated images; the score of an image for a prompt is the CLIP logit

    s(x, c) = exp(logit_scale) · cos(E_img(x), E_txt(c))                     (their Eq. 1's logits)

with the image preprocessed by the processor it was released with (``laion/CLIP-ViT-H-14-laion2B-
s32B-b79K``: short side to 224, bicubic, centre crop 224, OpenAI CLIP mean/std), here in torch on
the float images (no second ×255). Typical values: 21-24; flow_grpo trains on s / 26,
MixGRPO on (s − 18) / 8 (``offset``, ``scale``).
"""

from __future__ import annotations

import math

import torch

from diffrl.rewards.clip import _default_device, resize_crop_normalize
from diffrl.weights import from_pretrained


def image_settings(image_processor) -> tuple[int, int, list, list]:
    """(short side, crop side, mean, std) of a transformers ``CLIPImageProcessor``."""
    size = image_processor.size.get("shortest_edge") or image_processor.size["height"]
    crop = image_processor.crop_size["height"] if image_processor.do_center_crop else size
    return size, crop, list(image_processor.image_mean), list(image_processor.image_std)


def pickscore(
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    offset: float = 0.0,
    scale: float = 1.0,
    device: str | None = None,
    clip=None,
    clip_processor=None,
):
    """Reward factory: ``(PickScore − offset) / scale`` of each image for its prompt.

    Args:
        model, processor: hub ids or local folders of the ``CLIPModel`` and its ``CLIPProcessor``.
        clip, clip_processor: already built ones to use instead (tests, sharing one model).
        device: where the model runs (default: the current CUDA device if any, else CPU).

    Returns ``(images [B, 3, H, W] in [0, 1], prompts, metadata) -> [B]`` float32.
    """
    from transformers import CLIPModel, CLIPProcessor

    device = device or _default_device()
    clip_processor = clip_processor or from_pretrained(CLIPProcessor, processor, "PickScore processor")
    clip = clip if clip is not None else from_pretrained(CLIPModel, model, "PickScore model")
    clip = clip.to(device).eval().requires_grad_(False)
    size, crop, mean, std = image_settings(clip_processor.image_processor)

    @torch.no_grad()
    def reward(images, prompts, metadata):
        pixels = resize_crop_normalize(images.to(device), size, crop, mean, std, offset=math.floor)
        text = clip_processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(device)
        out = clip(pixel_values=pixels.to(clip.dtype), **text)
        cos = (out.image_embeds.float() * out.text_embeds.float()).sum(-1)
        return ((clip.logit_scale.exp().float() * cos - offset) / scale).cpu()

    return reward


__all__ = ["image_settings", "pickscore"]
