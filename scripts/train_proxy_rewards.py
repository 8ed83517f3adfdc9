"""An ensemble of learned proxy rewards for the toy world's over-optimisation experiments (issue #24):
small CNNs (:class:`diffrl.rewards.proxy.ProxyNet`) regressed on a limited, noisy set of verifier
labels, as Coste et al. (2024) build their proxy reward models from few, noisy preferences.

The images are samples of the pretrained model on the training prompts (the distribution a policy
starts from), labelled by the exact verifier (``--reward``, the "gold" reward) plus Gaussian label
noise of std ``--noise``; each of ``--members`` proxies is fitted on its own bootstrap resample.
The held-out correlation of the ensemble mean with the verifier is printed and stored in the file.

    python scripts/train_proxy_rewards.py --out data/proxy.safetensors     # ~3 minutes on 2 CPU cores
    diffrl train configs/grpo/tiny_geneval.yaml reward.name=proxy "reward.kwargs={weights: data/proxy.safetensors}"
"""

from __future__ import annotations

import argparse

import torch

from diffrl.pipelines import load_pipeline
from diffrl.prompts import load_prompts
from diffrl.rewards import get as get_reward
from diffrl.rewards.proxy import fit_member, save_ensemble
from diffrl.rollout import sample_trajectories
from diffrl.types import SamplerSettings


def labelled_samples(model: str, source: str, reward: str, count: int, steps: int, seed: int):
    """``count`` samples of ``model`` on ``source`` (cycled) with their verifier scores:
    (images [N, 3, H, W], prompts [N], scores [N])."""
    pipe, prompts = load_pipeline(model), load_prompts(source).prompts
    chosen = [
        prompts[i % len(prompts)]
        for i in torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    ]
    generator, images = torch.Generator().manual_seed(seed), []
    for start in range(0, count, 64):
        batch = chosen[start : start + 64]
        settings = SamplerSettings(num_steps=steps, guidance_scale=5.0, eta=1.0)
        images.append(sample_trajectories(pipe, batch, settings, generator=generator).images)
    images = torch.cat(images)
    return images, chosen, get_reward(reward)(images, chosen)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two ``[N]`` tensors."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", default="toy_train_all")
    parser.add_argument(
        "--reward", default="shapes_alignment", help="the exact verifier the labels come from"
    )
    parser.add_argument("--num-images", type=int, default=512, help="labelled samples (a limited set)")
    parser.add_argument("--heldout", type=int, default=128, help="further samples to measure the proxies on")
    parser.add_argument("--noise", type=float, default=0.1, help="std of the Gaussian label noise")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--fit-steps", type=int, default=1500)
    parser.add_argument("--num-steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    images, prompts, gold = labelled_samples(
        args.model, args.prompts, args.reward, args.num_images + args.heldout, args.num_steps, args.seed
    )
    n = args.num_images
    noisy = gold[:n] + args.noise * torch.randn(n, generator=torch.Generator().manual_seed(args.seed + 1))
    members = [
        fit_member(images[:n], prompts[:n], noisy, seed=args.seed + 100 + k, steps=args.fit_steps)
        for k in range(args.members)
    ]
    with torch.no_grad():
        scores = torch.stack([m(images[n:], prompts[n:]) for m in members])
    corr = [correlation(s, gold[n:]) for s in scores]
    mean_corr = correlation(scores.mean(0), gold[n:])
    print(
        f"held-out correlation with {args.reward}: members {[round(c, 3) for c in corr]}, mean {mean_corr:.3f}"
    )
    info = {key: getattr(args, key) for key in ("model", "prompts", "reward", "num_images", "noise", "seed")}
    save_ensemble(args.out, members, {**info, "heldout_correlation": mean_corr})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
