"""HPSv2.1 (Wu et al. 2023, *Human Preference Score v2*, Sec. 4): open_clip ViT-H/14 fine-tuned on
HPD v2's human choices; the score is the cosine of the image and prompt features (their Eq. 1
without the temperature), typically 0.2-0.35.

The image transform is HPSv2's evaluation one: the longest side to 224 (bicubic, ratio kept),
padded to a square with black, OpenAI CLIP mean/std — what open_clip's ``image_transform(224,
is_train=False, resize_mode="longest")`` does to a PIL image, here in torch on float images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffrl.rewards.clip import _default_device, load_clip
from diffrl.weights import load_state_dict, resolve_file


def longest_side_preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1]: longest side to ``size`` (short side ``round``-ed), centred on a
    black ``size`` × ``size`` square (top/left pad = half the padding, floored), normalised.
    Returns ``[B, 3, size, size]`` float32."""
    images = images.float()
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - new_h, size - new_w
    images = F.pad(images.clamp(0, 1), (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images - mean) / std


def hpsv2(
    weights: str = "xswu/HPSv2",
    weights_file: str = "HPS_v2.1_compressed.pt",
    clip_model: str = "ViT-H-14",
    device: str | None = None,
    clip=None,
):
    """Reward factory: HPSv2.1 score of each image for its prompt.

    Args:
        weights: the fine-tuned checkpoint, a local file or a hub repo id holding ``weights_file``
            (HPSv2's ``{"state_dict": ...}`` layout or a plain state dict).
        clip_model: the open_clip architecture the checkpoint is for.
        clip: an already built open_clip model to use instead (tests).
        device: where the model runs (default: the current CUDA device if any, else CPU).

    Returns ``(images [B, 3, H, W] in [0, 1], prompts, metadata) -> [B]`` float32.
    """
    import open_clip

    device = device or _default_device()
    if clip is None:
        state = load_state_dict(resolve_file(weights, weights_file))
        clip = load_clip(clip_model, None, "cpu")
        clip.load_state_dict(state.get("state_dict", state))
    clip = clip.to(device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(clip_model)
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]

    @torch.no_grad()
    def reward(images, prompts, metadata):
        pixels = longest_side_preprocess(images.to(device), size, cfg["mean"], cfg["std"])
        image_features = F.normalize(clip.encode_image(pixels).float(), dim=-1)
        text_features = F.normalize(clip.encode_text(tokenizer(list(prompts)).to(device)).float(), dim=-1)
        return (image_features * text_features).sum(-1).cpu()

    return reward


__all__ = ["hpsv2", "longest_side_preprocess"]
