"""The flow-matching steps (issue #22, item 1): on Gaussian data the exact velocity is known in
closed form, and the SDE and ODE samplers driven by it must reproduce the data's mean and variance
and, step by step, the marginals x_σ = (1 - σ) x0 + σ ε; CPS keeps the forward coefficients given
the true x0 and ε (with the posterior-mean field and a noise fraction sin(aπ/2) of ~0.9 it
resamples most of the noise each step, which narrows the output: 18% at 50 steps, measured);
log-probs against torch.distributions."""

import math

import pytest
import torch

from diffrl.policies.flow import flow_step_with_logprob, predicted_x0

M, S = 1.5, 0.5  # the data: x0 ~ N(M, S^2) per element


def exact_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[ε - x0 | x_σ = x] for x0 ~ N(M, S²), ε ~ N(0, 1), x_σ = (1 - σ) x0 + σ ε."""
    a, b = 1 - sigma, sigma
    var = a * a * S * S + b * b
    centred = x - a * M
    return b / var * centred - (M + a * S * S / var * centred)


@pytest.mark.parametrize("kind, bound", [("ode", 0.03), ("sde", 0.06)])
def test_sampling_the_exact_field_reproduces_the_data_and_every_marginal(kind, bound):
    """50 uniform steps from N(0, 1): every x_σ' has mean (1 - σ') M and std
    √((1 - σ')² S² + σ'²) within ``bound`` (relative): Euler's error for the ODE; for the SDE, the
    σ = 1 endpoint's stand-in σ̃ = sigmas[1] overshoots the first steps' spread by ~5%, which the
    later steps correct. The data comes out within 2% (ODE) and 1% (SDE)."""
    steps, g = 50, torch.Generator().manual_seed(0)
    sigmas = torch.linspace(1, 0, steps + 1).tolist()
    x = torch.randn(20000, 1, 4, 4, generator=g)
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        out = flow_step_with_logprob(
            exact_velocity(x, sigma), x, sigma, sigma_next, kind=kind, sigma_after_one=sigmas[1], generator=g
        )
        x = out.prev_sample
        mean, std = (1 - sigma_next) * M, ((1 - sigma_next) ** 2 * S * S + sigma_next**2) ** 0.5
        assert abs(x.mean().item() - mean) < 0.01, (i, x.mean().item(), mean)
        assert abs(x.std().item() / std - 1) < bound, (i, x.std().item(), std)
    assert abs(x.mean().item() - M) < 0.01
    assert abs(x.std().item() / S - 1) < (0.03 if kind == "ode" else 0.01), x.std().item()


def test_cps_preserves_the_coefficients_of_x0_and_the_noise():
    """Given the true x0 and ε behind x_σ (v = ε − x0), a CPS step lands on x_σ' with mean
    (1 − σ') x0 and noise std σ' exactly: the forward process's own coefficients at σ'."""
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(20000, 1, 4, 4, generator=g) * S + M, torch.randn(20000, 1, 4, 4, generator=g)
    for sigma, sigma_next in [(0.9, 0.8), (0.5, 0.3), (0.2, 0.1)]:
        x = (1 - sigma) * x0 + sigma * eps
        out = flow_step_with_logprob(eps - x0, x, sigma, sigma_next, kind="cps", noise_level=0.8, generator=g)
        residual = out.prev_sample - (1 - sigma_next) * x0
        assert abs(residual.mean().item()) < 0.005 and abs(residual.std().item() / sigma_next - 1) < 0.01
        torch.testing.assert_close(
            out.std.flatten(), torch.full((20000,), sigma_next * math.sin(0.4 * math.pi))
        )


def test_the_sde_is_the_reverse_sde_of_the_ode():
    """μ − (x + Δ v) = −(a²σ / (1 − σ)) / 2 · score · Δ with score = −(x + (1 − σ) v) / σ, and
    std² = a²σ / (1 − σ) · |Δ| (the diffusion coefficient times the step)."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    sigma, sigma_next, a = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.45, 0.1]), 0.7
    out = flow_step_with_logprob(v, x, sigma, sigma_next, noise_level=a, generator=g)
    s, d = sigma.view(-1, 1, 1, 1), (sigma_next - sigma).view(-1, 1, 1, 1)
    diffusion = a * a * s / (1 - s)
    score = -(x + (1 - s) * v) / s
    torch.testing.assert_close(out.mean, x + d * v - diffusion / 2 * score * d)
    torch.testing.assert_close(out.std**2, diffusion * (-d))


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_log_prob_is_the_element_mean_normal_density(kind):
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.4, 0.1]), torch.tensor([0.9, 0.6, 0.3, 0.05])
    out = flow_step_with_logprob(v, x, sigma, sigma_next, kind=kind, sigma_after_one=0.9, generator=g)
    expected = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.prev_sample)
    torch.testing.assert_close(out.log_prob, expected.flatten(1).mean(1))
    again = flow_step_with_logprob(
        v, x, sigma, sigma_next, kind=kind, sigma_after_one=0.9, prev_sample=out.prev_sample
    )
    torch.testing.assert_close(again.log_prob, out.log_prob)  # re-scoring a stored action


def test_x0_prediction_ode_and_the_sigma_one_endpoint():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(predicted_x0(eps - x0, sigma, x), x0)
    out = flow_step_with_logprob(eps - x0, x, sigma, sigma - 0.1, kind="ode")
    assert out.log_prob is None
    torch.testing.assert_close(out.prev_sample, x - 0.1 * (eps - x0))
    with pytest.raises(ValueError, match="sigma = 1 needs sigma_after_one"):
        flow_step_with_logprob(eps, x, 1.0, 0.9)
    with pytest.raises(ValueError, match="kind must be one of"):
        flow_step_with_logprob(eps, x, 0.5, 0.4, kind="heun")
