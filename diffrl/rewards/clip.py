"""CLIP-based rewards through open_clip: the LAION aesthetic predictor v2 and CLIP score.

Both receive float images ``[B, 3, H, W]`` in [0, 1] and preprocess them in torch the way CLIP's
own transform does for PIL images (resize the short side to the model's input size with bicubic
interpolation, center crop, normalise with the model's mean/std). They never rescale by 255 again
(a common silent bug, see REFERENCES.md "Rewards").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffrl.weights import load_state_dict, resolve_file


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_clip(model: str, pretrained: str | None, device: str | torch.device = "cpu") -> nn.Module:
    """An open_clip model by architecture name and pretrained tag or local checkpoint file.

    ``pretrained=None`` gives random weights (tests). Offline, a tag that is not cached raises an
    error saying which file to provide.
    """
    import open_clip  # imported on use: it costs seconds at start-up

    try:
        clip = open_clip.create_model(model, pretrained=pretrained, device=device)
    except RuntimeError as err:  # open_clip reports unknown tags and failed downloads this way
        raise FileNotFoundError(
            f"open_clip {model!r} with pretrained={pretrained!r} could not be loaded ({err}). "
            "Offline, pass the path of a local open_clip checkpoint file as `pretrained`."
        ) from err
    return clip.eval().requires_grad_(False)


def resize_crop_normalize(
    images: torch.Tensor, size: int, crop: int, mean, std, offset=round
) -> torch.Tensor:
    """CLIP's image transform in torch: short side of ``[B, 3, H, W]`` in [0, 1] to ``size``
    (bicubic, antialiased; the long side truncated as torchvision and transformers do), a
    ``crop`` × ``crop`` centre crop at offsets ``offset((H' − crop) / 2)`` (torchvision rounds,
    transformers' PIL path floors: pass ``math.floor``), then ``(x − mean) / std`` per channel.

    Returns ``[B, 3, crop, crop]`` float32."""
    images = images.float()
    h, w = images.shape[-2:]
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = int(offset((new_h - crop) / 2)), int(offset((new_w - crop) / 2))
    images = images[..., top : top + crop, left : left + crop].clamp(0, 1)
    mean = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (images - mean) / std


def clip_preprocess(images: torch.Tensor, clip: nn.Module) -> torch.Tensor:
    """:func:`resize_crop_normalize` of ``[B, 3, H, W]`` in [0, 1] with an open_clip model's own
    transform settings (its ``preprocess_cfg``). Returns ``[B, 3, S, S]`` float32, S its input size."""
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return resize_crop_normalize(images, size, size, cfg["mean"], cfg["std"])


class AestheticMLP(nn.Module):
    """LAION aesthetic predictor v2 head: Linear 768->1024->128->64->16->1, dropout, **no activations**.

    Layer indices match the released ``sac+logos+ava1-l14-linearMSE.pth`` state dict (``layers.N``).
    """

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, input_dim]`` L2-normalised CLIP image embeddings -> ``[B]`` scores."""
        return self.layers(embeddings).squeeze(-1)


def aesthetic(
    weights: str = "trl-lib/ddpo-aesthetic-predictor",
    weights_file: str = "aesthetic-model.pth",
    clip_model: str = "ViT-L-14",
    clip_pretrained: str | None = "openai",
    device: str | None = None,
    clip: nn.Module | None = None,
):
    """Reward factory: LAION aesthetic score of each image (about 1..10).

    Args:
        weights: the MLP head, a local ``.pth``/``.safetensors`` file or a hub repo id holding
            ``weights_file``.
        clip_model, clip_pretrained: the CLIP ViT-L/14 backbone (open_clip name and tag or file).
        clip: an already built open_clip model to use instead (tests, sharing one backbone).
        device: where the models run (default: the current CUDA device if any, else CPU).

    Returns ``(images, prompts, metadata) -> [B]`` float32.
    """
    device = device or _default_device()
    mlp_state = load_state_dict(resolve_file(weights, weights_file))
    clip = clip if clip is not None else load_clip(clip_model, clip_pretrained, device)
    head = AestheticMLP(mlp_state["layers.0.weight"].shape[1])
    head.load_state_dict(mlp_state)
    head = head.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def reward(images, prompts, metadata):
        pixels = clip_preprocess(images.to(device), clip)
        embeddings = F.normalize(clip.encode_image(pixels).float(), dim=-1)
        return head(embeddings).cpu()

    return reward


def clip_score(
    clip_model: str = "ViT-L-14",
    clip_pretrained: str | None = "openai",
    device: str | None = None,
    clip: nn.Module | None = None,
):
    """Reward factory: CLIP score 100 * max(cos(image, text), 0) (Hessel et al. 2021, w = 100).

    Returns ``(images, prompts, metadata) -> [B]`` float32; typical SD values 27-31.
    """
    import open_clip

    device = device or _default_device()
    clip = clip if clip is not None else load_clip(clip_model, clip_pretrained, device)
    tokenizer = open_clip.get_tokenizer(clip_model)

    @torch.no_grad()
    def reward(images, prompts, metadata):
        image_features = F.normalize(
            clip.encode_image(clip_preprocess(images.to(device), clip)).float(), dim=-1
        )
        text_features = F.normalize(clip.encode_text(tokenizer(list(prompts)).to(device)).float(), dim=-1)
        return (100 * (image_features * text_features).sum(-1)).clamp(min=0).cpu()

    return reward


__all__ = ["AestheticMLP", "aesthetic", "clip_preprocess", "clip_score", "load_clip", "resize_crop_normalize"]
