"""B²-DiffuRL: the backward progressive schedule, branch sampling (parents, one trunk, equality
with plain sampling), the selection rule, the stage history, and a short run on the tiny model."""

from pathlib import Path

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from diffrl.algorithms.b2diffurl import (
    B2DiffuRLConfig,
    StageHistory,
    branch_step,
    compute_advantages,
    select_extremes,
    sibling_z,
    trained_steps,
)
from diffrl.config import ConfigError, load_config
from diffrl.prompts import load_prompts
from diffrl.rollout import sample_branches
from diffrl.text import encode_prompts
from diffrl.transitions import decode_latents, guided_noise_pred
from diffrl.types import SamplerSettings
from tests.alignment import assert_raised, train_and_compare

ROOT = Path(__file__).parent.parent
PROMPTS = ["a red circle", "a small blue square on the left"]


def test_progressive_schedule_matches_the_authors_defaults():
    config = B2DiffuRLConfig()
    assert [trained_steps(s, config) for s in (0, 15, 29, 99)] == [14, 15, 16, 20]
    assert [branch_step(s, 20, config) for s in (0, 15, 29, 99)] == [6, 5, 4, 0]
    assert trained_steps(150, config) == 20  # past the last stage: the whole chain
    lengths = [trained_steps(s, config) for s in range(100)]
    assert lengths == sorted(lengths) and set(lengths) == set(range(14, 21))


def _plain_ddim(pipe, prompts, num_steps, seed):
    """An independent reference sampler: diffusers' own DDIMScheduler.step with eta = 1, noise
    drawn in the same order (x_T, then one draw per step)."""
    g = torch.Generator().manual_seed(seed)
    text = encode_prompts(pipe, prompts, "", True)
    embeds, negative = text.embeds, text.negative
    x = (
        randn_tensor((len(prompts), 4, 8, 8), generator=g, dtype=torch.float32)
        * pipe.scheduler.init_noise_sigma
    )
    pipe.scheduler.set_timesteps(num_steps)
    for t in pipe.scheduler.timesteps:
        eps = guided_noise_pred(pipe.unet, x, t, embeds, negative, 5.0)
        noise = randn_tensor(x.shape, generator=g, dtype=torch.float32)
        x = pipe.scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
    return decode_latents(pipe, x)


