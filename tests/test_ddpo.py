import pytest
import torch

from diffrl.algorithms.ddpo import compute_advantages, ppo_loss
from diffrl.stat_tracking import PerPromptStatTracker, normalize


def test_ppo_loss_at_ratio_one_is_minus_mean_advantage_and_its_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = ppo_loss(logp, logp.detach(), adv, clip_range=0.1, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    loss.backward()
    # d/dlogp of -A * exp(logp - old) at ratio 1 is -A / B
    torch.testing.assert_close(logp.grad, -adv / 3)
    assert stats.approx_kl.item() == 0 and stats.clipfrac.item() == 0


def test_ppo_loss_clipping_edges_by_hand():
    eps = 0.2
    old = torch.zeros(4)
    # ratios 1.5 (A>0, above 1+eps: clipped), 1.5 (A<0: unclipped is the max),
    # 0.5 (A>0: unclipped is the max), 0.5 (A<0, below 1-eps: clipped)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, stats = ppo_loss(logp, old, adv, clip_range=eps, adv_clip_max=5.0)
    expected_terms = torch.tensor([-1.0 * 1.2, 1.0 * 1.5, -1.0 * 0.5, 1.0 * 0.8])
    assert loss.item() == pytest.approx(expected_terms.mean().item(), rel=1e-6)
    loss.backward()
    # clipped terms have zero gradient; unclipped d/dlogp = -A * ratio / B
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1.5 / 4, -0.5 / 4, 0.0]))
    assert stats.clipfrac.item() == 1.0
    log_ratio = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    assert stats.approx_kl.item() == pytest.approx(0.5 * (log_ratio**2).mean().item(), rel=1e-6)


def test_ppo_loss_clips_advantages():
    logp = torch.zeros(2, requires_grad=True)
    loss, _ = ppo_loss(logp, torch.zeros(2), torch.tensor([10.0, -7.0]), clip_range=1e-4, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-(5.0 - 5.0) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-5.0 / 2, 5.0 / 2]))


def test_tracker_falls_back_to_batch_stats_before_min_count():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0])
    prompts = ["a", "a", "b", "b"]
    adv = tracker.update(prompts, rewards)
    expected = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(adv, expected)


def test_tracker_uses_per_prompt_history_once_min_count_is_reached():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    tracker.update(["a", "a"], torch.tensor([1.0, 3.0]))
    adv = tracker.update(["a", "b"], torch.tensor([5.0, 100.0]))
    history = torch.tensor([1.0, 3.0, 5.0])
    assert adv[0].item() == pytest.approx(
        ((5.0 - history.mean()) / (history.std(unbiased=False) + 1e-6)).item()
    )
    batch = torch.tensor([5.0, 100.0])  # "b" has one reward: batch statistics
    assert adv[1].item() == pytest.approx(
        ((100.0 - batch.mean()) / (batch.std(unbiased=False) + 1e-6)).item()
    )


def test_tracker_evicts_oldest_rewards_and_round_trips_state():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["a"] * 3, torch.tensor([100.0, 1.0, 2.0]))
    adv = tracker.update(["a"], torch.tensor([3.0]))  # buffer now [1, 2, 3]: 100 evicted
    history = torch.tensor([1.0, 2.0, 3.0])
    assert list(tracker.buffers["a"]) == [1.0, 2.0, 3.0]
    assert adv.item() == pytest.approx(((3.0 - history.mean()) / (history.std(unbiased=False) + 1e-6)).item())
    clone = PerPromptStatTracker(1, 1)
    clone.load_state_dict(tracker.state_dict())
    torch.testing.assert_close(
        clone.update(["a"], torch.tensor([4.0])), tracker.update(["a"], torch.tensor([4.0]))
    )


def test_compute_advantages_without_tracker_is_global_normalisation():
    rewards = torch.tensor([1.0, 2.0, 4.0, 8.0])
    torch.testing.assert_close(compute_advantages(["a"] * 4, rewards, None), normalize(rewards))
    assert normalize(rewards).mean().abs() < 1e-6
