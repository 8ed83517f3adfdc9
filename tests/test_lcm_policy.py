"""The consistency sampler as a Gaussian policy against diffusers' LCMScheduler."""

import pytest
import torch
from diffusers import LCMScheduler

from diffrl.policies.lcm import guidance_embedding, lcm_step_with_logprob, next_timestep
from diffrl.testing import SD_SCHEDULE


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
