"""D3PO: pairs and preferences, the per-step loss against its closed form, and training."""

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from diffrl.algorithms import d3po
from diffrl.algorithms.d3po import d3po_loss, group_pairs, preferences
from diffrl.collect import sample_batch
from diffrl.config import ConfigError, load_config
from diffrl.files import read_jsonl
from diffrl.learner import adapters_disabled, prepare_denoiser, step_log_prob
from diffrl.prompts import load_prompts
from diffrl.rollout import sample_trajectories
from diffrl.testing import tiny_sd_pipeline
from diffrl.types import SamplerSettings
from tests.alignment import assert_raised, train_and_compare

ROOT = Path(__file__).parent.parent

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


# ---------------------------------------------------------------------------- in the trainer


def test_groups_share_x_T_and_draw_their_own_noise(tiny_sd):
    config = load_config(None, ["algorithm=d3po", "sample.num_steps=3", "d3po.group_size=3"])
    plan = d3po.plan(config, epoch=0)
    assert (plan.branch_step, plan.num_branches) == (0, 3)
    traj = sample_batch(tiny_sd, config, ["a", "b"], torch.Generator().manual_seed(0), plan)
    data = traj
    assert data.parents.tolist() == [0, 0, 0, 1, 1, 1]
    x_T, x_1 = data.latents[:, 0], data.latents[:, 1]
    assert torch.equal(x_T[0], x_T[1]) and torch.equal(x_T[1], x_T[2]) and not torch.equal(x_T[0], x_T[3])
    assert not torch.equal(x_1[0], x_1[1])  # independent noise from the first step on


def test_reference_is_the_pretrained_unet_with_lora_disabled():
    pipe = tiny_sd_pipeline(seed=0)
    config = load_config(None, ["algorithm=d3po", "sample.num_steps=3", "model.lora_rank=4"])
    traj = sample_trajectories(
        pipe, ["a", "b"], SamplerSettings(num_steps=3), generator=torch.Generator().manual_seed(1)
    )
    data, accelerator = traj, Accelerator(cpu=True)
    idx, step = torch.tensor([0, 1]), torch.tensor([0, 2])
    with torch.no_grad():
        base = step_log_prob(pipe.unet, pipe, data, idx, step, config, accelerator)
        prepare_denoiser(pipe, config, torch.float32)
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter
        policy = step_log_prob(pipe.unet, pipe, data, idx, step, config, accelerator)
        with adapters_disabled(pipe.unet):
            reference = step_log_prob(pipe.unet, pipe, data, idx, step, config, accelerator)
        after = step_log_prob(pipe.unet, pipe, data, idx, step, config, accelerator)
    assert torch.equal(reference, base) and not torch.allclose(policy, base) and torch.equal(after, policy)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("d3po.group_size=1", "d3po.group_size: must be >= 2"),
        ("model.use_lora=false", "d3po.reference: pretrained needs model.use_lora: true"),
        ("d3po.clamp=1.5", r"d3po.clamp: must be in \(0, 1\) or null"),
    ],
)
def test_d3po_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["algorithm=d3po", override])
    defaults = load_config(None, ["algorithm=d3po"])
    assert (defaults.sample.num_steps, defaults.train.learning_rate, defaults.model.lora_rank) == (
        20,
        3e-5,
        4,
    )


@pytest.mark.slow
def test_short_d3po_run_with_ai_feedback_raises_alignment(tmp_path):
    prompts = load_prompts("toy_train_single").prompts[::6]  # 16 fixed prompts, as for DDPO
    before, after, config = train_and_compare(
        "tiny", "d3po/tiny_alignment.yaml", prompts, tmp_path, "run.num_epochs=30"
    )
    records = read_jsonl(tmp_path / config.run.name / "metrics.jsonl")
    assert all(r["num_pairs"] == 16 * 6 and 0 < r["num_trained"] <= 16 * 6 for r in records)
    assert_raised(before, after)
