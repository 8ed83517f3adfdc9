"""Distill the shipped tiny toy-world model (diffrl/assets/tiny) into a latent consistency model.

Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Alg. 1 / Eq. 9-11)
with a DDIM solver and the guidance scale as a UNet input, plus the improved consistency-training
techniques of Song & Dhariwal 2023 ("Improved Techniques for Training Consistency Models") that
apply to distillation:

  * the student f_θ(x, w, c, t) = c_skip(t)·x + c_out(t)·x̂0(ε_θ(x, t, c, emb(w−1))) starts as the
    teacher UNet plus a zero-initialised guidance projection (``time_cond_proj_dim``), so at step 0
    its ε equals the teacher's conditional ε; c_skip/c_out are LCMScheduler's (σ_d = 0.5, t·10);
  * each step: real latents x0 of toy-world renders and their prompts; a grid index n; x_{t_n} by
    the forward process; a guidance scale w ~ U[w_min, w_max]; the teacher's classifier-free
    guided DDIM step t_n -> t_{n−k} (Eq. 11 with ε̂ = ε_u + w(ε_c − ε_u)); the loss
    d(f_θ(x_{t_n}, t_n), sg[f_θ(x̂_{t_{n−k}}, t_{n−k})]);
  * no EMA: the target network is the student itself under stop-gradient (iCT Sec. 3.2);
  * d is the pseudo-Huber distance sqrt(‖a − b‖² + c²) − c with c = 0.00054·sqrt(dim) (iCT Sec. 3.3);
  * a discretization curriculum (iCT Sec. 3.4): the solver grid has N(k) = min(N0·2^⌊k/K'⌋, N1)
    intervals over the 1000 training timesteps (skip 1000/N), from N0 = 10 to N1 = 50 (the grid
    {19, 39, …, 999} that LCMScheduler samples on with original_inference_steps = 50).

The result is saved as a diffusers LatentConsistencyModelPipeline (UNet, the teacher's VAE, text
encoder and tokenizer, an LCMScheduler) with baseline.json: held-out shapes_alignment of the
4-step LCM against the 50-step DDIM teacher, both sampled by diffusers' own pipelines.

    python scripts/distill_tiny_lcm.py --out diffrl/assets/tiny-lcm        # ~20 min on 2 CPU cores
    python scripts/distill_tiny_lcm.py --out /tmp/l --steps 20 --eval 16  # smoke
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from pretrain_tiny import encode_dataset, seeded, write_baseline  # scripts/ is on sys.path

from diffrl import toyworld as tw
from diffrl.pipelines import load_pipeline
from diffrl.rewards.shapes import score_shapes
from diffrl.testing import SD_SCHEDULE

GUIDANCE_DIM = 64
"""Width of the guidance-scale embedding fed to the UNet's ``time_cond_proj_dim`` input."""


def student_from(teacher: UNet2DConditionModel) -> UNet2DConditionModel:
    """The teacher's UNet with a guidance-embedding input whose projection starts at zero."""
    student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": GUIDANCE_DIM})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def boundary_scalings(t: torch.Tensor, scheduler: LCMScheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t), c_out(t) ``[B, 1, 1, 1]`` for integer timesteps ``t [B]`` (LCM Eq. 9 as
    LCMScheduler computes them: σ_d = 0.5, the timestep scaled by ``timestep_scaling``)."""
    scaled = t.float() * scheduler.config.timestep_scaling
    sigma2 = 0.5**2
    c_skip = sigma2 / (scaled**2 + sigma2)
    c_out = scaled / (scaled**2 + sigma2).sqrt()
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x − √(1 − ᾱ)·ε) / √ᾱ with ``alpha_bar [B, 1, 1, 1]``."""
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def consistency(unet, x, t, embeds, w_embedding, scheduler, alphas):
    """f(x, t) ``[B, C, h, w]``: the boundary-conditioned x̂0 of the student's ε."""
    eps = unet(x, t, encoder_hidden_states=embeds, timestep_cond=w_embedding).sample
    c_skip, c_out = boundary_scalings(t, scheduler)
    return c_skip * x + c_out * x0_from_eps(x, eps, alphas[t].view(-1, 1, 1, 1))


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """iCT's pseudo-Huber distance per sample, averaged: sqrt(‖a − b‖² + c²) − c, c = 0.00054·√dim."""
    dim = a[0].numel()
    c = 0.00054 * math.sqrt(dim)
    return ((a - b).pow(2).flatten(1).sum(1) + c * c).sqrt().sub(c).mean()