@pytest.mark.parametrize("b", [0, 2, 4])
def test_one_branch_is_plain_sampling_for_the_same_seed(tiny_sd, b):
    with torch.no_grad():
        reference = _plain_ddim(tiny_sd, PROMPTS, 4, seed=3)
    traj = sample_branches(
        tiny_sd,
        PROMPTS,
        SamplerSettings(num_steps=4),
        branch_step=b,
        num_branches=1,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(traj.images, reference, rtol=0, atol=1e-5)
    assert traj.parents is None


def test_branches_share_their_trunk_and_record_parents(tiny_sd):
    b, k = 2, 3
    traj = sample_branches(
        tiny_sd,
        PROMPTS,
        SamplerSettings(num_steps=4),
        branch_step=b,
        num_branches=k,
        generator=torch.Generator().manual_seed(0),
    )
    assert traj.parents.tolist() == [0, 0, 0, 1, 1, 1]
    assert traj.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert traj.latents.shape == (6, 5, 4, 8, 8) and traj.log_probs.shape == (6, 4)
    for parent in range(2):
        kids = (traj.parents == parent).nonzero().flatten()
        first = kids[0]
        for kid in kids[1:]:
            assert torch.equal(traj.latents[kid, : b + 1], traj.latents[first, : b + 1])
            assert torch.equal(traj.log_probs[kid, :b], traj.log_probs[first, :b])
            assert not torch.allclose(traj.latents[kid, b + 1], traj.latents[first, b + 1]), (
                "independent noise"
            )
    assert not torch.equal(traj.latents[0, 1], traj.latents[3, 1]), "different trunks"


@pytest.mark.parametrize("guidance, factor", [(5.0, 2), (1.0, 1)])
def test_the_trunk_is_computed_once(tiny_sd, guidance, factor):
    rows = []
    handle = tiny_sd.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        n, b, k, batch = 6, 2, 5, 2
        sample_branches(
            tiny_sd,
            PROMPTS,
            SamplerSettings(num_steps=n, guidance_scale=guidance),
            branch_step=b,
            num_branches=k,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    assert sum(rows) == factor * (batch * b + batch * k * (n - b))
    assert len(rows) == n, "one batched UNet call per step"


def test_selection_keeps_the_extremes_of_each_sibling_group():
    z = torch.tensor([1.0, 0.2, -0.7, 0.3, 0.4, -0.2, 0.6, 0.55, -0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])
    keep = select_extremes(z, groups, 0.5)
    # group 0: best 1.0 and worst -0.7; group 1: neither extreme passes; group 2: only the best;
    # group 3 (one member, z = -0.5): it is its own worst
    assert keep.tolist() == [True, False, True, False, False, False, True, False, True]


def test_stage_history_pools_the_current_and_last_stages():
    history = StageHistory(history_stages=1)
    history.update(0, ["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    history.update(1, ["a", "a"], torch.tensor([2.0, 6.0]))
    z = history.update(2, ["a", "b"], torch.tensor([4.0, 7.0]))
    pooled = torch.tensor([2.0, 6.0, 4.0])  # stage 0 fell out of the window (current + 1 past stage)
    expected_a = (4.0 - pooled.mean()) / (pooled.std(unbiased=False) + 1e-8)
    assert z[0].item() == pytest.approx(expected_a.item(), rel=1e-6)
    assert z[1].item() == pytest.approx(0.0, abs=1e-6)  # b's only reward in the window is itself
    restored = StageHistory(0)
    restored.load_state_dict(history.state_dict())
    assert (
        restored.update(3, ["a"], torch.tensor([4.0])).item()
        == history.update(3, ["a"], torch.tensor([4.0])).item()
    )


def test_history_and_sibling_advantages_differ_as_documented():
    prompts = ["p"] * 6
    rewards_ = torch.tensor([10.0, 11.0, 12.0, 0.0, 1.0, 2.0])  # group 0 is better than group 1 overall
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv_h, keep_h = compute_advantages(prompts, rewards_, groups, StageHistory(8), 0, B2DiffuRLConfig())
    adv_s, keep_s = compute_advantages(
        prompts, rewards_, groups, StageHistory(8), 0, B2DiffuRLConfig(advantage="siblings")
    )
    # history z (about [0.79, 0.99, 1.18, -1.18, -0.99, -0.79]): group 0's worst is still above
    # average, so only its best is kept; likewise only group 1's worst
    z = (rewards_ - rewards_.mean()) / rewards_.std(unbiased=False)
    assert keep_h.tolist() == [False, False, True, True, False, False]
    torch.testing.assert_close(adv_h[keep_h], z[keep_h])
    # siblings: each group's own best and worst, with z against the group
    assert keep_s.tolist() == [True, False, True, True, False, True]
    torch.testing.assert_close(adv_s[keep_s], sibling_z(rewards_, groups)[keep_s])
    assert (adv_h[~keep_h] == 0).all() and (adv_s[~keep_s] == 0).all()


def test_b2diffurl_config_errors():
    with pytest.raises(ConfigError, match=r"b2diffurl.min_trained_steps: need 1 <= min_trained_steps \(14\)"):
        load_config(None, ["algorithm=b2diffurl", "sample.num_steps=10"])
    config = load_config(ROOT / "configs" / "b2diffurl" / "sd14_clipscore.yaml")
    assert config.algorithm == "b2diffurl" and config.b2diffurl.num_branches == 5


def test_short_b2diffurl_run_raises_alignment(tmp_path):
    prompts = load_prompts("toy_train_single").prompts[::6]  # 16 fixed prompts
    before, after, _ = train_and_compare("tiny", "b2diffurl/tiny_alignment.yaml", prompts, tmp_path)
    assert_raised(before, after)
