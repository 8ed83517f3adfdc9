import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffrl.policies.ddim import ddim_step_with_logprob
from diffrl.testing import SD_SCHEDULE


def _scheduler(num_steps=20, **overrides):
    config = dict(SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    config.update(overrides)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _inputs(seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("index", [0, 7, 19])  # first, middle and last step (final_alpha_cumprod)
def test_eta0_mean_equals_diffusers_step(prediction_type, index):
    scheduler = _scheduler(prediction_type=prediction_type)
    sample, noise_pred = _inputs()
    t = int(scheduler.timesteps[index])
    ours = ddim_step_with_logprob(scheduler, noise_pred, t, sample, eta=0.0, with_logprob=False)
    reference = scheduler.step(noise_pred, t, sample, eta=0.0).prev_sample
    torch.testing.assert_close(ours.mean, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.prev_sample, reference, rtol=1e-5, atol=1e-5)
    assert ours.log_prob is None


def test_eta1_sample_equals_diffusers_step_with_same_noise():
    scheduler = _scheduler(clip_sample=True)
    sample, noise_pred = _inputs(1)
    t = int(scheduler.timesteps[3])
    ours = ddim_step_with_logprob(
        scheduler, noise_pred, t, sample, eta=1.0, generator=torch.Generator().manual_seed(5)
    )
    reference = scheduler.step(noise_pred, t, sample, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours.prev_sample, reference.prev_sample, rtol=1e-5, atol=1e-5)


def test_log_prob_matches_torch_normal():
    scheduler = _scheduler()
    sample, noise_pred = _inputs(2)
    out = ddim_step_with_logprob(scheduler, noise_pred, int(scheduler.timesteps[4]), sample, eta=0.7)
    expected = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected)
    assert out.log_prob.shape == (3,)


def test_log_prob_of_drawn_action_is_hand_derived_value():
    # x_prev = mu + sigma z  =>  log pi = mean(-z^2/2) - log sigma - log(2 pi)/2  (REFERENCES.md)
    scheduler = _scheduler()
    sample, noise_pred = _inputs(3)
    t = int(scheduler.timesteps[10])
    base = ddim_step_with_logprob(scheduler, noise_pred, t, sample, eta=1.0)
    z = torch.randn(sample.shape, generator=torch.Generator().manual_seed(9))
    prev = base.mean + base.std * z
    out = ddim_step_with_logprob(scheduler, noise_pred, t, sample, eta=1.0, prev_sample=prev)
    sigma = base.std.flatten()
    expected = (-(z**2) / 2).mean(dim=(1, 2, 3)) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.prev_sample, prev)


def test_std_is_ddpm_posterior_std_times_eta():
    scheduler = _scheduler()
    sample, noise_pred = _inputs()
    i = 5
    t, t_prev = int(scheduler.timesteps[i]), int(scheduler.timesteps[i + 1])
    a_t, a_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_prev]
    posterior_var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    out = ddim_step_with_logprob(scheduler, noise_pred, t, sample, eta=0.5)
    torch.testing.assert_close(out.std.flatten(), (0.5 * posterior_var.sqrt()).expand(3))


def test_one_scheduler_follows_its_schedule_and_eta_changes():
    """The step's per-schedule coefficient table is rebuilt for a new ``set_timesteps`` or eta:
    each call still matches diffusers' own step (eta 0) and the posterior std (eta > 0)."""
    scheduler = _scheduler(num_steps=20)
    reference = _scheduler(num_steps=20)
    sample, noise_pred = _inputs()
    for num_steps, eta in [(20, 1.0), (10, 1.0), (10, 0.3), (50, 0.0), (20, 1.0)]:
        scheduler.set_timesteps(num_steps)
        reference.set_timesteps(num_steps)
        i = 3
        t, t_prev = int(scheduler.timesteps[i]), int(scheduler.timesteps[i + 1])
        out = ddim_step_with_logprob(scheduler, noise_pred, t, sample, eta=eta, with_logprob=eta > 0)
        a_t, a_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_prev]
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        torch.testing.assert_close(out.std.flatten(), std.expand(3))
        if eta == 0:
            want = reference.step(noise_pred, t, sample, eta=0.0).prev_sample
            torch.testing.assert_close(out.prev_sample, want, rtol=1e-5, atol=1e-5)


def test_per_sample_timesteps_equal_separate_calls():
    scheduler = _scheduler()
    sample, noise_pred = _inputs(4)
    steps = scheduler.timesteps[[0, 9, 19]]
    prev = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1))
    batched = ddim_step_with_logprob(scheduler, noise_pred, steps, sample, prev_sample=prev)
    for b in range(3):
        single = ddim_step_with_logprob(
            scheduler, noise_pred[b : b + 1], int(steps[b]), sample[b : b + 1], prev_sample=prev[b : b + 1]
        )
        torch.testing.assert_close(batched.log_prob[b : b + 1], single.log_prob)
        torch.testing.assert_close(batched.mean[b : b + 1], single.mean)


def test_gradient_reaches_noise_pred_not_action():
    scheduler = _scheduler()
    sample, noise_pred = _inputs(5)
    noise_pred.requires_grad_(True)
    prev = torch.randn(sample.shape, requires_grad=True)
    out = ddim_step_with_logprob(scheduler, noise_pred, int(scheduler.timesteps[2]), sample, prev_sample=prev)
    out.log_prob.sum().backward()
    assert noise_pred.grad is not None and noise_pred.grad.abs().sum() > 0
    assert prev.grad is None


def test_nonpositive_eta_with_logprob_is_a_clear_error():
    scheduler = _scheduler()
    sample, noise_pred = _inputs()
    for eta in (0.0, -1.0):
        with pytest.raises(ValueError, match="eta"):
            ddim_step_with_logprob(scheduler, noise_pred, int(scheduler.timesteps[0]), sample, eta=eta)


def test_requires_set_timesteps_and_matching_shapes():
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    sample, noise_pred = _inputs()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(scheduler, noise_pred, 999, sample)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="prev_sample shape"):
        ddim_step_with_logprob(scheduler, noise_pred, 901, sample, prev_sample=sample[:, :2])
