"""Pretrain the embedded tiny text-to-image model on the toy world (diffrl.toyworld).

Trains a complete diffusers StableDiffusionPipeline from scratch, deterministic from --seed:
  1. a x4 AutoencoderKL on renders (MSE + a small KL term);
  2. latents of a fixed render set are encoded once; scaling_factor = 1 / std(latents);
  3. the UNet2DConditionModel and a small CLIP text encoder, jointly, with the epsilon-prediction
     DDPM loss on SD 1.x betas (Ho et al. 2020, Eq. 14), 10% empty prompts (for classifier-free
     guidance), AdamW, and an EMA of the weights that is what gets saved.
The tokenizer is a CLIPTokenizer whose vocabulary holds each toy-world word as one token.

    python scripts/pretrain_tiny.py --out diffrl/assets/tiny          # ~1 h on one CPU thread
    python scripts/pretrain_tiny.py --out /tmp/t --vae-steps 20 --unet-steps 20 --dataset 512  # smoke

Prints held-out and train verifier scores (per attribute and exact match) at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffrl import toyworld as tw
from diffrl.files import atomic_write_bytes
from diffrl.testing import SD_SCHEDULE, _byte_alphabet
from diffrl.types import SamplerSettings

MAX_TOKENS = 77
GENEVAL_FRACTION = 0.4
"""Share of GenEval-task scenes (diffrl.toyworld.geneval_rows) among the training renders."""
GENEVAL_TASK_WEIGHTS = {
    "single_object": 0.2,
    "two_object": 0.2,
    "counting": 0.3,
    "colors": 0.23,
    "position": 0.05,
    "color_attr": 0.02,
}
"""How the GenEval-task scenes split among the tasks (each task's train prompts drawn uniformly).
SD-class models see attribute binding and spatial relations rarely in their captions, which is
what this mix (with :data:`PAIR_FRACTION`) imitates. Two earlier mixes bound colours perfectly
(seed 0, 2026-12-02): drawn uniformly over prompts (colour attribution is 58 of the 103 train
prompts, a fifth of all renders), held-out attribution 1.0 and overall 0.83; with single .25, two
.2, counting .2, colours .25, position .05, attribution .05 and a quarter of the scenes the toy
world's coloured pairs ("a red circle to the left of a green square", which bind colours too),
held-out single 1.0, two 0.83, counting 0.0, colours 1.0, position 0.45, attribution 0.95,
overall 0.70."""
PAIR_FRACTION = 0.05
"""Share of the toy world's coloured two-object captions among the UNet's training scenes (the rest
of the non-GenEval scenes are single objects)."""


def toy_tokenizer(folder: Path) -> CLIPTokenizer:
    """CLIP BPE tokenizer: the byte alphabet plus a merge chain for every toy-world word. BPE applies
    merges by rank across words, so most words become one token and a few (squares, three,
    triangle, triangles) two to six: at most 22 tokens a caption."""
    kinds = ("all", "geneval")
    words = sorted(
        {w for s in ("train", "heldout") for k in kinds for p in tw.prompts(s, k) for w in p.split()}
    )
    symbols = _byte_alphabet()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append(f"{pieces[0]} {pieces[1]}")
            if merged not in vocab:
                vocab.append(merged)
            pieces = [merged] + pieces[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": MAX_TOKENS}))
    return CLIPTokenizer.from_pretrained(str(folder))


def build_models(vocab_size: int):
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=tw.SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=tw.SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return vae, text_encoder, unet


def training_prompts(
    n: int,
    gen: torch.Generator,
    pair_fraction: float,
    geneval_fraction: float,
    task_weights: dict[str, float] = GENEVAL_TASK_WEIGHTS,
) -> list[str]:
    """``n`` training prompts: GenEval-task prompts with probability ``geneval_fraction`` (a task
    drawn by ``task_weights``, then one of its train prompts), else pairs with probability
    ``pair_fraction``, else single objects (training splits only)."""
    pools = [tw.prompts("train", kind) for kind in ("single", "pair")]
    tasks = list(task_weights)
    by_task = {t: [r["prompt"] for r in tw.geneval_rows("train") if r["tag"] == t] for t in tasks}
    weights = torch.tensor([task_weights[t] for t in tasks])
    u = torch.rand(n, generator=gen)
    kinds = (u < geneval_fraction).long() * 2 + (
        (u >= geneval_fraction) & (u < geneval_fraction + pair_fraction)
    ).long()
    pick = lambda pool: pool[int(torch.randint(len(pool), (1,), generator=gen))]  # noqa: E731

    def draw(kind: int) -> str:
        if kind < 2:
            return pick(pools[kind])
        return pick(by_task[tasks[int(torch.multinomial(weights, 1, generator=gen))]])

    return [draw(k) for k in kinds.tolist()]


GENEVAL_SETTINGS = {"num_steps": 25, "guidance_scale": 5.0, "eta": 0.0, "images_per_prompt": 4, "seed": 0}
"""How the baseline's Toy-GenEval table is sampled (``diffrl eval tiny --suite toy-geneval`` with these)."""


def geneval_baseline(pipe, split: str = "heldout") -> dict:
    """The Toy-GenEval table of ``pipe`` on a split's rows at :data:`GENEVAL_SETTINGS`, for
    baseline.json."""
    from diffrl.evaluation import evaluate_suite
    from diffrl.rewards.shapes import TOY_THRESHOLDS, detect_batch

    s = GENEVAL_SETTINGS
    table = evaluate_suite(
        pipe,
        tw.geneval_rows(split),
        detect_batch,
        TOY_THRESHOLDS,
        SamplerSettings(num_steps=s["num_steps"], guidance_scale=s["guidance_scale"], eta=s["eta"]),
        images_per_prompt=s["images_per_prompt"],
        seed=s["seed"],
    )
    return {"settings": GENEVAL_SETTINGS, "table": table}


def train_vae(vae, steps: int, batch: int, gen: torch.Generator, log_every: int) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=5e-5)
    vae.train()
    for step in range(steps):
        prompts = training_prompts(batch, gen, 0.3, GENEVAL_FRACTION)
        x = tw.render_batch(prompts, seed=int(torch.randint(1 << 30, (1,), generator=gen))) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"vae step {step} mse {F.mse_loss(recon, x).item():.5f}", flush=True)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def check_vae(vae) -> None:
    """The verifier on VAE reconstructions of every caption: an undertrained VAE turns squares into
    blobs and reds orange, and no UNet can do better than its decoder."""
    from diffrl.rewards.shapes import score_shapes

    prompts = tw.prompts("train", "all") + tw.prompts("heldout", "all")
    x = tw.render_batch(prompts, seed=123)
    recon = (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    result = score_shapes(recon, prompts)
    print(
        f"vae reconstructions: mse {F.mse_loss(recon, x).item():.5f} verifier score {result.score.mean():.3f} "
        f"exact {result.exact.mean():.3f} (originals {score_shapes(x, prompts).score.mean():.3f})",
        flush=True,
    )


@torch.no_grad()
def encode_dataset(
    vae, size: int, gen: torch.Generator, task_weights: dict[str, float] = GENEVAL_TASK_WEIGHTS
) -> tuple[list[str], torch.Tensor]:
    """``size`` training prompts (:func:`training_prompts`) and the VAE's latent means of their
    renders ``[size, 4, 8, 8]``."""
    prompts = training_prompts(size, gen, PAIR_FRACTION, GENEVAL_FRACTION, task_weights)
    latents = []
    for start in range(0, size, 256):
        chunk = prompts[start : start + 256]
        latents.append(vae.encode(tw.render_batch(chunk, seed=start) * 2 - 1).latent_dist.mean)
    return prompts, torch.cat(latents)


@torch.no_grad()
def ema_step(ema_params: list[torch.Tensor], params: list[torch.Tensor], step: int) -> None:
    """The EMA both pretraining scripts save: θ̄ ← d θ̄ + (1 − d) θ with d = min(0.999, (1 + n)/(10 + n))
    after the n-th optimizer step (a warm-up so that early averages are not the random init)."""
    decay = min(0.999, (1 + step) / (10 + step))
    for e, p in zip(ema_params, params):
        e.lerp_(p, 1 - decay)


def train_unet(unet, text_encoder, tokenizer, prompts, latents, steps, batch, gen, log_every):
    """Joint UNet + text-encoder training; returns the EMA copies of both."""
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    ema_unet, ema_text = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
    )
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    tokens = tokenizer(
        prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    unet.train()
    text_encoder.train()
    start = time.time()
    for step in range(steps):
        idx = torch.randint(len(prompts), (batch,), generator=gen)
        x0 = latents[idx]
        ids = tokens[idx].clone()
        ids[torch.rand(batch, generator=gen) < 0.1] = empty[0]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(x_t, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_step(ema_params, params, step)
        if step % log_every == 0 or step == steps - 1:
            print(f"unet step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return ema_unet.eval(), ema_text.eval()


def evaluate(pipe, n_per_split: int, seed: int) -> dict:
    from diffrl.rewards.shapes import score_shapes
    from diffrl.rollout import sample_trajectories

    report = {}
    for split in ("train", "heldout"):
        for kind in ("single", "pair"):
            pool = tw.prompts(split, kind)
            prompts = [pool[i % len(pool)] for i in range(n_per_split)]
            traj = sample_trajectories(
                pipe,
                prompts,
                SamplerSettings(num_steps=25, guidance_scale=5.0, eta=0.0),
                generator=torch.Generator().manual_seed(seed),
            )
            s = score_shapes(traj.images, prompts)
            report[f"{split}_{kind}"] = {
                "score": s.score.mean().item(),
                "exact": s.exact.mean().item(),
                **{k: v.nanmean().item() for k, v in s.attributes.items() if not v.isnan().all()},
            }
    return report


def seeded(args: argparse.Namespace) -> torch.Generator:
    """Set torch's threads (``args.threads``) and global seed (``args.seed``), as every script that
    builds a shipped model starts; a generator seeded ``args.seed``."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.Generator().manual_seed(args.seed)


def write_baseline(out: str | Path, report: dict) -> None:
    """Print ``report`` and write it to ``out/baseline.json`` (atomically)."""
    text = json.dumps(report, indent=1)
    print(text)
    atomic_write_bytes(Path(out) / "baseline.json", (text + "\n").encode())


def save_with_baseline(pipe, out: str, n_eval: int, seed: int, started: float) -> None:
    """Save ``pipe`` to ``out`` (safetensors) and its ``baseline.json``: :func:`evaluate` with
    ``n_eval`` samples per split and kind, and Toy-GenEval on both splits."""
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"saved to {out} after {time.time() - started:.0f}s", flush=True)
    pipe.set_progress_bar_config(disable=True)
    report = evaluate(pipe, n_eval, seed)
    report["geneval"] = geneval_baseline(pipe)
    report["geneval_train"] = geneval_baseline(pipe, "train")
    write_baseline(out, report)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="diffrl/assets/tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=900)
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dataset", type=int, default=20000, help="pre-encoded training images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", type=int, default=96, help="samples per split and kind in the final report")
    args = parser.parse_args()
    gen = seeded(args)

    tokenizer = toy_tokenizer(Path(tempfile.mkdtemp(prefix="toy-tok-")))
    vae, text_encoder, unet = build_models(len(tokenizer))
    for name, m in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters")
    t0 = time.time()
    train_vae(vae, args.vae_steps, args.batch, gen, log_every=50)
    check_vae(vae)
    prompts, latents = encode_dataset(vae, args.dataset, gen)
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    latents = latents * vae.config.scaling_factor
    print(f"vae done in {time.time() - t0:.0f}s; scaling_factor {vae.config.scaling_factor:.4f}", flush=True)
    unet, text_encoder = train_unet(
        unet, text_encoder, tokenizer, prompts, latents, args.unet_steps, args.batch, gen, log_every=500
    )
    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_with_baseline(pipe, args.out, args.eval, args.seed, t0)


if __name__ == "__main__":
    main()
