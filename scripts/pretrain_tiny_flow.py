"""Pretrain the embedded ``tiny-flow`` model: a StableDiffusion3Pipeline of the toy world.

A rectified-flow text-to-image model as SD3 is one (Esser et al. 2024, *Scaling Rectified Flow
Transformers*): x_t = (1 − t) x_0 + t ε, the transformer regresses the velocity v = ε − x_0
(Sec. 2, Eq. 1-3 with the rectified-flow path), t drawn logit-normal (Sec. 3.1, m = 0, s = 1).
Deterministic from --seed:
  1. the VAE is the shipped ``tiny`` model's (frozen; the same world's latents), with SD3's
     latent normalisation fitted to them: shift_factor = mean, scaling_factor = 1 / std;
  2. an SD3Transformer2DModel (patch 1 on the 8 x 8 latents, 4 joint blocks, RMS q/k norm as in
     SD3.5) and its three text encoders — two CLIPTextModelWithProjection on the toy tokenizer and
     a T5EncoderModel on a word-level T5 tokenizer — trained jointly, 10% empty prompts (for
     classifier-free guidance), AdamW with warm-up, and an EMA of the weights that is what gets
     saved. Text goes through exactly what ``StableDiffusion3Pipeline.encode_prompt`` computes
     (checked against it before training starts).
The T5 tokenizer's ``model_max_length`` (16) is the T5 length the model is trained and sampled at:
diffrl reads it (``transitions.t5_tokens``); plain diffusers callers pass
``max_sequence_length=16``.

    python scripts/pretrain_tiny_flow.py --out diffrl/assets/tiny-flow      # ~40 min on 2 CPU cores
    python scripts/pretrain_tiny_flow.py --out /tmp/f --steps 20 --dataset 512 --eval 8  # smoke

``--task-weights``, ``--layers`` and ``--heads`` build the variants docs/grpo.md tried as GRPO bases
(another GenEval-task mix, a larger transformer); their defaults build the shipped model.

Prints and writes (``baseline.json``) the held-out Toy-GenEval table and the verifier scores.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from pretrain_tiny import (
    GENEVAL_TASK_WEIGHTS,
    ema_step,
    encode_dataset,
    save_with_baseline,
    seeded,
    toy_tokenizer,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from diffrl import toyworld as tw
from diffrl.pipelines import SHIPPED_PIPELINES
from diffrl.testing import _byte_alphabet

CLIP_TOKENS = 24
"""CLIP tokens per prompt (the longest toy-world caption is 22 with its start and end tokens)."""
T5_TOKENS = 16
"""T5 tokens per prompt (one per word: the longest caption is 11 words and ``</s>``)."""
CLIP_DIM, T5_DIM = 32, 64
SHIFT = 1.0
"""The schedule's shift (SD3 uses 3 at 1024 px; 64 latent tokens need none)."""


def parse_weights(text: str) -> dict[str, float]:
    """``"position=0.2,color_attr=0.1"`` → ``pretrain_tiny.GENEVAL_TASK_WEIGHTS`` (the task mix
    the shipped model is trained on, the UNet's) with those entries replaced (unnormalised: each
    task's share is its weight over their sum)."""
    weights = dict(GENEVAL_TASK_WEIGHTS)
    for item in filter(None, text.split(",")):
        task, _, value = item.partition("=")
        if task not in weights:
            raise SystemExit(f"--task-weights: unknown task {task!r} (one of {', '.join(weights)})")
        try:
            weights[task] = float(value)
            valid = 0 <= weights[task] < float("inf")
        except ValueError:
            valid = False
        if not valid:
            raise SystemExit(f"--task-weights: {task}={value!r} is not a non-negative number")
    if not any(weights.values()):
        raise SystemExit("--task-weights: every task's weight is 0")
    return weights


def words() -> list[str]:
    """Every word of the toy world's captions (single/pair and the GenEval tasks, both splits)."""
    kinds = ("all", "geneval")
    return sorted(
        {w for s in ("train", "heldout") for k in kinds for p in tw.prompts(s, k) for w in p.split()}
    )


def t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """A T5 tokenizer (Unigram, ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, "▁" word starts) whose pieces are
    the toy world's words, so each is one token, and the byte symbols for anything else."""
    pieces = [("▁" + w, 0.0) for w in words()] + [(p, -10.0) for p in ["▁", *dict.fromkeys(_byte_alphabet())]]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_TOKENS)
    tokenizer.save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def clip_tokenizer(folder: Path):
    """The toy CLIP tokenizer of scripts/pretrain_tiny.py, padded to :data:`CLIP_TOKENS`."""
    tokenizer = toy_tokenizer(folder)
    tokenizer.model_max_length = CLIP_TOKENS
    return tokenizer


def build_models(clip_vocab: int, t5_vocab: int, sample_size: int, layers: int = 4, heads: int = 4):
    """Two CLIP text encoders (width 32, pooled 32 each), T5 (width 64) and the transformer
    (``layers`` joint blocks of ``heads`` heads of width 16)."""

    def clip() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=clip_vocab,
                hidden_size=CLIP_DIM,
                intermediate_size=4 * CLIP_DIM,
                projection_dim=CLIP_DIM,
                num_hidden_layers=3,  # SD3 reads the penultimate layer's states
                num_attention_heads=4,
                max_position_embeddings=CLIP_TOKENS,
                bos_token_id=clip_vocab - 2,
                eos_token_id=clip_vocab - 1,
                pad_token_id=clip_vocab - 1,
            )
        )

    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=T5_DIM,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=16 * heads,  # the joint attention's width
        pooled_projection_dim=2 * CLIP_DIM,
        pos_embed_max_size=sample_size,
        qk_norm="rms_norm",
    )
    return clip(), clip(), t5, transformer