def grid_intervals(step: int, total: int, start: int, end: int) -> int:
    """iCT's doubling curriculum: N(k) = min(start·2^⌊k/K'⌋, end), K' = total / (⌈log2(end/start)⌉ + 1),
    so that the last stage trains on the ``end`` grid."""
    stages = math.ceil(math.log2(end / start)) + 1
    return min(start * 2 ** (step // math.ceil(total / stages)), end)


def distill(teacher_pipe, args, gen: torch.Generator) -> UNet2DConditionModel:
    """Run the distillation; returns the student UNet (eval mode)."""
    teacher = teacher_pipe.unet.requires_grad_(False).eval()
    student = student_from(teacher).train()
    scheduler = LCMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=True)
    alphas = scheduler.alphas_cumprod
    with torch.no_grad():
        prompts, latents = encode_dataset(teacher_pipe.vae, args.dataset, gen)
        latents = latents * teacher_pipe.vae.config.scaling_factor
        unique = sorted(set(prompts))
        embeds, _ = teacher_pipe.encode_prompt(unique + [""], "cpu", 1, False)
    lookup = {p: i for i, p in enumerate(unique)}
    prompt_ids = torch.tensor([lookup[p] for p in prompts])
    empty = embeds[-1:]
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / 100))
    start = time.time()
    for step in range(args.steps):
        n_intervals = grid_intervals(step, args.steps, args.grid_start, args.grid_end)
        skip = 1000 // n_intervals
        idx = torch.randint(len(prompts), (args.batch,), generator=gen)
        x0, cond = latents[idx], embeds[prompt_ids[idx]]
        # t_n on the grid {skip−1, 2·skip−1, …, 999}; the solver steps to t_n − skip (0 at the bottom)
        t = (torch.randint(1, n_intervals + 1, (args.batch,), generator=gen) * skip - 1).long()
        t_prev = (t - skip).clamp(min=0)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = alphas[t].view(-1, 1, 1, 1).sqrt() * x0 + (1 - alphas[t].view(-1, 1, 1, 1)).sqrt() * noise
        w = args.w_min + (args.w_max - args.w_min) * torch.rand(args.batch, generator=gen)
        w_embedding = teacher_pipe.get_guidance_scale_embedding(w - 1, embedding_dim=GUIDANCE_DIM)
        with torch.no_grad():
            eps_u, eps_c = teacher(
                torch.cat([x_t, x_t]),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([empty.expand_as(cond), cond]),
            ).sample.chunk(2)
            eps = eps_u + w.view(-1, 1, 1, 1) * (eps_c - eps_u)
            x0_hat = x0_from_eps(x_t, eps, alphas[t].view(-1, 1, 1, 1))
            a_prev = alphas[t_prev].view(-1, 1, 1, 1)
            x_prev = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps  # DDIM (eta = 0) solver step
            target = consistency(student, x_prev, t_prev, cond, w_embedding, scheduler, alphas)
        pred = consistency(student, x_t, t, cond, w_embedding, scheduler, alphas)
        loss = pseudo_huber(pred, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(
                f"step {step} N {n_intervals} loss {loss.item():.5f} ({time.time() - start:.0f}s)", flush=True
            )
    return student.eval().requires_grad_(False)


@torch.no_grad()
def heldout_score(pipe, num_images: int, num_steps: int, guidance: float, seed: int) -> dict:
    """shapes_alignment of ``num_images`` held-out single-object prompts (cycled), one batch per 64,
    sampled by the pipeline's own ``__call__`` (DDIM eta = 0 for SD)."""
    pool = tw.prompts("heldout", "single")
    prompts = [pool[i % len(pool)] for i in range(num_images)]
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for i in range(0, num_images, 64):
        images = pipe(
            prompts[i : i + 64],
            num_inference_steps=num_steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="pt",
        ).images
        scores.append(score_shapes(images.float(), prompts[i : i + 64]).score)
    scores = torch.cat(scores)
    return {
        "num_steps": num_steps,
        "guidance_scale": guidance,
        "num_images": num_images,
        "score": scores.mean().item(),
        "stderr": (scores.std() / math.sqrt(len(scores))).item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="diffrl/assets/tiny-lcm")
    parser.add_argument("--teacher", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--dataset", type=int, default=8192, help="pre-encoded training renders")
    parser.add_argument("--w-min", type=float, default=2.0)
    parser.add_argument("--w-max", type=float, default=8.0)
    parser.add_argument("--grid-start", type=int, default=10, help="N0, solver intervals at the start")
    parser.add_argument("--grid-end", type=int, default=50, help="N1, solver intervals at the end")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--eval", type=int, default=192, help="held-out images in baseline.json")
    args = parser.parse_args()
    gen = seeded(args)

    teacher = load_pipeline(args.teacher)
    student = distill(teacher, args, gen)
    pipe = LatentConsistencyModelPipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        unet=student,
        scheduler=LCMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    teacher.unet = teacher.unet.eval()
    report = {
        "lcm": {h: heldout_score(pipe, args.eval, h, 5.0, args.seed) for h in (2, 4, 8)},
        "teacher_ddim50": heldout_score(teacher, args.eval, 50, 5.0, args.seed),
        "distillation": vars(args),
    }
    write_baseline(args.out, report)


if __name__ == "__main__":
    main()
