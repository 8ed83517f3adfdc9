"""GenEval as a reward on real images, without mmdet: an open-vocabulary detector from
transformers (OWLv2, Minderer et al. 2023) finds the prompt's objects, CLIP names each object's
colour zero-shot over GenEval's ten colours, and :mod:`diffrl.geneval` applies GenEval's rule
(Ghosh et al. 2023, Sec. 3) and flow_grpo's partial credit — the same functions the toy world's
detector feeds.

Each prompt's GenEval row (``include``/``exclude`` metadata) comes from the GenEval-layout JSONL
``suite`` the prompts were drawn from. The detector is queried with ``a photo of a {class}`` for
every class the row names; OWLv2 pads an image to a square at the bottom and right, so its boxes,
scaled to the square's side, are pixel boxes of the image. Thresholds are GenEval's (0.9 for
counting, 0.3 otherwise; they were set for Mask2Former, see ``thresholds``).
"""

from __future__ import annotations

import torch

from diffrl import geneval
from diffrl.errors import RewardError
from diffrl.rewards.clip import _default_device, resize_crop_normalize
from diffrl.rewards.pickscore import image_settings
from diffrl.weights import from_pretrained

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""GenEval's colour vocabulary."""


def row_classes(row: dict) -> list[str]:
    """The classes a GenEval row names (include, then exclude), each once, in order."""
    return list(dict.fromkeys(item["class"] for item in [*row["include"], *row.get("exclude", [])]))


def detections_from(logits: torch.Tensor, boxes: torch.Tensor, classes: list[str], side: int) -> list:
    """OWLv2's raw output for one image -> :class:`~diffrl.geneval.Detection` s, one per predicted
    box: its class is the best-scoring query, its score that query's sigmoid, its box
    ``(cx, cy, w, h)`` (fractions of the padded square) as pixel corners, times ``side``.

    ``logits [P, Q]`` (Q = len(classes)), ``boxes [P, 4]``."""
    best, labels = logits.max(dim=-1)  # before the sigmoid: it saturates to ties at 1.0 in float32
    scores = best.sigmoid()
    cx, cy, w, h = boxes.unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * side
    return [
        geneval.Detection(classes[label], score, tuple(box))
        for label, score, box in zip(labels.tolist(), scores.tolist(), corners.tolist())
    ]


def pixel_box(box, height: int, width: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` rounded to whole pixels inside a ``height`` × ``width`` image, at least
    one pixel wide and high (a box can lie partly or wholly in the padding)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = min(max(0, x0), width - 1), min(max(0, y0), height - 1)
    return x0, y0, min(width, max(x1, x0 + 1)), min(height, max(y1, y0 + 1))


def owlv2_detector(
    detector: str = "google/owlv2-base-patch16-ensemble",
    colour_model: str = "openai/clip-vit-large-patch14",
    device: str | None = None,
    owl=None,
    owl_processor=None,
    clip=None,
    clip_processor=None,
    min_score: float = 0.1,
):
    """``detect(image [3, H, W] in [0, 1], classes) -> [Detection]``: OWLv2 boxes above
    ``min_score`` for the given class names, each with its colour named by CLIP zero-shot
    (``a photo of a {colour} {class}``) on its crop, resized and normalised as CLIP's processor does."""
    from transformers import CLIPModel, CLIPProcessor, Owlv2ForObjectDetection, Owlv2Processor

    device = device or _default_device()
    owl_processor = owl_processor or from_pretrained(Owlv2Processor, detector, "OWLv2 processor")
    owl = owl if owl is not None else from_pretrained(Owlv2ForObjectDetection, detector, "OWLv2 detector")
    owl = owl.to(device).eval().requires_grad_(False)
    clip_processor = clip_processor or from_pretrained(CLIPProcessor, colour_model, "CLIP colour model")
    clip = clip if clip is not None else from_pretrained(CLIPModel, colour_model, "CLIP colour model")
    clip = clip.to(device).eval().requires_grad_(False)
    settings = image_settings(clip_processor.image_processor)

    @torch.no_grad()
    def colours(image: torch.Tensor, found: list) -> list:
        """Each detection with the colour CLIP gives its crop."""
        named = []
        for d in found:
            x0, y0, x1, y1 = pixel_box(d.box, *image.shape[-2:])
            crop = resize_crop_normalize(image[None, :, y0:y1, x0:x1], *settings)
            text = clip_processor.tokenizer(
                [f"a photo of a {c} {d.cls}" for c in COLORS], padding=True, return_tensors="pt"
            ).to(device)
            out = clip(pixel_values=crop.to(clip.dtype), **text)
            best = (out.image_embeds.float() @ out.text_embeds.float().T).argmax().item()
            named.append(geneval.Detection(d.cls, d.score, d.box, COLORS[best]))
        return named

    @torch.no_grad()
    def detect(image: torch.Tensor, classes: list[str], with_colour: bool = True) -> list:
        image = image.to(device).float()
        inputs = owl_processor(
            text=[[f"a photo of a {c}" for c in classes]],
            images=[image],
            do_rescale=False,
            return_tensors="pt",
        ).to(device)
        out = owl(**inputs)
        side = max(image.shape[-2:])
        found = detections_from(out.logits[0].float(), out.pred_boxes[0].float(), classes, side)
        found = [d for d in found if d.score >= min_score]
        return colours(image, found) if with_colour else found

    return detect


def rows_detector(detect):
    """``detect(image, classes, with_colour)`` as ``(images [B, 3, H, W], rows) -> [[Detection]]``
    (:func:`diffrl.evaluation.evaluate_suite`'s detector): each image asked for its row's classes,
    colours named only where the row states one."""

    def detector(images, rows):
        return [
            detect(image, row_classes(row), any("color" in item for item in row["include"]))
            for image, row in zip(images, rows)
        ]

    return detector


def geneval_reward(
    suite: str | None = None,
    thresholds: tuple[float, float] = (0.9, 0.3),
    detect=None,
    **detector_kwargs,
):
    """Reward factory: flow_grpo's GenEval partial credit of each image for its prompt's row in
    ``suite`` (a GenEval-layout JSONL), from ``detect`` (default :func:`owlv2_detector` with
    ``detector_kwargs``); writes GenEval's strict verdict into each sample's ``geneval_correct``.

    Returns ``(images [B, 3, H, W] in [0, 1], prompts, metadata) -> [B]`` float32 in [0, 1]; a
    prompt that is not in the suite is refused before any image is looked at.
    """
    if suite is None:
        raise RewardError("reward 'geneval' needs suite=FILE.jsonl: the GenEval-layout rows of its prompts")
    rows = {row["prompt"]: row for row in geneval.read_suite(suite)}
    detector = rows_detector(detect or owlv2_detector(**detector_kwargs))

    def reward(images, prompts, metadata):
        missing = [p for p in prompts if p not in rows]
        if missing:
            raise RewardError(f"reward 'geneval': prompt {missing[0]!r} is not a row of {suite}")
        values = torch.zeros(len(prompts))
        batch = [rows[p] for p in prompts]
        for i, (row, found) in enumerate(zip(batch, detector(images, batch))):
            by_class = geneval.select(found, row["tag"], thresholds)
            values[i] = geneval.partial_credit(by_class, row)
            metadata[i]["geneval_correct"] = float(geneval.correct(by_class, row)[0])
        return values

    return reward


__all__ = [
    "COLORS",
    "detections_from",
    "geneval_reward",
    "owlv2_detector",
    "pixel_box",
    "row_classes",
    "rows_detector",
]
