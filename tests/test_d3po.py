"""D3PO: pairs and preferences, the per-step loss against its closed form, and training."""

import math

import pytest
import torch

from diffrl.algorithms.d3po import d3po_loss, group_pairs, preferences

WIN, LOSE, TIE = [1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]


def test_pairs_cover_every_pair_within_a_group():
    first, second = group_pairs(torch.tensor([0, 0, 0, 1, 1]))
    assert list(zip(first.tolist(), second.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4)]


def test_pareto_preferences():
    scores = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 0.0], [0.5, 0.5], [float("nan"), 0.0], [0.0, 0.0]])
    pairs = preferences(scores, torch.tensor([0, 0, 1, 1, 2, 2]))
    # (0,1): 0 dominates; (2,3): neither dominates; (4,5): NaN -> tie
    assert pairs.h.tolist() == [WIN, TIE, TIE]
    assert pairs.decided.tolist() == [True, False, False]
    single = preferences(torch.tensor([[0.2], [0.7], [0.7]]), torch.tensor([0, 0, 0]))
    assert single.h.tolist() == [LOSE, LOSE, TIE]  # pairs (0,1), (0,2), (1,2); equal scores tie


@pytest.mark.parametrize("clamp", [0.1, None])
def test_policy_equal_to_reference_gives_log2_and_ties_give_no_gradient(clamp):
    log_ratio = torch.zeros(4, 2, requires_grad=True)
    h = torch.tensor([WIN, LOSE, WIN, TIE])
    loss, logits = d3po_loss(log_ratio, h, beta=0.1, clamp=clamp)
    assert loss.item() == pytest.approx(math.log(2)) and torch.equal(logits, torch.zeros(4))
    tie_ratio = torch.randn(3, 2).mul(0.05).requires_grad_(True)
    tie_loss, _ = d3po_loss(tie_ratio, torch.zeros(3, 2), beta=0.1, clamp=clamp)
    tie_loss.backward()
    assert tie_loss.item() == pytest.approx(math.log(2)) and torch.equal(tie_ratio.grad, torch.zeros(3, 2))


def test_loss_matches_the_closed_form_and_clamp_zeroes_gradient_outside():
    beta, eps = 0.1, 0.1
    log_ratio = torch.tensor([[0.05, -0.02], [0.3, 0.01], [-0.5, 0.2]], requires_grad=True)
    h = torch.tensor([WIN, WIN, LOSE])
    loss, logits = d3po_loss(log_ratio, h, beta=beta, clamp=eps)
    r = torch.exp(log_ratio.detach()).clamp(1 - eps, 1 + eps)
    expected = beta * (h[:, 0] * r[:, 0].log() + h[:, 1] * r[:, 1].log())
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(expected).mean())
    loss.backward()
    outside = (log_ratio.detach().exp() < 1 - eps) | (log_ratio.detach().exp() > 1 + eps)
    assert outside.any() and (log_ratio.grad[outside] == 0).all() and (log_ratio.grad[~outside] != 0).all()
    # unclamped: Eq. 14, -log sigmoid(beta (log r_w - log r_l))
    free = log_ratio.detach().clone().requires_grad_(True)
    loss14, _ = d3po_loss(free, h, beta=beta, clamp=None)
    w = torch.where(h[:, 0] > 0, free[:, 0], free[:, 1])
    lo = torch.where(h[:, 0] > 0, free[:, 1], free[:, 0])
    torch.testing.assert_close(loss14, -torch.nn.functional.logsigmoid(beta * (w - lo)).mean())


def test_masked_pairs_do_not_count():
    log_ratio = torch.tensor([[0.05, -0.02], [9.0, 9.0]])
    h = torch.tensor([WIN, WIN])
    masked, _ = d3po_loss(log_ratio, h, 0.1, 0.1, valid=torch.tensor([True, False]))
    alone, _ = d3po_loss(log_ratio[:1], h[:1], 0.1, 0.1)
    torch.testing.assert_close(masked, alone)
