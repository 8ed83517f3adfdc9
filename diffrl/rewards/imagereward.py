"""ImageReward (Xu et al. 2023, *ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation*, Sec. 3.2): BLIP's image encoder (ViT-L/16 at 224 px) and its
image-grounded text encoder (BERT-base with cross-attention to the image tokens), the text
encoder's [CLS] feature through an MLP head (768 → 1024 → 128 → 64 → 16 → 1, dropouts, no
activations), the result standardised by the authors' constants:

    r(x, c) = (MLP(BERT_[CLS](c | ViT(x))) − 0.16717) / 1.03334

Typical values: about 0 for SD 1.x images (by construction of the standardisation), −2 to 2.

The released checkpoint (``THUDM/ImageReward``: ``ImageReward.pt``, ``med_config.json``) is in
BLIP's own layout; :func:`convert_checkpoint` renames it onto transformers' ``BlipVisionModel`` and
``BlipTextModel``, which compute the same networks. Images are preprocessed as the authors'
transform does to PIL images (short side to 224 bicubic, centre crop 224, OpenAI CLIP mean/std),
here in torch on the float images; prompts are tokenized by ``bert-base-uncased`` padded to 35
tokens, as ImageReward scores them.
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn

from diffrl.rewards.clip import AestheticMLP, _default_device, resize_crop_normalize
from diffrl.weights import load_state_dict, resolve_file

MEAN, STD = 0.16717362830052426, 1.0333394966054072
"""The authors' standardisation of the MLP's output (ImageReward's ``score``)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TOKENS = 35
"""Prompts are padded (and truncated) to this many tokens, as ImageReward scores them."""


def blip_configs(med_config: dict, vision: dict[str, torch.Tensor]):
    """transformers configs of ImageReward's two encoders: ``(BlipVisionConfig, BlipTextConfig)``.

    The ViT's sizes are read off its converted state dict ``vision`` (width, depth, patch, image
    side, MLP width; BLIP's ViTs use 64-dimensional heads and LayerNorm eps 1e-6: the released
    model is ViT-L/16 at 224 px); ``med_config`` is BLIP's BERT config (its ``med_config.json``),
    with the cross-attention width set to the ViT's as BLIP does."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width, patch = (
        vision["embeddings.class_embedding"].shape[-1],
        vision["embeddings.patch_embedding.weight"].shape[-1],
    )
    side = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vision_config = BlipVisionConfig(
        hidden_size=width,
        num_hidden_layers=len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")}),
        num_attention_heads=width // 64,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        patch_size=patch,
        image_size=side * patch,
        layer_norm_eps=1e-6,
    )
    text_config = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=width,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=None,  # BLIP's [DEC] and [SEP] only matter for captioning, not for the score
        sep_token_id=None,
        is_decoder=True,  # transformers' BLIP builds the cross-attention layers only then
    )
    return vision_config, text_config


VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
"""BLIP's ``VisionTransformer`` names → transformers' ``BlipVisionModel`` names (both keep the
fused qkv projection in the same [3, heads, head_dim] row order)."""


def convert_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split and rename an ``ImageReward.pt`` state dict into ``{"vision", "text", "mlp"}`` state
    dicts for ``BlipVisionModel``, ``BlipTextModel`` (BLIP's BERT has transformers' BLIP text
    names already) and :class:`~diffrl.rewards.clip.AestheticMLP` (same layer indices). BLIP's
    other modules (projections, momentum encoders) are not used for the score and are dropped."""
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "mlp": {}}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            for pattern, replacement in VISION_RENAMES:
                name = re.sub(pattern, replacement, name)
            out["vision"][name] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text"][key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            out["mlp"][key[len("mlp.") :]] = value
    return out


class ImageRewardModel(nn.Module):
    """ImageReward's network: ``(pixels [B, 3, S, S] normalised, input_ids [B, L],
    attention_mask [B, L]) -> [B]`` standardised scores."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state  # [B, 1 + patches, D_img]
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
        ).last_hidden_state  # [B, L, D_txt]
        return ((self.mlp(text[:, 0].float()).squeeze(-1)) - MEAN) / STD


def load_image_reward(weights: str, weights_file: str, med_config_file: str) -> ImageRewardModel:
    """ImageReward from a local folder or hub repo holding the checkpoint and BLIP's BERT config;
    every parameter must be filled (strict loads: a wrong file is one error naming the keys)."""
    med_config = json.loads(resolve_file(weights, med_config_file).read_text())
    parts = convert_checkpoint(load_state_dict(resolve_file(weights, weights_file)))
    if not parts["vision"] or not parts["mlp"]:
        raise ValueError(
            f"ImageReward checkpoint {weights}/{weights_file}: no 'blip.visual_encoder.*' or 'mlp.*' "
            "weights (is it ImageReward.pt?)"
        )
    model = ImageRewardModel(*blip_configs(med_config, parts["vision"]))
    for part, module in (("vision", model.vision), ("text", model.text), ("mlp", model.mlp)):
        missing, unexpected = module.load_state_dict(parts[part], strict=False)
        if missing or unexpected:
            raise ValueError(
                f"ImageReward checkpoint {weights}/{weights_file}: the {part} encoder does not match "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
    return model


def image_reward(
    weights: str = "THUDM/ImageReward",
    weights_file: str = "ImageReward.pt",
    med_config: str = "med_config.json",
    tokenizer: str = "bert-base-uncased",
    device: str | None = None,
    model: ImageRewardModel | None = None,
    bert_tokenizer=None,
):
    """Reward factory: ImageReward's standardised score of each image for its prompt.

    Args:
        weights: a local folder or hub repo id holding ``weights_file`` and ``med_config``.
        tokenizer: hub id or local folder holding the BERT tokenizer's ``vocab.txt`` (uncased; BLIP
            adds two special tokens at the end of the vocabulary, which the score never uses).
        model, bert_tokenizer: already built ones to use instead (tests, sharing one model).
        device: where the model runs (default: the current CUDA device if any, else CPU).

    Returns ``(images [B, 3, H, W] in [0, 1], prompts, metadata) -> [B]`` float32.
    """
    from transformers import BertTokenizer

    device = device or _default_device()
    # the vocabulary file itself: transformers builds an empty tokenizer from a repo it cannot find
    bert_tokenizer = bert_tokenizer or BertTokenizer(str(resolve_file(tokenizer, "vocab.txt")))
    if model is None:
        model = load_image_reward(weights, weights_file, med_config)
    model = model.to(device).eval().requires_grad_(False)
    size = model.vision.config.image_size

    @torch.no_grad()
    def reward(images, prompts, metadata):
        pixels = resize_crop_normalize(images.to(device), size, size, CLIP_MEAN, CLIP_STD)
        text = bert_tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(device)
        dtype = next(model.parameters()).dtype
        return model(pixels.to(dtype), text.input_ids, text.attention_mask).float().cpu()

    return reward


__all__ = ["ImageRewardModel", "blip_configs", "convert_checkpoint", "image_reward", "load_image_reward"]
