import math

import pytest
import torch

from diffrl.ops import gaussian_logprob


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("std_shape", [(3, 1, 1, 1), (3, 4, 5, 6)], ids=["per_sample", "per_element"])
def test_gaussian_logprob_matches_torch_distributions(reduction, std_shape):
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    std = torch.rand(std_shape, generator=g) + 0.1
    expected = torch.distributions.Normal(mean, std).log_prob(x).flatten(1)
    expected = expected.mean(1) if reduction == "mean" else expected.sum(1)
    torch.testing.assert_close(gaussian_logprob(x, mean, std, reduction), expected)


def test_gaussian_logprob_hand_case_and_float32_output():
    # x = mean + std*z with z = 1 everywhere: log p = -1/2 - log(std) - log(2 pi)/2 per element
    mean = torch.zeros(2, 8, dtype=torch.float16)
    std = torch.full((2, 1), 0.5, dtype=torch.float16)
    out = gaussian_logprob(mean + std, mean, std)
    assert out.dtype == torch.float32 and out.shape == (2,)
    expected = -0.5 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out, torch.full((2,), expected))


def test_gaussian_logprob_rejects_bad_input():
    with pytest.raises(ValueError, match="reduction"):
        gaussian_logprob(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 1), reduction="max")
    with pytest.raises(ValueError, match="same shape"):
        gaussian_logprob(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 1))
