"""The consistency sampler as a Gaussian policy against diffusers' LCMScheduler."""

import os

import pytest
import torch
from diffusers import LCMScheduler

from diffrl.policies.lcm import guidance_embedding, lcm_step_with_logprob, next_timestep
from diffrl.testing import SD_SCHEDULE
from diffrl.types import SamplerSettings


@pytest.mark.parametrize("steps", [2, 4, 8, 16])
def test_schedule_is_lcmschedulers(steps):
    scheduler = LCMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    assert len(timesteps) == steps and timesteps[0] == 999
    assert [next_timestep(scheduler, t) for t in timesteps] == timesteps[1:] + [None]


def test_step_mean_is_lcmscheduler_denoised_mapped_forward_and_rescoring_gives_ratio_one():
    scheduler = LCMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for k, t in enumerate(scheduler.timesteps.tolist()):
        ours = lcm_step_with_logprob(scheduler, eps, t, x, generator=torch.Generator().manual_seed(k))
        scheduler._step_index = k
        ref = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(k))
        if k == 3:
            torch.testing.assert_close(ours.prev_sample, ref.denoised)
            assert ours.log_prob is None
            continue
        t_next = scheduler.timesteps[k + 1]
        torch.testing.assert_close(ours.mean, scheduler.alphas_cumprod[t_next].sqrt() * ref.denoised)
        torch.testing.assert_close(ours.prev_sample, ref.prev_sample)  # same noise draw
        normal = torch.distributions.Normal(ours.mean, ours.std)
        torch.testing.assert_close(ours.log_prob, normal.log_prob(ours.prev_sample).flatten(1).mean(1))
        again = lcm_step_with_logprob(scheduler, eps, t, x, prev_sample=ours.prev_sample)
        assert torch.equal(again.log_prob, ours.log_prob)  # re-scoring the stored action: ratio 1


def test_guidance_embedding_matches_the_pipeline(tiny_lcm):
    emb = guidance_embedding(tiny_lcm, 8.0, 2)
    ref = tiny_lcm.get_guidance_scale_embedding(torch.tensor([7.0, 7.0]), embedding_dim=32)
    assert emb.shape == (2, 32) and torch.allclose(emb, ref)


def test_per_sample_timesteps_equal_one_step_each():
    scheduler = LCMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(8)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = scheduler.timesteps[[0, 3, 6]]
    action = torch.randn(3, 4, 8, 8, generator=g)
    batched = lcm_step_with_logprob(scheduler, eps, t, x, prev_sample=action)
    for i in range(3):
        one = lcm_step_with_logprob(
            scheduler, eps[i : i + 1], int(t[i]), x[i : i + 1], prev_sample=action[i : i + 1]
        )
        torch.testing.assert_close(batched.log_prob[i : i + 1], one.log_prob)
        torch.testing.assert_close(batched.mean[i : i + 1], one.mean)
    with pytest.raises(ValueError, match="mix the schedule's last step"):
        lcm_step_with_logprob(scheduler, eps[:2], scheduler.timesteps[[0, 7]], x[:2], prev_sample=action[:2])


def test_fused_lcm_step_matches_the_reference(monkeypatch):
    """The consistency step's mean is affine in (x, ε̂); the fused DDIM kernel (Triton interpreter
    on CPU, compiled with DIFFRL_TEST_DEVICE=cuda) must give the reference's mean, log-prob and gradient."""
    device = os.environ.get("DIFFRL_TEST_DEVICE", "cpu")
    scheduler = LCMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(4)
    g = torch.Generator().manual_seed(2)
    x, action = (torch.randn(2, 4, 8, 8, generator=g).to(device) for _ in range(2))
    t = scheduler.timesteps[[0, 2]]
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("DIFFRL_KERNELS", mode)
        eps = (
            torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
            .to(device)
            .requires_grad_(True)
        )
        out = lcm_step_with_logprob(scheduler, eps, t, x, prev_sample=action)
        out.log_prob.sum().backward()
        results[mode] = (out.mean.detach(), out.log_prob.detach(), eps.grad)
    for ref, fused in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_lcm_rollout_images_equal_diffusers_lcm_pipeline(tiny_lcm):
    """Same initial latents and generator: our H-step chain (H − 1 stochastic actions, then the
    deterministic consistency readout) draws the same noise as LatentConsistencyModelPipeline."""
    from diffrl.rollout import sample_trajectories

    prompts = ["a red circle", "a blue square"]
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    traj = sample_trajectories(
        tiny_lcm,
        prompts,
        SamplerSettings(num_steps=4, guidance_scale=6.0),
        latents=x_T,
        generator=torch.Generator().manual_seed(5),
    )
    ref = tiny_lcm(
        prompts,
        num_inference_steps=4,
        guidance_scale=6.0,
        latents=x_T.clone(),
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images
    torch.testing.assert_close(traj.images, ref, rtol=1e-4, atol=1e-4)
    assert traj.latents.shape == (2, 4, 4, 8, 8) and traj.log_probs.shape == (2, 3)
    assert traj.timesteps.tolist() == tiny_lcm.scheduler.timesteps.tolist()[:3]  # the 4th is the readout
