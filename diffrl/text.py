"""Prompt text for every pipeline family: each pipeline's own ``encode_prompt``, one text per call,
cached per text encoder, with the T5 length a flow model was trained at."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from diffrl.types import Text

PROMPT_CACHE_SIZE = 256
"""Prompt embeddings kept per text encoder (least recently used dropped): 77 x 768 floats each for SD 1.5."""

_prompt_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def text_encoders(pipe) -> list[torch.nn.Module]:
    """Every text encoder of the pipeline (one for SD, three for SD3, two for FLUX)."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [m for m in (getattr(pipe, n, None) for n in names) if m is not None]


def _prompt_cache(encoders: list[torch.nn.Module]) -> OrderedDict:
    """The embedding cache of a pipeline's text ``encoders`` (kept with the first), emptied whenever
    any of their parameters changed: a parameter added, removed, replaced or modified in place (a
    LoRA loaded, weights fused or loaded; each in-place write bumps the tensor's version counter)."""
    state = tuple((id(p), p._version, p.dtype, p.device) for m in encoders for p in m.parameters())
    entry = _prompt_caches.get(encoders[0])
    if entry is None or entry[0] != state:
        entry = (state, OrderedDict())
        _prompt_caches[encoders[0]] = entry
    return entry[1]


T5_DEFAULT_TOKENS = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512}
"""T5 tokens per prompt that each flow pipeline's ``__call__`` uses by default."""


def t5_tokens(pipe, requested: int | None) -> int | None:
    """T5 tokens per prompt for a flow pipeline: ``requested``, else the pipeline's default
    (:data:`T5_DEFAULT_TOKENS`) capped at its T5 tokenizer's ``model_max_length`` — a model trained
    on shorter T5 sequences (the shipped ``tiny-flow``: 16) says so there, and SD3's transformer
    attends to every padded T5 token, so it must be sampled at the length it was trained at. None
    for pipelines without T5."""
    default = T5_DEFAULT_TOKENS.get(type(pipe).__name__)
    if requested is not None or default is None:
        return requested
    tokenizer = getattr(pipe, "tokenizer_2" if isinstance(pipe, FluxPipeline) else "tokenizer_3", None)
    return min(default, getattr(tokenizer, "model_max_length", default) or default)


def _encode(pipe, texts: list[str], device, max_sequence_length) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's own ``encode_prompt`` on ``texts``, without guidance: per-token embeddings
    ``[N, L, D]`` and, for SD3 (CLIP-L/G pooled, concatenated) and FLUX (CLIP pooled), ``[N, P]``.
    ``max_sequence_length``: T5 tokens for SD3/FLUX (None: :func:`t5_tokens`' default)."""
    max_sequence_length = t5_tokens(pipe, max_sequence_length)
    length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if isinstance(pipe, FluxPipeline):
        embeds, pooled, _ = pipe.encode_prompt(texts, None, device=device, num_images_per_prompt=1, **length)
        return embeds, pooled
    if isinstance(pipe, StableDiffusion3Pipeline):
        embeds, _, pooled, _ = pipe.encode_prompt(
            texts,
            None,
            None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            **length,
        )
        return embeds, pooled
    embeds, _ = pipe.encode_prompt(
        texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return embeds, None


def encode_prompts(
    pipe, prompts: list[str], negative_prompt: str | None, guided: bool, device=None, max_sequence_length=None
) -> Text:
    """The :class:`~diffrl.types.Text` of ``prompts`` and, when ``guided``, of the negative prompt,
    on ``device`` (default the pipeline's execution device), with ``max_sequence_length`` T5 tokens
    for SD3/FLUX (None: the pipeline's default).

    Each distinct text is encoded once, alone (so that its embedding is the same whichever batch
    first asked for it: a resumed run gets the bits of the uninterrupted one), with the pipeline's
    ``encode_prompt`` and cached for its
    text encoders (:data:`PROMPT_CACHE_SIZE` entries, dropped when their parameters change): a
    training run re-draws the same prompts and the same negative prompt every batch. The negative
    prompt is encoded as a prompt, which is what ``encode_prompt`` does for it (same tokenizer
    padding, same encoder calls). A LoRA scale changed without touching parameters
    (``set_adapters``) is not seen; diffrl never trains the text encoders.
    """
    device = torch.device(device or pipe._execution_device)
    texts = list(prompts) + [negative_prompt or ""] if guided else list(prompts)
    cache = _prompt_cache(text_encoders(pipe))
    keys = [(t, device, max_sequence_length) for t in texts]
    for k in dict.fromkeys(k for k in keys if k not in cache):
        with torch.no_grad():  # one text per call: its encoding does not depend on the batch it came in
            embeds, pooled = _encode(pipe, [k[0]], device, max_sequence_length)
        cache[k] = (embeds[0], None if pooled is None else pooled[0])
    rows = []
    for k in keys:
        cache.move_to_end(k)
        rows.append(cache[k])
    while len(cache) > PROMPT_CACHE_SIZE:
        cache.popitem(last=False)

    def stack(items, part):
        return None if items[0][part] is None else torch.stack([r[part] for r in items])

    own, b = rows[: len(prompts)], len(prompts)
    negative = [rows[-1]] * b if guided else None
    return Text(
        embeds=stack(own, 0),
        pooled=stack(own, 1),
        negative=None if negative is None else stack(negative, 0),
        negative_pooled=None if negative is None else stack(negative, 1),
    )