def encode_text(encoders, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` computes from token ids (with gradients):
    ``ids`` = (CLIP ids ``[B, 24]``, CLIP-2 ids, T5 ids ``[B, 16]``) → embeddings ``[B, 24 + 16,
    64]`` (the two CLIPs' penultimate states side by side, zero-padded to T5's width, then T5's
    states) and pooled ``[B, 64]`` (the two projections side by side)."""
    clip1, clip2, t5 = encoders
    out1 = clip1(ids[0], output_hidden_states=True)
    out2 = clip2(ids[1], output_hidden_states=True)
    clip_states = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    clip_states = F.pad(clip_states, (0, T5_DIM - clip_states.shape[-1]))
    embeds = torch.cat([clip_states, t5(ids[2])[0]], dim=-2)
    return embeds, torch.cat([out1.text_embeds, out2.text_embeds], dim=-1)


def tokenize(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pipeline's three tokenizations of ``prompts`` (padded to their max lengths)."""

    def ids(tokenizer, length):
        return tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids

    return (
        ids(pipe.tokenizer, CLIP_TOKENS),
        ids(pipe.tokenizer_2, CLIP_TOKENS),
        ids(pipe.tokenizer_3, T5_TOKENS),
    )


@torch.no_grad()
def check_encoding(pipe, prompts: list[str]) -> None:
    """Raise unless :func:`encode_text` is what the pipeline computes when sampling."""
    encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    mine = encode_text(encoders, tokenize(pipe, prompts))
    theirs = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS
    )
    for a, b in zip(mine, (theirs[0], theirs[2])):
        if a.shape != b.shape or not torch.allclose(a, b, atol=1e-6):
            raise RuntimeError(f"training text encoding differs from the pipeline's: {a.shape} vs {b.shape}")


def train(pipe, prompts, latents, steps, batch, lr, gen, log_every):
    """Joint transformer + text-encoder training on the rectified-flow loss; returns the EMA copies
    ``(transformer, (clip, clip_2, t5))``."""
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    modules = [pipe.transformer, *encoders]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 200))
    ema = [copy.deepcopy(m).requires_grad_(False) for m in modules]
    ema_params = [p for m in ema for p in m.parameters()]
    ids = tokenize(pipe, prompts)
    empty = tokenize(pipe, [""])
    for m in modules:
        m.train().requires_grad_(True)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(len(prompts), (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < 0.1
        batch_ids = [torch.where(drop[:, None], e, i[idx]) for i, e in zip(ids, empty)]
        embeds, pooled = encode_text(encoders, batch_ids)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal(0, 1)
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        v = pipe.transformer(
            hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=1000 * t
        ).sample
        loss = F.mse_loss(v, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        warmup.step()
        ema_step(ema_params, params, step)
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return ema[0].eval(), [m.eval() for m in ema[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default=str(SHIPPED_PIPELINES["tiny"]), help="the model whose VAE is used")
    parser.add_argument("--out", default="diffrl/assets/tiny-flow")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--dataset", type=int, default=20000, help="pre-encoded training images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", type=int, default=96, help="samples per split and kind in the final report")
    parser.add_argument("--layers", type=int, default=4, help="the transformer's joint blocks")
    parser.add_argument("--heads", type=int, default=4, help="its attention heads (width 16 each)")
    parser.add_argument(
        "--task-weights",
        default="",
        help="task=weight,... replacing entries of the GenEval-task mix (docs/grpo.md)",
    )
    args = parser.parse_args()
    weights = parse_weights(args.task_weights)
    gen = seeded(args)

    vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae").eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    prompts, latents = encode_dataset(vae, args.dataset, gen, weights)
    shift, scale = latents.mean().item(), 1 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (latents - shift) * scale
    print(f"{len(prompts)} latents; shift_factor {shift:.4f} scaling_factor {scale:.4f}", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="toy-flow-tok-"))
    tokenizer, t5_tok = clip_tokenizer(folder / "clip"), t5_tokenizer(folder / "t5")
    clip1, clip2, t5, transformer = build_models(
        len(tokenizer), len(t5_tok), tw.SIZE // 4, args.layers, args.heads
    )
    for name, m in (("clip", clip1), ("clip_2", clip2), ("t5", t5), ("transformer", transformer)):
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.3f}M parameters")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        vae=vae,
        text_encoder=clip1,
        tokenizer=tokenizer,
        text_encoder_2=clip2,
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    check_encoding(pipe, prompts[:4] + [""])
    t0 = time.time()
    pipe.transformer, (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) = train(
        pipe, prompts, latents, args.steps, args.batch, args.lr, gen, log_every=250
    )
    save_with_baseline(pipe, args.out, args.eval, args.seed, t0)


if __name__ == "__main__":
    main()
